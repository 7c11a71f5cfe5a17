"""The procedural world: determinism, scenes that are distributions, partial captions in ordinary words that
the one prompt parser reads back exactly, masks and edges that agree with the pixels, clear errors."""

import math
import random

import pytest
import torch

from course_lib import data


@pytest.fixture(scope="module")
def scenes():
    return data.generate(1500, seed=3)


@pytest.fixture(scope="module")
def all_concepts():
    return data.generate(1500, seed=3, concepts="all")


def test_shapes_and_dtypes(scenes):
    n = len(scenes)
    assert scenes.images.shape == (n, 3, 64, 64) and scenes.images.dtype == torch.uint8
    assert scenes.edges.shape == (n, 1, 64, 64) and scenes.edges.dtype == torch.bool
    assert scenes.masks.shape == (n, 3, 64, 64) and scenes.masks.dtype == torch.bool
    assert len(scenes.captions) == n
    assert set(scenes.n_objects.unique().tolist()) == {1, 2, 3}
    filled = torch.arange(3)[None] < scenes.n_objects[:, None]
    for name in data.ATTRIBUTES:
        t = getattr(scenes, name)
        assert ((t >= 0) == filled).all(), name


def test_deterministic_from_seed_split_and_concepts():
    a, b = data.generate(50, seed=7), data.generate(50, seed=7)
    assert torch.equal(a.images, b.images) and a.captions == b.captions and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, data.generate(50, seed=8).images)
    assert not torch.equal(a.images, data.generate(50, seed=7, split="heldout").images)
    assert a.captions != data.generate(50, seed=7, concepts="all").captions


def test_rendering_in_chunks_agrees_with_rendering_at_once():
    attrs = data.sample_attributes(10, seed=1)
    whole = data.render(attrs)
    part = data.render({k: v[5:] for k, v in attrs.items()})
    for w, p in zip(whole, part):
        assert torch.equal(w[5:], p)


def test_reserved_concepts_never_in_training_but_drawn_on_request(scenes, all_concepts):
    for name, reserved in (("shape", data.RESERVED_SHAPES), ("colour", data.RESERVED_COLOURS)):
        vocab = data.ATTRIBUTES[name]
        ids = [vocab.index(w) for w in reserved]
        train_values = set(getattr(scenes, name)[getattr(scenes, name) >= 0].tolist())
        all_values = set(getattr(all_concepts, name)[getattr(all_concepts, name) >= 0].tolist())
        assert not train_values & set(ids)
        assert set(ids) <= all_values
        assert all_values == set(range(len(vocab)))
    words = {w for c in scenes.captions for w in data.normalise(c)}
    assert not words & {"heart", "moon", "brown"}


def test_every_caption_reads_back_as_what_it_says(all_concepts):
    for i in range(len(all_concepts)):
        assert data.parse_prompt(all_concepts.captions[i]) == all_concepts.described(i), all_concepts.captions[i]


def test_what_a_caption_says_is_true_of_its_scene(scenes):
    for i in range(len(scenes)):
        truth, said = scenes.attributes(i), scenes.described(i)
        assert said["background"] in (None, truth["background"])
        for obj, true_obj in zip(said["objects"], truth["objects"]):
            assert all(true_obj[k] == v for k, v in obj.items())


def test_captions_leave_things_out_and_vary(scenes):
    objects = [o for i in range(len(scenes)) for o in scenes.described(i)["objects"]]
    share = {name: sum(name in o for o in objects) / len(objects) for name in ("colour", "size", "position")}
    # Each attribute is often named and often not (rates set by data.MENTION_PROBS).
    for name, rate in share.items():
        assert abs(rate - data.MENTION_PROBS[name]) < 0.05, (name, rate)
    words = {w for c in scenes.captions for w in data.normalise(c)}
    for synonyms in (("small", "little", "tiny"), ("large", "big", "huge"), ("centre", "center", "middle"),
                     ("grey", "gray"), ("coloured", "colored"), ("top", "upper"), ("bottom", "lower")):
        assert set(synonyms) <= words, synonyms
    assert any(c != c.lower() for c in scenes.captions) and any(c.endswith((".", "!")) for c in scenes.captions)
    assert len(set(scenes.captions)) > 0.95 * len(scenes)


def test_one_caption_fits_many_images():
    # Same described content, different pixels: position, size, rotation and shade are continuous.
    s = data.generate(4000, seed=5)
    groups = {}
    for i in range(len(s)):
        d = s.described(i)
        if len(d["objects"]) == 1 and d["background"] is None:
            groups.setdefault(data.template_caption(d), []).append(i)
    big = max(groups.values(), key=len)
    assert len(big) >= 6
    imgs = s.images[big].float()
    assert (imgs[1:] - imgs[:1]).abs().mean(dim=(1, 2, 3)).min() > 1.0  # no two alike
    assert s.centre[big, 0].std(0).min() > 2.0  # positions spread (within a region when one is named)
    assert s.radius[big, 0].std() > 1.0


