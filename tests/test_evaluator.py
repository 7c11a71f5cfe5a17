"""The evaluator: targets, adherence scoring, and the shipped classifier's accuracy on real scenes."""

import pytest
import torch

from course_lib import data
from course_lib.evaluator import Evaluator, EvaluatorConfig, attribute_accuracy, load_evaluator, prompt_adherence, targets


@pytest.fixture(scope="module")
def shipped():
    return load_evaluator()


@pytest.fixture(scope="module")
def heldout():
    return data.generate(256, seed=5, split="heldout")


def test_targets_put_each_object_at_its_position():
    s = data.generate(16, seed=0)
    t = targets(s)
    assert t["occupancy"].shape == (16, 5) and t["shape"].shape == (16, 5)
    assert torch.equal(t["occupancy"].sum(1).long(), s.n_objects)
    i = 0
    p = int(s.position[i, 0])
    assert t["colour"][i, p] == s.colour[i, 0] and t["shape"][i, p] == s.shape[i, 0]


def test_output_layout_and_input_check():
    ev = Evaluator(EvaluatorConfig(channels=(8, 8, 8), hidden=16)).eval()
    out = ev(torch.zeros(2, 3, 64, 64))
    assert out["occupancy"].shape == (2, 5) and out["colour"].shape == (2, 5, 5) and out["background"].shape == (2, 2)
    with pytest.raises(ValueError, match="64, 64"):
        ev(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="captions"):
        prompt_adherence(torch.zeros(2, 3, 64, 64), ["a small red circle in the centre"], ev)


def test_shipped_evaluator_is_at_least_99_percent_per_attribute(shipped, heldout):
    acc = attribute_accuracy(shipped, heldout.images_float(), heldout)
    for name in ("occupancy", "shape", "colour", "size", "background"):
        assert acc[name] >= 0.99, (name, acc)
    for name, value in shipped.card["metrics"]["heldout_accuracy"].items():
        if name != "scene":
            assert value >= 0.99, (name, value)


def test_adherence_confirms_real_scenes_and_rejects_wrong_captions(shipped, heldout):
    images = heldout.images_float()
    right = prompt_adherence(images, heldout.captions, shipped)
    assert right["adherence"] >= 0.97 and right["n"] == 256
    assert set(right["per_attribute"]) == {"position", "shape", "colour", "size", "background"}
    wrong = prompt_adherence(images, heldout.captions[1:] + heldout.captions[:1], shipped)  # shifted by one
    assert wrong["adherence"] < 0.1
    one = heldout.attributes(0)["objects"][0]
    other = dict(one, colour=next(c for c in data.COLOURS if c != one["colour"]))
    res = prompt_adherence(images[:1], [data.caption({"objects": [other], "background": None}, (0,), 0)], shipped)
    assert res["adherence"] == 0.0 and res["per_attribute"]["colour"] == 0.0
