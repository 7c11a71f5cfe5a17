"""img2img (SDEdit) and DDIM inversion on the shipped tiny SD: what they promise, and their errors.

Parity with diffusers is in tests/test_editing_diffusers_parity.py; the measured curves in
benchmarks/bench_editing.py.
"""

import pytest
import torch

from course_lib import data, editing
from course_lib.samplers import ddim, default_timesteps
from course_lib.schedules import add_noise, sd_schedule
from course_lib.tiny_sd import load_tiny_sd

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = ["a green star", "a blue ring on a white background"]


@pytest.fixture(scope="module")
def sd():
    return load_tiny_sd()


@pytest.fixture(scope="module")
def scenes():
    return data.generate(2, seed=3, split="heldout")


@pytest.fixture(scope="module")
def z0(sd, scenes):
    return editing.encode_images(sd, scenes.images_float(), sample_posterior=False)


def noise_like(z, seed=0):
    return torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))


def mse(a, b):
    return ((a - b) ** 2).flatten(1).mean(1)  # (B,)


# -----------------------------------------------------------------------------
# img2img


def test_timesteps_are_the_tail_of_a_full_run():
    full = default_timesteps(20)  # 951 ... 1
    assert editing.img2img_timesteps(20, 1.0).tolist() == full.tolist()
    t = editing.img2img_timesteps(20, 0.75)
    assert t.tolist() == full[5:].tolist() and t[0].item() == 701 and len(t) == 15
    assert len(editing.img2img_timesteps(20, 0.7)) == 14  # 20 * 0.7 = 14.000000000000002
    assert len(editing.img2img_timesteps(100, 0.29)) == 28  # 100 * 0.29 = 28.999999999999996: int rounds down
    assert len(editing.img2img_timesteps(20, 0.049)) == 0  # below 1 / num_steps no step runs


def test_strength_zero_returns_the_inputs_latents(sd, scenes, z0):
    out = editing.img2img_from_latents(sd, z0, NEW, 0.0, 20, 5.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, z0)
    assert out is not z0  # a copy: the caller's tensor is never handed back to be changed
    # through images: the posterior sample drawn from the generator, unchanged
    images, z = editing.img2img(sd, scenes.images_float(), NEW, 0.0, generator=torch.Generator().manual_seed(7),
                                return_latents=True)
    assert torch.equal(z, editing.encode_images(sd, scenes.images_float(), torch.Generator().manual_seed(7)))
    assert torch.equal(images, sd.decode_latents(z))


def test_strength_one_is_text_to_image_from_the_noised_image(sd, z0):
    """Strength 1 runs every step of a text-to-image run, starting from z0 noised to t = 951, where
    sqrt(alpha_bar) = 0.09 of z0 remains: exactly TinySD.generate from that start. From the noise alone the
    result differs, by less than another noise's text-to-image differs."""
    noise = noise_like(z0)
    ours = editing.img2img_from_latents(sd, z0, NEW, 1.0, 20, 5.0, noise=noise)
    start = add_noise(z0, noise, 951, sd.schedule)
    _, t2i = sd.generate(NEW, 20, 5.0, latents=start, return_latents=True)
    assert (ours - t2i).abs().max().item() <= 1e-6
    _, from_noise = sd.generate(NEW, 20, 5.0, latents=noise, return_latents=True)
    _, other_noise = sd.generate(NEW, 20, 5.0, latents=noise_like(z0, 1), return_latents=True)
    assert mse(ours, from_noise).mean() < mse(other_noise, from_noise).mean()
    assert mse(ours, from_noise).mean() > 1e-4  # the image does leak through


def test_higher_strength_moves_further_from_the_input(sd, z0):
    noise = noise_like(z0)
    dist = [mse(editing.img2img_from_latents(sd, z0, NEW, s, 20, 5.0, noise=noise), z0).mean().item()
            for s in (0.2, 0.5, 1.0)]
    assert dist[0] < dist[1] < dist[2], dist