def test_positions_and_sizes_fall_in_their_named_region_and_class(scenes):
    filled = scenes.shape >= 0
    col = (scenes.centre[..., 0] // data.CELL).long()
    row = (scenes.centre[..., 1] // data.CELL).long()
    assert torch.equal((row * 3 + col)[filled], scenes.position[filled])
    for s, (lo, hi) in enumerate(data.SIZE_RANGES.values()):
        r = scenes.radius[filled & (scenes.size == s)]
        assert r.min() >= lo and r.max() <= hi
    rot = scenes.rotation[filled]
    assert rot.abs().max() <= data.MAX_ROTATION and rot.std() > 0.2


def test_masks_hold_the_objects_pixels(scenes):
    filled = scenes.shape >= 0
    area = scenes.masks.sum((2, 3))
    assert (area[~filled] == 0).all()
    # Masks of one scene never overlap: a pixel shows one object.
    assert (scenes.masks.sum(1) <= 1).all()
    # A plain object's pixels are its colour's shade: within the shade range of the colour's centre.
    for i in range(200):
        for k in range(int(scenes.n_objects[i])):
            m = scenes.masks[i, k]
            if m.sum() < 5 or scenes.fill[i, k] != 0:
                continue
            rgb = scenes.images[i][:, m].float().mean(1)
            ref = torch.tensor(data.COLOUR_RGB[data.COLOURS[int(scenes.colour[i, k])]]).float()
            lo, hi = data.SHADE_BRIGHTNESS
            bound = ref * max(1 - lo, hi - 1) + data.SHADE_CHANNEL + 1
            assert ((rgb - ref).abs() <= bound).all(), (i, k, rgb, ref)
    # Background pixels are not any object's.
    bg = ~scenes.masks.any(1)
    assert bg.float().mean() > 0.6


def test_edges_are_the_inner_boundary_of_the_masks(scenes):
    labels = (scenes.masks * torch.arange(1, 4).view(1, 3, 1, 1)).sum(1).to(torch.uint8)
    assert torch.equal(data.edge_map(labels)[:, None], scenes.edges)
    assert (scenes.edges & ~scenes.masks.any(1, keepdim=True)).sum() == 0


def test_every_shape_is_drawn_with_a_sensible_area():
    # Unit shapes at radius 12, no rotation, centred: area between a third of and the full bounding box.
    shapes = torch.arange(len(data.SHAPES))
    masks = data.shape_masks(shapes, torch.full((len(shapes), 2), 32.0), torch.full((len(shapes),), 12.0),
                             torch.zeros(len(shapes)))
    area = masks.sum((1, 2)).float()
    assert ((area > 0.2 * 24 * 24) & (area < 24 * 24 * 1.01)).all(), dict(zip(data.SHAPES, area.tolist()))
    assert len({tuple(m.flatten().nonzero().flatten().tolist()) for m in masks}) == len(shapes)


def test_dataset_items():
    ds = data.ShapesDataset(8, seed=2)
    item = ds[3]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["edges"].shape == (1, 64, 64) and item["caption"] == ds.scenes.captions[3]
    with pytest.raises(IndexError):
        ds[8]


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "positive integer"), (dict(n=2.5), "positive integer"), (dict(n=4, seed=-1), "non-negative"),
    (dict(n=4, split="test"), "split must be one of"), (dict(n=4, concepts="new"), "concepts must be one of"),
    (dict(n=4, object_counts=(0.5, 0.5)), "object_counts"), (dict(n=4, object_counts=(0.5, 0.6, 0.1)), "object_counts"),
])
def test_bad_arguments_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.generate(**kwargs)


@pytest.mark.parametrize("described, message", [
    ({"objects": []}, "at least one object"),
    ({"objects": [{"colour": "red"}]}, "needs a shape"),
    ({"objects": [{"shape": "circle", "colour": "mauve"}]}, "unknown colour 'mauve'"),
    ({"objects": [{"shape": "circle", "texture": "furry"}]}, "unknown attribute 'texture'"),
    ({"objects": [{"shape": "circle"}], "background": "blue"}, "unknown background 'blue'"),
])
def test_captions_of_unknown_attributes_are_refused(described, message):
    with pytest.raises(ValueError, match=message):
        data.caption(described)


