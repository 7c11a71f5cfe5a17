"""The evaluator: targets, crops, grouping, reading objects, prompt adherence, and the trained evaluator's accuracy.

Two kinds of test. The first kind needs no trained weights: targets and crops come from the scenes' masks,
and an *oracle* (an Evaluator whose stage 1 predicts the true cells and whose stage 2 reads the true
attributes of the object a group covers) checks how objects are grouped and read and how prompts are
matched, so a failure there is the reading logic's, never the network's. The second kind holds the shipped
evaluator (``weights/evaluator.*``) to its bars on 2,000 held-out scenes of every concept: at least 96% per
attribute, and real scenes confirm their own captions at least 94% of the time (its model card: shape 96.9%,
size 97.6%, the others 99.2-100%; own captions 95.5%. Shape is the hardest attribute: partly hidden objects
and small crosses and stars).
"""

import math
from pathlib import Path

import pytest
import torch

from course_lib import data
from course_lib.evaluator import (CROP, HEAD_SIDE, MIN_VISIBLE, OFFSET_SCALE, Evaluator, EvaluatorConfig,
                                  attribute_accuracy, crop_targets, group_objects, load_evaluator, make_crops,
                                  merge_same_objects, prompt_adherence, readable_objects, slot_labels, targets,
                                  true_objects, visible_fraction)

ROOT = Path(__file__).resolve().parents[1]
TINY = EvaluatorConfig(channels=(4, 4, 4), hidden=4, crop_channels=(4, 4, 4, 4), crop_hidden=4)


class Oracle(Evaluator):
    """An evaluator that 'sees' the truth: stage 1 predicts the true cells of known scenes, stage 2 reads
    the true attributes (and centre) of the object that most of a group's cells belong to."""

    def __init__(self, scenes: data.Scenes):
        super().__init__(TINY)
        self.scenes = scenes
        self.rows = []

    def predict_pixels(self, images, batch_size=256):
        self.rows = [int((self.scenes.images_float() == im).flatten(1).all(1).nonzero()[0]) for im in images]
        t = targets(self.scenes, torch.tensor(self.rows))
        return {"object": t["object"] > 0, "background": t["background"], "colour": t["colour"].clamp(min=0)}

    def read_groups(self, images, groups, batch_size=512):
        labels = slot_labels(self.scenes.masks[torch.tensor(self.rows)])
        out = []
        for b, gs in enumerate(groups):
            row = self.rows[b]
            read = []
            for g in gs:
                k = int(torch.bincount(labels[b][g["pixels"]], minlength=4)[1:].argmax())
                truth = self.scenes.attributes(row)["objects"][k]
                read.append({**g, **{n: truth[n] for n in ("shape", "size", "position", "fill")},
                             "centre": tuple(self.scenes.centre[row, k].tolist())})
            out.append(read)
        return out


def touching_same_colour(scenes: data.Scenes) -> torch.Tensor:
    """(N, K) bool: the object touches (8-neighbour cells) another object of its colour, so that grouping
    cells by colour joins the two."""
    labels = slot_labels(scenes.masks)  # (N, 32, 32)
    cells = torch.stack([labels == k + 1 for k in range(3)], 1)  # (N, K, 32, 32)
    grown = torch.nn.functional.max_pool2d(cells.float(), 3, 1, 1) > 0
    out = torch.zeros(scenes.shape.shape, dtype=torch.bool)
    for k in range(3):
        for j in range(3):
            if j != k:
                same = (scenes.colour[:, k] == scenes.colour[:, j]) & (scenes.shape[:, j] >= 0)
                out[:, k] |= same & (grown[:, k] & cells[:, j]).flatten(1).any(1)
    return out


def trained_evaluator():
    return load_evaluator()  # weights/evaluator.*; a missing or mismatched file raises an error saying how to retrain


@pytest.fixture(scope="module")
def heldout():
    return data.generate(2000, seed=0, split="heldout", concepts="all")