def test_same_generator_same_edit_and_inputs_untouched(sd, scenes):
    images = scenes.images_float()
    before = images.clone()
    a = editing.img2img(sd, images, NEW, 0.6, 10, generator=torch.Generator().manual_seed(3))
    b = editing.img2img(sd, images, NEW, 0.6, 10, generator=torch.Generator().manual_seed(3))
    c = editing.img2img(sd, images, NEW, 0.6, 10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(images, before)
    assert a.shape == images.shape and a.min() >= -1 and a.max() <= 1


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_other_samplers_land_near_ddim(sd, z0, sampler):
    """The same timesteps and start with another ODE solver: near DDIM's result, far nearer than another noise."""
    noise = noise_like(z0)
    d = editing.img2img_from_latents(sd, z0, NEW, 0.6, 20, 5.0, noise=noise)
    other = editing.img2img_from_latents(sd, z0, NEW, 0.6, 20, 5.0, noise=noise, sampler=sampler)
    elsewhere = editing.img2img_from_latents(sd, z0, NEW, 0.6, 20, 5.0, noise=noise_like(z0, 1))
    assert mse(other, d).mean() < 0.25 * mse(elsewhere, d).mean()


# -----------------------------------------------------------------------------
# DDIM inversion


def test_round_trip_without_guidance_at_50_steps(sd, z0, scenes):
    """Measured on these two held-out scenes: latent MSE 9.9e-4 and 5.7e-4 against a latent variance of 0.32;
    exact inversion (3 iterations) 2.0e-6 and 6.6e-7. Plain inversion is not this good everywhere:
    bench_editing.py finds a held-out scene at 0.46 (the median of 16 is 1.0e-3)."""
    zT = editing.ddim_invert(sd, z0, scenes.captions, 50)
    rec = editing.reconstruct(sd, zT, scenes.captions, 50)
    err = mse(rec, z0)
    assert err.max() < 1e-2 * z0.var(), err
    assert mse(zT, z0).mean() > 0.1  # z_T is not z0: the inversion went somewhere
    zT_exact = editing.ddim_invert(sd, z0, scenes.captions, 50, fixed_point_iters=3)
    err_exact = mse(editing.reconstruct(sd, zT_exact, scenes.captions, 50), z0)
    assert err_exact.max() < 1e-4 and (err_exact < 0.1 * err).all(), (err, err_exact)


def test_exact_inversion_beats_plain_inversion_with_guidance(sd, z0, scenes):
    """Measured: at w = 5, 20 steps, plain 0.38 and 0.053; exact (5 iterations) 2.7e-4 and 4.0e-4; plain
    without guidance 2.8e-3 for both."""
    w, steps = 5.0, 20
    plain = mse(editing.reconstruct(sd, editing.ddim_invert(sd, z0, scenes.captions, steps, w), scenes.captions,
                                    steps, w), z0)
    exact = mse(editing.reconstruct(sd, editing.ddim_invert(sd, z0, scenes.captions, steps, w, fixed_point_iters=5),
                                    scenes.captions, steps, w), z0)
    no_guidance = mse(editing.reconstruct(sd, editing.ddim_invert(sd, z0, scenes.captions, steps), scenes.captions,
                                          steps), z0)
    assert plain.mean() > 3 * no_guidance.mean()  # guidance breaks plain inversion
    assert exact.mean() < 0.1 * plain.mean()  # the fixed-point iteration repairs it ...
    assert exact.mean() < no_guidance.mean()  # ... below plain inversion's error without guidance


def test_anderson_solves_a_fixed_point_the_plain_iteration_runs_away_from():
    """g(y) = c - 1.5 y: y <- g(y) doubles the error each time (|slope| > 1); Anderson's step solves it."""
    c = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))

    def g(y):
        return c - 1.5 * y

    solution = c / 2.5
    y0 = torch.zeros_like(c)
    plain = editing.anderson_fixed_point(g, y0, 6, memory=0, relaxation=1.0)
    anderson = editing.anderson_fixed_point(g, y0, 6, memory=2, relaxation=1.0)
    assert (plain - solution).abs().max() > 1.0
    assert (anderson - solution).abs().max() < 1e-5


def test_fixed_point_inversion_is_undone_by_the_forward_ddim_step():
    """On a smooth stand-in model the iteration converges: forward DDIM from the exact z_T returns z0 to 1e-5,
    where plain inversion misses by far more."""
    schedule = sd_schedule()
    ab = schedule.alphas_cumprod

    def model(x, t, cond=None):
        a = ab[t.long()].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * x + 0.2 * torch.tanh(x.roll(1, -1))

    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    exact = editing.ddim_inverse(model, x0, schedule, 10, fixed_point_iters=10)
    plain = editing.ddim_inverse(model, x0, schedule, 10)
    assert (ddim(model, exact, schedule, 10) - x0).abs().max() < 1e-5
    assert (ddim(model, plain, schedule, 10) - x0).abs().max() > 1e-3


