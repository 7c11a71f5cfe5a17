"""Saving and loading: round trips, model cards, and clear errors for missing, damaged or mismatched files."""

import json
import pickle

import pytest
import torch

from course_lib.vae import VAE, VAEConfig
from course_lib.evaluator import load_evaluator
from course_lib.weights import (WEIGHTS_DIR, WeightsError, load_clip, load_model, load_unet,
                                load_vae, read_card, save_model)

TINY = VAEConfig(block_channels=(8, 8, 8, 8), layers_per_block=1, norm_groups=4)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = VAE(TINY).eval()
    save_model(model, "vae", TINY, {"data": {"seed": 0}, "steps": 1, "metrics": {}}, tmp_path)
    return model, tmp_path


def test_round_trip_gives_identical_outputs(saved):
    model, d = saved
    loaded = load_vae(d)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.decode(model.encode(x).mode()), loaded.decode(loaded.encode(x).mode()))
    assert loaded.config == TINY and not loaded.training
    card = read_card("vae", d)
    for key in ("config", "sha256", "num_parameters", "versions", "steps", "data"):
        assert key in card


def test_saving_is_bit_reproducible(saved, tmp_path):
    """The same model saved again gives the same bytes (safetensors' own header order varies per call)."""
    model, d = saved
    first = (d / "vae.safetensors").read_bytes()
    for i in range(8):
        save_model(model, "vae", TINY, {"data": {"seed": 0}, "steps": 1, "metrics": {}}, tmp_path / str(i))
        assert (tmp_path / str(i) / "vae.safetensors").read_bytes() == first
    n = int.from_bytes(first[:8], "little")
    header = json.loads(first[8:8 + n])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert n % 8 == 0


def test_loading_follows_the_requested_dtype(saved):
    _, d = saved
    assert next(load_vae(d, dtype=torch.float64).parameters()).dtype == torch.float64


def test_missing_files_say_how_to_recreate_them(saved):
    _, d = saved
    with pytest.raises(FileNotFoundError, match="course_lib.train --only unet"):
        load_unet(d)
    (d / "vae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="--only vae"):
        load_vae(d)


def test_damaged_tensor_file_is_caught_by_the_checksum(saved):
    _, d = saved
    raw = bytearray((d / "vae.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (d / "vae.safetensors").write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="checksum"):
        load_vae(d)


def test_garbage_and_pickles_are_refused_without_unpickling(saved):
    _, d = saved
    card = json.loads((d / "vae.json").read_text())
    card.pop("sha256")  # even without a checksum, a non-safetensors file is refused
    (d / "vae.json").write_text(json.dumps(card))
    (d / "vae.safetensors").write_bytes(pickle.dumps({"encoder.conv_in.weight": [1.0]}))
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_vae(d)


def test_card_that_does_not_fit_the_tensors(saved):
    _, d = saved
    card = json.loads((d / "vae.json").read_text())
    card["config"]["block_channels"] = [16, 16, 16, 16]
    (d / "vae.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="do not fit"):
        load_vae(d)
    card["config"]["colour_depth"] = 3
    (d / "vae.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="colour_depth"):
        load_vae(d)
    (d / "vae.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_vae(d)


def test_card_of_another_model_is_refused(saved):
    _, d = saved
    (d / "unet.json").write_text((d / "vae.json").read_text())
    with pytest.raises(WeightsError, match="not a model card for 'unet'"):
        load_unet(d)


def test_shipped_weights_are_small_and_load():
    names = ("vae", "clip", "unet", "evaluator")
    total = sum((WEIGHTS_DIR / f"{n}.safetensors").stat().st_size for n in names)
    assert total <= 30 * 2**20
    for loader in (load_vae, load_clip, load_unet, load_evaluator):
        model = loader()
        for key in ("config", "data", "steps", "loss", "metrics", "wall_time_s", "device", "versions"):
            assert key in model.card, (loader.__name__, key)