@pytest.fixture(scope="module")
def small():
    return data.generate(64, seed=3, split="heldout", concepts="all")


def one_object(shape: str, colour: str, **fixed) -> data.Scenes:
    """A scene of one object, drawn from the world with its shape and colour (and anything in ``fixed``) set.
    Position and size decide the centre and radius when they are drawn, so the scene is drawn again (next seed)
    until those match ``fixed``; shape and colour change nothing else and are set afterwards."""
    for seed in range(11, 1011):
        attrs = data.sample_attributes(1, seed=seed, object_counts=(1.0, 0.0, 0.0))
        if all(int(attrs[name][0, 0]) == data.ATTRIBUTES[name].index(value) for name, value in fixed.items()):
            break
    else:
        raise AssertionError(f"no scene with {fixed} in 1000 draws")
    attrs["shape"][0, 0] = data.SHAPES.index(shape)
    attrs["colour"][0, 0] = data.COLOURS.index(colour)
    return data.scenes_from_attributes(attrs)


# --- Targets and reading, with no trained weights. -----------------------------------------------------

def test_targets_label_each_object_pixel_with_its_own_colour(small):
    t = targets(small)
    assert t["object"].shape == (64, HEAD_SIDE, HEAD_SIDE) and t["colour"].dtype == torch.long
    labels = slot_labels(small.masks)
    assert torch.equal(t["object"] > 0, labels > 0)
    assert (t["colour"][labels == 0] == -1).all()  # background cells carry no colour
    for i in range(8):
        for k in range(int(small.n_objects[i])):
            assert (t["colour"][i][labels[i] == k + 1] == small.colour[i, k]).all()
    # Majority of each 2x2 block: a block fully inside an object is that object's.
    full = small.masks.view(64, 3, HEAD_SIDE, 2, HEAD_SIDE, 2).all(5).all(3)  # (N, K, 32, 32)
    for k in range(3):
        assert (labels[full[:, k]] == k + 1).all()


