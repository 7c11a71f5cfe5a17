"""Prompt-to-prompt (course_lib/prompt_to_prompt.py, Hertz et al. 2022) on the shipped tiny SD."""

from __future__ import annotations

import pytest
import torch

from course_lib.prompt_to_prompt import edit, token_mapper
from course_lib.tiny_sd import load_tiny_sd

SOURCE = "a large red circle in the top left"
TARGET = "a large blue circle in the top left"
STEPS = 10


@pytest.fixture(scope="module")
def sd():
    return load_tiny_sd(device="cpu")


def _noise(sd, seed=3, b=1):
    return torch.randn(sd.latent_shape(b), generator=torch.Generator().manual_seed(seed))


def test_cross_replace_zero_is_plain_generation(sd):
    noise = _noise(sd)
    r = edit(sd, SOURCE, TARGET, noise, num_steps=STEPS, cross_replace=0.0)
    plain_t = sd.generate(TARGET, num_steps=STEPS, latents=noise)
    plain_s = sd.generate(SOURCE, num_steps=STEPS, latents=noise)
    assert torch.allclose(r.target, plain_t, atol=1e-4)
    assert torch.allclose(r.source, plain_s, atol=1e-4)


def test_source_is_untouched_by_the_edit(sd):
    noise = _noise(sd)
    plain_s = sd.generate(SOURCE, num_steps=STEPS, latents=noise)
    r = edit(sd, SOURCE, TARGET, noise, num_steps=STEPS, cross_replace=1.0, self_replace=0.5, halves="both")
    assert torch.allclose(r.source, plain_s, atol=1e-4)


def test_same_prompt_full_replacement_gives_identical_images(sd):
    noise = _noise(sd)
    r = edit(sd, SOURCE, SOURCE, noise, num_steps=STEPS, cross_replace=1.0)
    assert torch.allclose(r.target, r.source, atol=1e-5)


@pytest.mark.parametrize("cross", [0.2, 0.6, 1.0])
def test_replacing_the_maps_changes_the_target(sd, cross):
    noise = _noise(sd)
    plain_t = sd.generate(TARGET, num_steps=STEPS, latents=noise)
    r = edit(sd, SOURCE, TARGET, noise, num_steps=STEPS, cross_replace=cross)
    assert (r.target - plain_t).abs().mean() > 1e-3
    # ...and draws the target closer to the source than plain regeneration does
    assert (r.target - r.source).abs().mean() < (plain_t - r.source).abs().mean()


def test_batched_edits_equal_one_at_a_time(sd):
    noise = _noise(sd, b=2)
    sources, targets = [SOURCE, "a small green square in the centre"], [TARGET, "a small green triangle in the centre"]
    both = edit(sd, sources, targets, noise, num_steps=STEPS, cross_replace=0.6)
    for i in range(2):
        one = edit(sd, sources[i], targets[i], noise[i:i + 1], num_steps=STEPS, cross_replace=0.6)
        assert torch.allclose(both.target[i:i + 1], one.target, atol=1e-4)


def test_captured_maps_have_the_documented_shapes(sd):
    noise = _noise(sd)
    r = edit(sd, SOURCE, TARGET, noise, num_steps=STEPS, cross_replace=0.5, capture=True)
    cross_layers = [name for name, m in sd.unet.named_modules() if getattr(m, "is_cross", False)]
    assert sorted(r.maps) == sorted(cross_layers)
    L = sd.tokenizer.context_length
    for name, per_step in r.maps.items():
        assert len(per_step) == STEPS
        for probs in per_step:
            assert probs.shape[0] == 2 and probs.shape[1] == sd.unet.config.heads and probs.shape[3] == L
            assert probs.shape[2] in (64, 16)  # the 8 x 8 and 4 x 4 attention resolutions
            assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
        # while replacing, the target's maps are the source's (same token count); afterwards they differ
        assert torch.allclose(per_step[0][1], per_step[0][0], atol=1e-6)
        assert not torch.allclose(per_step[-1][1], per_step[-1][0], atol=1e-4)


def test_token_mapper_moves_a_two_token_word(sd):
    tok = sd.tokenizer
    m = token_mapper(tok, "a red circle", "a cyan circle")  # "cyan" is two tokens in the course's table
    assert len(tok.encode("cyan")) == 4
    assert torch.allclose(m[2, 2:4], torch.tensor([0.5, 0.5]))  # red's map, shared by the two pieces of cyan
    assert m[3, 4] == 1.0  # circle follows, one place later
    assert torch.equal(token_mapper(tok, SOURCE, TARGET), torch.eye(tok.context_length))
    r = edit(sd, "a red circle", "a cyan circle", _noise(sd), num_steps=4, cross_replace=1.0)
    assert torch.isfinite(r.target).all()


@pytest.mark.parametrize("kwargs, words", [
    (dict(target_prompt="a large blue circle in the top left corner"), "corner"),
    (dict(target_prompt=""), "empty"),
    (dict(source_prompt="   "), "empty"),
    (dict(cross_replace=1.5), "cross_replace"),
    (dict(cross_replace=-0.1), "cross_replace"),
    (dict(self_replace=2.0), "self_replace"),
    (dict(halves="uncond"), "halves"),
])
def test_bad_input(sd, kwargs, words):
    args = dict(source_prompt=SOURCE, target_prompt=TARGET, cross_replace=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=words):
        edit(sd, noise=_noise(sd), num_steps=2, **args)


def test_bad_noise_shape(sd):
    with pytest.raises(ValueError, match="noise must be"):
        edit(sd, SOURCE, TARGET, torch.zeros(1, 4, 8, 8), num_steps=2)


def test_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/bench_prompt_to_prompt.py on 3 edits and 2 steps writes its table, JSON and figure."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_prompt_to_prompt.py"), "--n", "3",
                           "--steps", "2", "--threads", "1", "--assets", str(tmp_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_prompt_to_prompt.json").read_text())
    assert result["n_edits"] == 3 and [e["kind"] for e in result["edits"]] == ["colour", "shape", "size"]
    assert [r["cross_replace"] for r in result["rows"][:6]] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    for row in result["rows"]:
        for key in ("edit_success", "preserved_attributes", "kept", "edited_and_kept", "mask_iou", "edge_f1"):
            assert 0.0 <= row[key] <= 1.0, (row["setting"], key)
    assert (tmp_path / "prompt_to_prompt.png").stat().st_size > 0
    assert "edited+kept" in proc.stdout
