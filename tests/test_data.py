"""The procedural data set: determinism, captions that match their scenes, edges on boundaries, clear errors."""

import pytest
import torch

from course_lib import data


@pytest.fixture(scope="module")
def scenes():
    return data.generate(600, seed=3)


def test_shapes_and_dtypes(scenes):
    assert scenes.images.shape == (600, 3, 64, 64) and scenes.images.dtype == torch.uint8
    assert scenes.edges.shape == (600, 1, 64, 64) and scenes.edges.dtype == torch.bool
    assert len(scenes.captions) == 600
    assert set(scenes.n_objects.unique().tolist()) == {1, 2}


def test_deterministic_from_seed_and_split():
    a, b = data.generate(50, seed=7), data.generate(50, seed=7)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    c = data.generate(50, seed=8)
    assert not torch.equal(a.images, c.images)
    held = data.generate(50, seed=7, split="heldout")
    assert not torch.equal(a.images, held.images)


def test_prefix_stability_is_not_assumed_but_chunks_agree():
    # Scenes are rendered in chunks; a batch larger than one chunk must equal its parts drawn at once.
    attrs = data.sample_attributes(10, seed=1)
    whole, _ = data.render(attrs)
    part, _ = data.render({k: v[5:] for k, v in attrs.items()})
    assert torch.equal(whole[5:], part)


def test_every_caption_agrees_with_its_attributes(scenes):
    for i in range(len(scenes)):
        parsed = data.parse_caption(scenes.captions[i])
        truth = scenes.attributes(i)
        assert parsed["objects"] == truth["objects"], scenes.captions[i]
        if parsed["background"] is not None:
            assert parsed["background"] == truth["background"]


def test_captions_use_several_phrasings(scenes):
    starts = {c.split()[0] for c in scenes.captions}
    assert len(starts) >= 3
    assert any("background" in c for c in scenes.captions) and any("background" not in c for c in scenes.captions)


def test_colours_drawn_where_attributes_say(scenes):
    # The pixel at each one-object scene's position centre has that object's colour.
    for i in range(200):
        if int(scenes.n_objects[i]) != 1:
            continue
        attrs = scenes.attributes(i)
        obj = attrs["objects"][0]
        x, y = data.POSITION_XY[obj["position"]]
        got = tuple(scenes.images[i, :, y, x].tolist())
        assert got == data.COLOUR_RGB[obj["colour"]], (scenes.captions[i], got)
        corner = tuple(scenes.images[i, :, 0, 0].tolist()) if obj["position"] != "top left" else tuple(scenes.images[i, :, 63, 63].tolist())
        assert corner == data.BACKGROUND_RGB[attrs["background"]]


def test_every_attribute_value_occurs():
    s = data.generate(2000, seed=0)
    for name, vocab in data.ATTRIBUTES.items():
        values = getattr(s, name)[:, 0]
        assert set(values.tolist()) == set(range(len(vocab))), name
    assert set(s.background.tolist()) == set(range(len(data.BACKGROUNDS)))
    assert set(s.size[:, 0].tolist()) == {0, 1}


def test_two_object_scenes_do_not_overlap(scenes):
    two = scenes.n_objects == 2
    assert two.any()
    p = scenes.position[two]
    assert (p[:, 0] != p[:, 1]).all()
    assert (p < 4).all(), "two-object scenes use the four corners only"


def test_edges_lie_on_shape_boundaries(scenes):
    images = scenes.images.long()
    for i in range(100):
        edge = scenes.edges[i, 0]
        assert edge.any()
        img = images[i]
        ys, xs = edge.nonzero(as_tuple=True)
        bg = torch.tensor(data.BACKGROUND_RGB[data.BACKGROUNDS[int(scenes.background[i])]])
        for y, x in zip(ys.tolist(), xs.tolist()):
            here = img[:, y, x]
            assert not torch.equal(here, bg), "an edge pixel lies on the background"
            neighbours = [(y + dy, x + dx) for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))]
            outside = [(a, b) for a, b in neighbours if not (0 <= a < 64 and 0 <= b < 64) or not torch.equal(img[:, a, b], here)]
            assert outside, "an edge pixel has no neighbour outside its shape"
        # and every boundary pixel of the drawn shapes is an edge
        fg = (img != bg[:, None, None]).any(0)
        inner = fg.clone()
        inner[1:-1, 1:-1] &= fg[:-2, 1:-1] & fg[2:, 1:-1] & fg[1:-1, :-2] & fg[1:-1, 2:]
        inner[0, :] = inner[-1, :] = inner[:, 0] = inner[:, -1] = False
        boundary = fg & ~inner
        assert (boundary & ~edge).sum() == 0


def test_dataset_items():
    ds = data.ShapesDataset(8, seed=1, split="heldout")
    item = ds[3]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["edges"].shape == (1, 64, 64)
    assert item["caption"] == ds.scenes.captions[3]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 64, 64) and len(batch["caption"]) == 4
    with pytest.raises(IndexError):
        ds[8]


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "positive integer"),
    (dict(n=2.5), "positive integer"),
    (dict(n=4, seed=-1), "non-negative"),
    (dict(n=4, split="test"), "split must be one of"),
    (dict(n=4, two_object_fraction=1.5), "two_object_fraction"),
])
def test_bad_arguments_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.generate(**kwargs)


def test_parse_caption_rejects_foreign_text():
    with pytest.raises(ValueError, match="not a caption"):
        data.parse_caption("a photograph of a cat")


def test_vocabulary_covers_every_caption(scenes):
    vocab = set(data.caption_vocabulary())
    for c in scenes.captions:
        assert set(c.replace(",", " ").split()) <= vocab
