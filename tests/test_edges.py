"""Edge maps for ControlNet: Canny and the scenes' own edges agree, edge F1 means what it says, photos become controls."""

import numpy as np
import pytest
import torch

from course_lib import data, edges


@pytest.fixture(scope="module")
def scenes():
    return data.generate(48, seed=5, split="heldout")


def test_canny_on_a_rendered_scene_finds_its_own_edge_map(scenes):
    canny = edges.canny_edges(scenes.images)
    assert canny.shape == scenes.edges.shape and canny.dtype == torch.bool
    f1 = edges.edge_f1(canny, scenes.edges, tolerance=1)["f1"]
    assert f1.min() > 0.97 and f1.mean() > 0.99  # the two ways of drawing a control agree within a pixel
    exact = edges.edge_f1(canny, scenes.edges, tolerance=0)["f1"]
    assert exact.mean() < 0.9  # ... but not pixel for pixel: Canny puts some edges just outside the shape


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


def test_quantised_edges_are_the_data_sets_definition(scenes):
    assert torch.equal(edges.quantised_edges(scenes.images), scenes.edges)
    assert torch.equal(edges.quantised_edges(scenes.images_float()), scenes.edges)  # uint8 or [-1, 1] floats


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
