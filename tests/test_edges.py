"""Edge maps for ControlNet: Canny and the scenes' own edges agree, edge F1 means what it says, photos become controls."""

import numpy as np
import pytest
import torch

from course_lib import data, edges


@pytest.fixture(scope="module")
def scenes():
    return data.generate(48, seed=5, split="heldout")


def test_canny_on_a_rendered_scene_finds_its_outlines_and_its_stripes(scenes):
    canny = edges.canny_edges(scenes.images)
    assert canny.shape == scenes.edges.shape and canny.dtype == torch.bool
    r = edges.edge_f1(canny, scenes.edges, tolerance=1)
    striped = (scenes.fill == data.FILLS.index("striped")).any(1)  # (N,) scenes with a striped object
    assert 0 < striped.sum() < len(scenes)
    assert r["recall"].mean() > 0.95  # every outline is found within a pixel ...
    assert r["precision"][~striped].mean() > 0.97  # ... and on plain scenes little else
    assert r["precision"][striped].mean() < r["precision"][~striped].mean() - 0.05  # stripes are found too: not edges
    exact = edges.edge_f1(canny, scenes.edges, tolerance=0)["f1"]
    assert exact.mean() < 0.9  # not pixel for pixel: Canny puts some edges just outside the shape


def test_canny_needs_every_colour_channel():
    """A green shape on a grey background is almost invisible in brightness: grey-level Canny misses it."""
    from skimage.color import rgb2gray
    from skimage.feature import canny

    img = torch.tensor(data.BACKGROUND_RGB["grey"], dtype=torch.uint8).view(1, 3, 1, 1).repeat(1, 1, 64, 64)
    img[:, :, 20:44, 20:44] = torch.tensor(data.COLOUR_RGB["green"], dtype=torch.uint8).view(1, 3, 1, 1)
    labels = torch.zeros(1, 64, 64, dtype=torch.uint8)
    labels[:, 20:44, 20:44] = 1
    truth = data.edge_map(labels)[:, None]
    grey = torch.from_numpy(canny(rgb2gray(img[0].permute(1, 2, 0).numpy())))[None, None]
    assert edges.edge_f1(grey, truth)["f1"].item() < 0.1
    assert edges.edge_f1(edges.canny_edges(img), truth)["f1"].item() == 1.0


def _same_colour_overlap(scenes, i):
    colours = scenes.colour[i, :int(scenes.n_objects[i])].tolist()
    return len(set(colours)) < len(colours)


def test_quantised_edges_are_the_data_sets_definition(scenes):
    """Without the majority filter: scenes.edges exactly, stripes and shades ignored, unless two objects share a
    colour name (then their common boundary cannot be seen from colour)."""
    raw = edges.quantised_edges(scenes.images, majority=False)
    assert torch.equal(raw, edges.quantised_edges(scenes.images_float(), majority=False))  # uint8 or [-1, 1] floats
    distinct = [i for i in range(len(scenes)) if not _same_colour_overlap(scenes, i)]
    assert len(distinct) > 40 and any(bool((scenes.fill[i] == 1).any()) for i in distinct)
    assert torch.equal(raw[distinct], scenes.edges[distinct])
    # the majority filter moves a few corner pixels, never by more than one pixel
    f1 = edges.edge_f1(edges.quantised_edges(scenes.images), scenes.edges, 1)["f1"]
    assert f1[distinct].mean() > 0.99