def test_crops_are_centred_where_asked_and_padded_by_the_border():
    images = torch.arange(64.0).view(1, 1, 1, 64).expand(2, 3, 64, 64).clone()  # each pixel holds its x
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[:, 10, 20] = True
    crops = make_crops(images, masks, torch.tensor([[20, 10], [2, 60]]))
    assert crops.shape == (2, 4, CROP, CROP)
    assert crops[0, 0, 0, CROP // 2] == 20 and crops[0, 3, CROP // 2, CROP // 2] == 1  # the centre pixel is the origin
    assert crops[0, 3].sum() == 1
    assert crops[1, 0, 0, 0] == 0 and crops[1, 0, 0, -1] == 2 + CROP // 2 - 1  # left of the image: its border repeated
    assert crops[1, 3].sum() == 0  # the mask is padded with nothing


def test_crop_targets_point_from_the_crop_centre_to_the_true_centre(small):
    objects = readable_objects(small)
    assert len(objects) > 0 and (visible_fraction(small)[objects[:, 0], objects[:, 1]] >= MIN_VISIBLE).all()
    g = torch.Generator().manual_seed(0)
    crops, tgt = crop_targets(small, objects, small.images_float()[objects[:, 0]], g, jitter=0.0, degrade=False)
    assert crops.shape == (len(objects), 4, CROP, CROP)
    for name in ("shape", "size", "fill"):
        assert torch.equal(tgt[name], getattr(small, name)[objects[:, 0], objects[:, 1]])
    # Without jitter, the crop centre is the mask's centroid: a pixel or so from the true centre of a whole
    # symmetric shape (circle, square, ring, star, cross; a triangle's or a moon's centroid lies off its centre).
    symmetric = torch.tensor([data.SHAPES.index(n) for n in ("circle", "square", "ring", "star", "cross")])
    lone = ((small.n_objects[objects[:, 0]] == 1) & (visible_fraction(small)[objects[:, 0], objects[:, 1]] > 0.99)
            & torch.isin(small.shape[objects[:, 0], objects[:, 1]], symmetric))
    assert lone.any() and (tgt["offset"][lone].abs() * OFFSET_SCALE).max() < 2.5
    # The mask channel is the object's own cells: the crop centre lies on it for a convex, unhidden shape.
    for j in lone.nonzero().squeeze(1).tolist():
        if small.shape[objects[j, 0], objects[j, 1]] in (0, 1):  # circle, square
            assert crops[j, 3, CROP // 2, CROP // 2] == 1
    # Degraded masks differ from the plain ones, but never become empty.
    crops2, _ = crop_targets(small, objects, small.images_float()[objects[:, 0]], g, jitter=2.0, degrade=True)
    assert (crops2[:, 3].flatten(1).sum(1) > 0).all() and not torch.equal(crops2[:, 3], crops[:, 3])


def test_grouping_splits_by_colour_and_connectivity_and_merging_joins_one_object():
    obj = torch.zeros(1, HEAD_SIDE, HEAD_SIDE, dtype=torch.bool)
    colour = torch.zeros(1, HEAD_SIDE, HEAD_SIDE, dtype=torch.long)
    obj[0, 2:6, 2:6] = True  # red block ...
    obj[0, 2:6, 6:10] = True  # ... touching a blue block
    colour[0, 2:6, 6:10] = data.COLOURS.index("blue")
    obj[0, 20:24, 20:24] = True  # a second red block, apart
    obj[0, 30, 30] = True  # one stray cell: too small
    groups = group_objects({"object": obj, "colour": colour}, min_pixels=4)[0]
    assert sorted((g["colour"], int(g["pixels"].sum())) for g in groups) == [("blue", 16), ("red", 16), ("red", 16)]
    reads = [{**g, "shape": "circle", "size": "small", "position": "top", "fill": "plain"} for g in groups]
    merged = merge_same_objects([reads])[0]  # the two red groups read as one red circle: one object
    assert sorted((o["colour"], int(o["pixels"].sum())) for o in merged) == [("blue", 16), ("red", 32)]
    next(r for r in reads if r["colour"] == "red")["shape"] = "square"  # a red square and a red circle: two objects
    assert len(merge_same_objects([reads])[0]) == 3


def test_visible_fraction_is_one_for_a_lone_object_and_drops_when_covered(small):
    lone = data.generate(256, seed=3, split="heldout", concepts="all", object_counts=(1, 0, 0))
    inside = ((lone.centre[:, 0] > 18) & (lone.centre[:, 0] < 46)).all(-1)  # away from every border (a cut counts as seen)
    assert inside.sum() >= 3
    assert torch.allclose(visible_fraction(lone)[inside, 0], torch.ones(1), atol=1e-6)
    vis = visible_fraction(small)
    assert (vis[small.shape < 0] == 0).all() and (vis <= 1 + 1e-6).all()
    assert (vis[small.n_objects > 1] < 1 - 1e-3).any()  # some objects are partly covered


def test_reading_the_true_pixels_gives_the_true_objects(small):
    """Grouping and merging on perfect stage 1 cells and stage 2 readings return exactly the visible objects
    (the reading logic), except where two objects of one colour touch: grouping by colour joins them."""
    oracle = Oracle(small)
    read = oracle.read_attributes(small.images_float())
    vis = visible_fraction(small)
    touching = touching_same_colour(small)
    joined = 0
    for i, got in enumerate(read):
        truth = small.attributes(i)
        assert got["background"] == truth["background"]
        key = lambda o: tuple(sorted(o.items()))  # noqa: E731
        for k, obj in enumerate(truth["objects"]):
            if vis[i, k] >= MIN_VISIBLE and key(obj) not in {key(o) for o in got["objects"]}:
                assert touching[i, k], (i, obj, got)  # missed only when joined with a touching object of its colour
                joined += 1
        assert len(got["objects"]) <= len(truth["objects"])
    assert joined <= 2  # rare: about one scene in a hundred
    acc = attribute_accuracy(oracle, small.images_float(), small)
    assert acc["found"] == 1.0 and acc["shape"] >= 0.96 and acc["extra_per_image"] == 0.0


def test_output_layout_and_input_check():
    ev = Evaluator(EvaluatorConfig(channels=(8, 8, 8), hidden=8, crop_channels=(4, 4, 4, 4), crop_hidden=8)).eval()
    out = ev(torch.zeros(2, 3, 64, 64))
    assert out["object"].shape == (2, 32, 32) and out["colour"].shape == (2, 9, 32, 32)
    assert out["background"].shape == (2, 3) and set(out) == {"object", "colour", "background"}
    read = ev.reader(torch.zeros(5, 4, CROP, CROP))
    assert read["shape"].shape == (5, 8) and read["size"].shape == (5, 3) and read["fill"].shape == (5, 2)
    assert read["offset"].shape == (5, 2)
    assert ev.features(torch.zeros(5, 3, 64, 64)).shape == (5, 8)
    pred = ev.predict(data.generate(3, seed=1).images_float())
    assert len(pred["objects"]) == 3 and pred["object"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="64, 64"):
        ev(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="crops"):
        ev.reader(torch.zeros(2, 3, CROP, CROP))
    with pytest.raises(ValueError, match="captions"):
        prompt_adherence(torch.zeros(2, 3, 64, 64), ["a small red circle in the centre"], ev)


# --- Prompt adherence: what it accepts and what it confirms. -------------------------------------------

def test_adherence_accepts_exactly_what_parse_prompt_accepts(small):
    ev = Evaluator(TINY)
    image = small.images_float()[:1]
    texts = ["a red circle", "Top-left: a tiny striped red star!", "two circles on a gray background",
             "a purple fluffy hexagon", "", "red and blue", "a red blue circle", "!!!", "the sky at night",
             "a big small square", "a red circle on white and on black"]
    for text in texts:
        try:
            data.parse_prompt(text)
            parses = True
        except ValueError:
            parses = False
        if parses:
            assert prompt_adherence(image, [text], ev)["n"] == 1
        else:
            with pytest.raises(ValueError, match="caption 0") as err:
                prompt_adherence(image, [text], ev)
            assert repr(text) in str(err.value)  # the message names the caption
    with pytest.raises(ValueError, match="list of strings"):
        prompt_adherence(image, "a red circle", ev)
    with pytest.raises(ValueError, match="caption 0"):
        prompt_adherence(image, [None], ev)


def test_oracle_confirms_every_real_caption_and_rejects_shifted_ones(small):
    oracle, images = Oracle(small), small.images_float()
    right = prompt_adherence(images, small.captions, oracle)
    counted = (visible_fraction(small) >= MIN_VISIBLE) & ~touching_same_colour(small)
    fully_visible = [i for i in range(len(small)) if counted[i, :int(small.n_objects[i])].all()]
    assert all(right["confirmed"][i] for i in fully_visible)
    assert set(right["per_attribute"]) == {"shape", "colour", "size", "position", "fill", "background"}
    wrong = prompt_adherence(images, small.captions[1:] + small.captions[:1], oracle)
    assert wrong["adherence"] < 0.3
    # Binding: two objects with their colours swapped have every colour present but not bound.
    two = next(i for i in fully_visible if int(small.n_objects[i]) == 2
               and small.colour[i, 0] != small.colour[i, 1] and small.shape[i, 0] != small.shape[i, 1])
    a, b = small.attributes(two)["objects"]
    swapped = data.template_caption({"objects": [{"shape": a["shape"], "colour": b["colour"]},
                                                 {"shape": b["shape"], "colour": a["colour"]}], "background": None})
    res = prompt_adherence(images[two:two + 1], [swapped], oracle)
    assert res["adherence"] == 0.0 and res["binding"] == {"bound": 0.0, "present": 1.0, "n": 1}


def test_fewer_named_attributes_are_easier_to_confirm(small):
    """Per image: confirmed with every attribute named => confirmed with fewer named."""
    oracle, images = Oracle(small), small.images_float()
    full = [data.template_caption(small.attributes(i)) for i in range(len(small))]
    shapes_only = [data.template_caption({"objects": [{"shape": o["shape"]} for o in small.attributes(i)["objects"]],
                                          "background": None}) for i in range(len(small))]
    for ev in (oracle, trained_evaluator()):
        a, b = prompt_adherence(images, full, ev), prompt_adherence(images, shapes_only, ev)
        assert all(y for x, y in zip(a["confirmed"], b["confirmed"]) if x)
        assert b["adherence"] >= a["adherence"]


def test_a_red_circle_does_not_confirm_a_blue_circle():
    scene = one_object("circle", "red", size="large", position="centre")
    for ev in (Oracle(scene), trained_evaluator()):
        image = scene.images_float()
        assert prompt_adherence(image, ["a red circle"], ev)["confirmed"] == [True]
        res = prompt_adherence(image, ["a blue circle"], ev)
        assert res["confirmed"] == [False] and res["per_attribute"]["colour"] == 0.0
        assert res["per_attribute"]["shape"] == 1.0
        assert prompt_adherence(image, ["a red square"], ev)["confirmed"] == [False]
        assert prompt_adherence(image, ["a large red circle in the middle"], ev)["confirmed"] == [True]
        assert prompt_adherence(image, ["a small red circle"], ev)["confirmed"] == [False]


# --- The trained evaluator's bar. ---------------------------------------------------------------------

def test_trained_evaluator_reads_held_out_scenes(heldout):
    ev = trained_evaluator()
    images = heldout.images_float()
    acc = attribute_accuracy(ev, images, heldout)
    print("held-out accuracy:", {k: round(v, 4) for k, v in acc.items()})
    for name in ("found", "shape", "colour", "size", "position", "fill", "background"):
        assert acc[name] >= 0.96, (name, acc)
    own = prompt_adherence(images, heldout.captions, ev)
    print("adherence to own captions:", own["adherence"], own["per_attribute"], own["binding"])
    assert own["adherence"] >= 0.94
    wrong = prompt_adherence(images, heldout.captions[1:] + heldout.captions[:1], ev)
    assert wrong["adherence"] < 0.3


def test_trained_evaluator_knows_the_reserved_concepts():
    ev = trained_evaluator()
    for shape, colour in (("heart", "red"), ("moon", "blue"), ("circle", "brown")):
        scene = one_object(shape, colour, size="large")
        assert prompt_adherence(scene.images_float(), [f"a {colour} {shape}"], ev)["confirmed"] == [True], (shape, colour)


def test_true_objects_mark_mostly_hidden_ones(heldout):
    objs = true_objects(heldout.select(slice(0, 300)))
    counted = [o["counted"] for scene in objs for o in scene]
    assert counted.count(False) < 0.05 * len(counted)  # smaller objects are drawn in front: few hide
    assert sum(len(s) for s in objs) == int(heldout.n_objects[:300].sum())
    # A medium circle in front of a large square at the same centre hides most of the square.
    attrs = data.sample_attributes(1, seed=2, object_counts=(0.0, 1.0, 0.0))
    attrs["shape"][0, :2] = torch.tensor([data.SHAPES.index("square"), data.SHAPES.index("circle")])
    attrs["radius"][0, :2] = torch.tensor([12.0, 9.0])
    attrs["rotation"][0, :2] = 0.0
    attrs["centre"][0, 1] = attrs["centre"][0, 0]
    scene = data.scenes_from_attributes(attrs)
    square, circle = (2 * 0.85 * 12) ** 2, math.pi * 9**2
    assert float(visible_fraction(scene)[0, 0]) == pytest.approx((square - circle) / square, abs=0.05)
    assert [o["counted"] for o in true_objects(scene, min_visible=0.5)[0]] == [False, True]