# -----------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_strength_outside_zero_one_is_refused(sd, scenes, strength):
    with pytest.raises(ValueError, match="strength must be a number in"):
        editing.img2img(sd, scenes.images_float(), NEW, strength)
    with pytest.raises(ValueError, match="strength"):
        editing.img2img_timesteps(20, strength)


@pytest.mark.parametrize("bad,match", [
    (lambda s: s.images, "floating point in \\[-1, 1\\].*to_float"),  # uint8
    (lambda s: s.images.float(), "must lie in \\[-1, 1\\].*127.5"),  # [0, 255] as floats
    (lambda s: s.images_float()[:, :, :32, :32], "shape \\(B, 3, 64, 64\\)"),
    (lambda s: s.images_float()[:, :1], "shape \\(B, 3, 64, 64\\)"),
    (lambda s: s.images_float()[0], "shape \\(B, 3, 64, 64\\)"),
    (lambda s: s.images_float().numpy(), "must be a tensor"),
])
def test_wrong_images_are_refused(sd, scenes, bad, match):
    with pytest.raises(ValueError, match=match):
        editing.img2img(sd, bad(scenes), NEW, 0.5)


def test_wrong_prompts_latents_and_settings_are_refused(sd, scenes, z0):
    images = scenes.images_float()
    with pytest.raises(ValueError, match="one prompt"):
        editing.img2img(sd, images, ["a red circle"] * 3, 0.5)
    with pytest.raises(ValueError, match="one prompt"):
        editing.ddim_invert(sd, z0, ["a red circle"] * 3)
    with pytest.raises(ValueError, match="negative_prompt"):
        editing.img2img(sd, images, NEW, 0.5, negative_prompt=["x"] * 3)
    with pytest.raises(ValueError, match="guidance_scale"):
        editing.img2img(sd, images, NEW, 0.5, guidance_scale=0.5)
    with pytest.raises(ValueError, match="unknown sampler"):
        editing.img2img(sd, images, NEW, 0.5, sampler="plms")
    with pytest.raises(ValueError, match="latents must have shape"):
        editing.ddim_invert(sd, images, NEW)  # images where latents belong
    with pytest.raises(ValueError, match="noise must have the latents' shape"):
        editing.img2img_from_latents(sd, z0, NEW, 0.5, noise=torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="fixed_point_iters"):
        editing.ddim_invert(sd, z0, NEW, 5, fixed_point_iters=-1)
    with pytest.raises(ValueError, match="anderson_memory"):
        editing.ddim_invert(sd, z0, NEW, 5, fixed_point_iters=2, anderson_memory=1.5)
    with pytest.raises(ValueError, match="relaxation"):
        editing.ddim_invert(sd, z0, NEW, 5, fixed_point_iters=2, relaxation=0.0)
    with pytest.raises(ValueError, match="num_steps"):
        editing.img2img_timesteps(0, 0.5)


# -----------------------------------------------------------------------------
# the benchmark runs end to end (its full numbers: assets/bench_editing.json)


def test_benchmark_runs_a_part_and_keeps_the_others(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    stored = {"inpainting": {"kept": True}}  # e.g. a part added later, run before
    (tmp_path / "bench_editing.json").write_text(json.dumps(stored))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, str(root / "benchmarks" / "bench_editing.py"), "--threads", "1", "--assets", str(tmp_path)]
    proc = subprocess.run(cmd + ["--parts", "img2img", "--n-img2img", "2", "--steps", "2"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_editing.json").read_text())
    assert result["inpainting"] == {"kept": True}  # a part not run keeps its stored results
    rows = result["img2img"]["edits"]["colour"]["rows"]
    assert [r["strength"] for r in rows][0] == 0.0 and rows[-1]["strength"] == 1.0
    assert rows[0]["steps_run"] == 0 and rows[-1]["steps_run"] == 2
    assert all(0 <= r["edge_f1"] <= 1 and 0 <= r["changed_attribute"] <= 1 for r in rows)
    assert (tmp_path / "editing_curves.png").stat().st_size > 0
    bad = subprocess.run(cmd + ["--parts", "outpainting"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "unknown part" in bad.stderr