def test_quantised_edges_survive_blur_and_noise_where_the_raw_labels_do_not(scenes):
    """A generated image is blurred and noisy: the majority filter keeps the edge map clean."""
    x = scenes.images_float()
    k = torch.tensor([1.0, 2.0, 1.0]) / 4
    blur = (k[:, None] * k[None]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)  # (3, 1, 3, 3) one kernel per channel
    noisy = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), blur, groups=3)
    noisy = (noisy + 0.04 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    filtered = edges.edge_f1(edges.quantised_edges(noisy), scenes.edges, 1)["f1"].mean()
    raw = edges.edge_f1(edges.quantised_edges(noisy, majority=False), scenes.edges, 1)["f1"].mean()
    assert filtered > 0.97 and raw < filtered - 0.03, (filtered, raw)


def test_colour_labels_name_each_object_colour(scenes):
    labels = edges.colour_labels(scenes.images, majority=False)  # (N, H, W)
    for i in range(8):
        for k in range(int(scenes.n_objects[i])):
            seen = labels[i][scenes.masks[i, k]]
            assert (seen == int(scenes.colour[i, k]) + 1).all(), (i, k, scenes.captions[i])
        assert (labels[i][~scenes.masks[i].any(0)] == 0).all()  # every background pixel is background


def test_polyline_edges_draw_unbroken_one_pixel_lines():
    square = edges.polyline_edges([[(10.5, 10.5), (20.5, 10.5), (20.5, 20.5), (10.5, 20.5)]])
    assert square.shape == (1, 1, 64, 64) and square.dtype == torch.bool
    labels = torch.zeros(1, 64, 64, dtype=torch.uint8)
    labels[0, 10:21, 10:21] = 1
    assert torch.equal(square, data.edge_map(labels)[:, None])  # a filled square's own inner boundary
    open_line = edges.polyline_edges([[(0, 5), (63.9, 5)]], closed=False)
    assert open_line[0, 0, 5].all() and open_line.sum() == 64
    for name, (control, prompt) in edges.novel_outlines().items():
        assert control.shape == (1, 1, 64, 64) and 100 < control.sum() < 400, name
        assert data.parse_prompt(prompt)["objects"], name
    with pytest.raises(ValueError, match="at least two"):
        edges.polyline_edges([[(1, 1)]])


def test_edge_f1_by_hand():
    a = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    a[0, 0, 2, 1:7] = True  # a horizontal line of 6 pixels
    shifted = torch.roll(a, 1, dims=2)  # one pixel lower
    assert edges.edge_f1(a, a, 0)["f1"].item() == 1.0
    assert edges.edge_f1(shifted, a, 0)["f1"].item() == 0.0
    assert edges.edge_f1(shifted, a, 1)["f1"].item() == 1.0
    half = a.clone()
    half[0, 0, 2, 4:7] = False  # 3 of the 6 pixels
    r = edges.edge_f1(half, a, 0)
    assert r["precision"].item() == 1.0 and r["recall"].item() == 0.5
    assert r["f1"].item() == pytest.approx(2 / 3)
    empty = torch.zeros_like(a)
    assert edges.edge_f1(empty, empty)["f1"].item() == 1.0
    assert edges.edge_f1(empty, a)["f1"].item() == 0.0 and edges.edge_f1(a, empty)["f1"].item() == 0.0


def test_dilate_is_a_chessboard_ball():
    e = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    e[0, 0, 4, 4] = True
    assert edges.dilate(e, 1).sum() == 9 and edges.dilate(e, 2).sum() == 25 and torch.equal(edges.dilate(e, 0), e)


def test_resize_keeps_thin_lines():
    big = torch.zeros(1, 1, 512, 512, dtype=torch.bool)
    big[0, 0, 100, :] = True  # one pixel wide, all the way across
    small = edges.resize_edges(big, 64)
    assert small.shape == (1, 1, 64, 64) and small[0, 0, 100 // 8].all() and small.sum() == 64
    assert edges.resize_edges(small, 128).shape == (1, 1, 128, 128)


def test_photo_control_from_a_real_photograph():
    photos = edges.photographs()
    for name in ("astronaut", "camera"):  # RGB and grey
        c = edges.photo_control(photos[name]())
        assert c.shape == (1, 1, 64, 64) and c.dtype == torch.bool
        assert 0.03 < c.float().mean() < 0.4, name  # an outline, not noise and not nothing
    with pytest.raises(ValueError, match="photo must be"):
        edges.photo_control(np.zeros((4, 4, 4, 4)))


def test_to_control_and_clear_errors(scenes):
    like = torch.zeros(1, dtype=torch.float64)
    c = edges.to_control(scenes.edges[:2], like=like)
    assert c.dtype == torch.float64 and set(c.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        edges.to_control(scenes.edges[0])
    with pytest.raises(ValueError, match="differ in shape"):
        edges.edge_f1(scenes.edges[:2], scenes.edges[:3])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        edges.canny_edges(scenes.images[0])
    with pytest.raises(ValueError, match="sigma"):
        edges.canny_edges(scenes.images[:1], sigma=0)


def test_a_placed_world_shape_is_outlined_exactly_as_its_scene():
    """shape_mask + outline give exactly the edge map of a one-object scene, the reserved heart and moon included."""
    scenes = data.generate(12, seed=4, concepts="all", object_counts=(1.0, 0.0, 0.0))
    for i in range(len(scenes)):
        mask = edges.shape_mask(data.SHAPES[int(scenes.shape[i, 0])], *scenes.centre[i, 0].tolist(),
                                float(scenes.radius[i, 0]), float(scenes.rotation[i, 0]))
        assert torch.equal(edges.outline(mask), scenes.edges[i:i + 1])
    heart, moon = (edges.outline(edges.shape_mask(s, 32, 32, 12)) for s in data.RESERVED_SHAPES)
    assert heart.any() and moon.any() and not torch.equal(heart, moon)


def test_polygon_and_ascii_masks_fill_where_they_should():
    square = edges.polygon_mask([(-1, -1), (1, -1), (1, 1), (-1, 1)], 20, 30, 5)  # pixels 15..24 x 25..34
    assert square.sum() == 100 and square[25:35, 15:25].all()
    arrow = [(-1, -0.3), (0.1, -0.3), (0.1, -0.8), (1, 0), (0.1, 0.8), (0.1, 0.3), (-1, 0.3)]  # concave
    inside = edges.polygon_mask(arrow, 32, 32, 16)
    assert inside[32, 45] and inside[32, 20] and not inside[22, 20]  # the tip, the shaft, beside the shaft
    drawn = edges.ascii_mask(["#..", "###", "..#"], 32, 32, 12)  # 3 x 3 characters over 24 x 24 pixels
    assert drawn.sum() == 5 * 64 and drawn[20:28, 20:28].all() and not drawn[20:28, 28:36].any()
    assert torch.equal(edges.ascii_mask("#..\n###\n..#", 32, 32, 12), drawn)  # one string works too
    line = edges.outline(edges.ascii_mask(["#"], 32, 32, 4))  # an 8 x 8 block: its 28-pixel ring, one pixel wide
    assert line.sum() == 28 and not line[0, 0, 30:34, 30:34].any()


def test_placed_outlines_reject_bad_input_clearly():
    with pytest.raises(ValueError, match="unknown shape 'hexagon'.*heart, moon"):
        edges.shape_mask("hexagon", 32, 32, 10)
    with pytest.raises(ValueError, match="radius must be positive"):
        edges.shape_mask("heart", 32, 32, 0)
    with pytest.raises(ValueError, match="same length"):
        edges.ascii_mask(["##", "###"], 32, 32, 10)
    with pytest.raises(ValueError, match=r"use '#'.*\['x'\]"):
        edges.ascii_mask(["#x"], 32, 32, 10)
    with pytest.raises(ValueError, match="at least three"):
        edges.polygon_mask([(0, 0), (1, 1)], 32, 32, 10)
    with pytest.raises(ValueError, match="empty.*Move it"):
        edges.outline(edges.shape_mask("circle", 200, 32, 10))  # entirely outside the image
    with pytest.raises(ValueError, match="must be 64 x 64"):
        edges.outline(torch.ones(32, 32, dtype=torch.bool))


def test_object_at_finds_the_evaluators_object_over_a_region():
    from course_lib.viz.controlnet import object_at

    region = edges.shape_mask("square", 20, 20, 8)  # about 14 x 14 pixels round (20, 20)
    cells = torch.zeros(32, 32, dtype=torch.bool)
    cells[4:16, 4:16] = True  # pixels 8..31: covers the region
    far = torch.zeros(32, 32, dtype=torch.bool)
    far[24:30, 24:30] = True
    found, cover = object_at([{"shape": "circle", "pixels": far}, {"shape": "square", "pixels": cells}], region)
    assert found["shape"] == "square" and cover == 1.0
    assert object_at([{"shape": "circle", "pixels": far}], region) == (None, 0.0)
    with pytest.raises(ValueError, match="region is empty"):
        object_at([], torch.zeros(64, 64, dtype=torch.bool))