def test_parse_prompt_ignores_case_punctuation_and_spelling():
    want = {"objects": [{"size": "small", "colour": "red", "shape": "circle", "position": "centre"}], "background": "grey"}
    for text in ("a small red circle in the centre on a grey background", "A SMALL RED CIRCLE IN THE CENTER ON A GRAY BACKGROUND!",
                 "a tiny red circle in the middle, gray background.", "centre: a little red circle on grey"):
        assert data.parse_prompt(text) == want, text


def test_parse_prompt_binds_attributes_to_their_own_object():
    got = data.parse_prompt("a red circle, small, top left and a big blue square on the right")
    assert got["objects"] == [{"colour": "red", "shape": "circle", "size": "small", "position": "top left"},
                              {"size": "large", "colour": "blue", "shape": "square", "position": "right"}]
    got = data.parse_prompt("bottom left: a green star with a striped yellow ring")
    assert got["objects"] == [{"position": "bottom left", "colour": "green", "shape": "star"},
                              {"fill": "striped", "colour": "yellow", "shape": "ring"}]


@pytest.mark.parametrize("text, error, message", [
    ("", ValueError, "holds no words"), ("  ...  ", ValueError, "holds no words"),
    ("a red thing", ValueError, "names no shape"), ("a red blue circle", ValueError, "two colours"),
    (42, TypeError, "a prompt is a string"),
])
def test_parse_prompt_errors(text, error, message):
    with pytest.raises(error, match=message):
        data.parse_prompt(text)


def test_unknown_words_are_named():
    assert data.unknown_words("a red circel, fluffy and red") == ["circel", "fluffy"]
    assert data.unknown_words("A Red Circle!") == []


def test_template_caption_reads_back():
    rng = random.Random(0)
    for _ in range(300):
        obj = {"shape": rng.choice(data.SHAPES)}
        for name in ("colour", "size", "position", "fill"):
            if rng.random() < 0.5:
                obj[name] = rng.choice(data.ATTRIBUTES[name])
        d = {"objects": [obj], "background": rng.choice((None,) + data.BACKGROUNDS)}
        assert data.parse_prompt(data.template_caption(d)) == d


def test_vocabulary_covers_every_caption(all_concepts):
    vocab = set(data.caption_vocabulary())
    assert all(set(data.normalise(c)) <= vocab for c in all_concepts.captions)
    assert math.isclose(sum(data.OBJECT_COUNT_PROBS), 1.0)


def test_shape_twins_differ_only_in_the_first_objects_shape():
    a, b = data.shape_twins(64, seed=3)
    assert (a.shape[:, 0] != b.shape[:, 0]).all()
    assert (a.shape[:, 1:] == b.shape[:, 1:]).all()
    assert set(b.shape[:, 0].tolist()) <= {data.SHAPES.index(s) for s in data.TRAIN_SHAPES}
    for name in ("colour", "size", "position", "fill", "background", "centre", "radius", "rotation"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for i in range(len(a)):
        wa, wb = data.normalise(a.captions[i]), data.normalise(b.captions[i])
        changed = [(x, y) for x, y in zip(wa, wb) if x != y]
        assert len(wa) == len(wb) and len(changed) == 1, (a.captions[i], b.captions[i])
        assert changed[0] == (data.SHAPES[int(a.shape[i, 0])], data.SHAPES[int(b.shape[i, 0])])
        pa, pb = data.parse_prompt(a.captions[i]), data.parse_prompt(b.captions[i])
        assert pa["objects"][1:] == pb["objects"][1:] and pa["background"] == pb["background"]
    # The pixels differ only where the first object is drawn in either scene.
    first = a.masks[:, 0] | b.masks[:, 0]
    assert ((a.images != b.images).any(1) <= first).all()


def test_the_largest_objects_are_drawn_whole():
    """Every shape at the largest radius and the largest turn fits the window it is drawn in."""
    attrs = data.sample_attributes(2 * len(data.SHAPES), seed=0, concepts="all", object_counts=(1, 0, 0))
    attrs["shape"][:, 0] = torch.arange(len(data.SHAPES)).repeat(2)
    attrs["radius"][:, 0] = max(hi for _, hi in data.SIZE_RANGES.values())
    attrs["rotation"][:, 0] = torch.tensor([data.MAX_ROTATION, -data.MAX_ROTATION]).repeat_interleave(len(data.SHAPES))
    attrs["centre"][:, 0] = torch.tensor([32.3, 31.6])
    scenes = data.scenes_from_attributes(attrs)
    full = data.shape_masks(scenes.shape[:, 0], scenes.centre[:, 0], scenes.radius[:, 0], scenes.rotation[:, 0])
    assert torch.equal(scenes.masks[:, 0], full)
