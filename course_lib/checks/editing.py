"""Checks of editing with the model: img2img's strength rule, the inpainting blend step, the inverse DDIM step.

| id | where | kind |
| --- | --- | --- |
| img2img_timesteps | solutions/09_editing_exercises.ipynb | graded exercise |
| inpaint_blend_step | solutions/09_editing_exercises.ipynb | graded exercise |
| ddim_inverse_step | notebooks/09_editing.ipynb | check yourself |

Notation (code name -> meaning; course_lib/editing.py and course_lib/inpainting.py use the same):
    num_steps       N, the steps of a full text-to-image run (SD's "leading" spacing, steps_offset 1)
    strength        s in [0, 1]; img2img runs the last int(N * s) of the N timesteps (diffusers' get_timesteps)
    alphas_cumprod  alpha_bar_t for t = 0 ... T - 1 (T = 1000), the schedule's cumulative product
    mask            1 where the image is repainted, 0 where it is kept (diffusers' convention), on the latent grid
    x_s, x_t        latents at timesteps s < t (s less noisy); the inverse DDIM step goes from s up to t
"""

from __future__ import annotations

import math

import numpy as np
import torch

from course_lib.samplers import default_timesteps
from course_lib.schedules import sd_schedule
from course_tools.checking import Exercise, Failed, Run

# ==============================================================================================
# Reference implementations (tests/test_checkers.py proves them equal to course_lib.editing and
# course_lib.inpainting)
# ==============================================================================================


def img2img_timesteps(num_steps: int, strength: float) -> torch.Tensor:
    """diffusers' ``StableDiffusionImg2ImgPipeline.get_timesteps``: the last int(N * s) of the N timesteps."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength!r}")
    full = default_timesteps(num_steps)  # (N,) noisiest first, e.g. 951 ... 1 for 20 steps
    init_timestep = min(int(num_steps * strength), num_steps)
    return full[num_steps - init_timestep:]


def blend_step(x_t: torch.Tensor, z_known: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
               alphas_cumprod: torch.Tensor, t: int) -> torch.Tensor:
    """RePaint eq. 8: the sampler's latent where the mask is 1, the known latent noised to t where it is 0."""
    ab = alphas_cumprod.double()[t]
    known = ab.sqrt() * z_known.double() + (1 - ab).sqrt() * noise.double()  # q(x_t | z_known), DDPM eq. 4
    m = mask.double()
    return m * x_t.double() + (1 - m) * known


def ddim_inverse_step(x_s: torch.Tensor, eps: torch.Tensor, alpha_bar_s: float, alpha_bar_t: float) -> torch.Tensor:
    """DDIM eq. 12 with s and t swapped: x0 predicted at s, then moved to the level of t along eps."""
    x0 = (x_s.double() - math.sqrt(1 - alpha_bar_s) * eps.double()) / math.sqrt(alpha_bar_s)
    return math.sqrt(alpha_bar_t) * x0 + math.sqrt(1 - alpha_bar_t) * eps.double()


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float, alpha_bar_s: float) -> torch.Tensor:
    """The forward DDIM step (eta = 0) from t down to s with the noise prediction eps."""
    x0 = (x_t.double() - math.sqrt(1 - alpha_bar_t) * eps.double()) / math.sqrt(alpha_bar_t)
    return math.sqrt(alpha_bar_s) * x0 + math.sqrt(1 - alpha_bar_s) * eps.double()


def sd_alphas_cumprod() -> torch.Tensor:
    """SD's scaled-linear schedule (beta 0.00085 to 0.012 over 1000 steps), what the tiny SD uses."""
    return sd_schedule().alphas_cumprod


# ==============================================================================================
# Exercise: img2img's timesteps from the strength
# ==============================================================================================
IMG2IMG = Exercise("img2img_timesteps", "img2img: the timesteps a strength runs", targets=("img2img_timesteps",))


def _timesteps(run: Run, learner, n: int, s: float) -> np.ndarray:
    label = f"img2img_timesteps({n}, {s!r})"
    got = run.call(learner.img2img_timesteps, n, s, label=label)
    if isinstance(got, (list, tuple)):
        got = torch.tensor(list(got), dtype=torch.long)
    want = img2img_timesteps(n, s)
    arr = run.tensor(got, label, kind="any")
    if arr.ndim != 1:
        raise Failed(f"{label} to be one-dimensional, one timestep per step", f"shape {tuple(arr.shape)}", None)
    if len(arr) != len(want):
        hint = ("Round down: int(num_steps * strength) steps run, as diffusers' get_timesteps does "
                "(round() or math.ceil() run one step too many for some strengths)."
                if abs(len(arr) - len(want)) == 1 else
                "Of the num_steps timesteps of a full run, int(num_steps * strength) run.")
        raise Failed(f"{label} to run {len(want)} steps (int({n} * {s!r}) = {len(want)})", f"{len(arr)} timesteps",
                     hint)
    if len(want) and not np.array_equal(arr, want.numpy()):
        first = [int(v) for v in arr[:3]]
        hint = ("These are the first, noisiest timesteps of the full run; img2img skips those and runs the last ones, "
                "ending at the full run's last timestep." if len(arr) < n and int(arr[0]) == int(default_timesteps(n)[0])
                else "Take default_timesteps(num_steps)[t_start:] with t_start = num_steps - int(num_steps * strength).")
        raise Failed(f"{label} = {want.tolist()[:3]}... (the last {len(want)} of default_timesteps({n}))",
                     f"{first}...", hint)
    return arr


@IMG2IMG.check("strength 1 runs every step of a full run; strength 0 runs none (an empty result)", points=1,
               hint="default_timesteps(num_steps)[num_steps - int(num_steps * strength):]")
def _(run, learner):
    for n in (20, 50):
        arr = _timesteps(run, learner, n, 1.0)
        run.equal(int(arr[0]), int(default_timesteps(n)[0]), f"img2img_timesteps({n}, 1.0)[0]")
        _timesteps(run, learner, n, 0.0)


@IMG2IMG.check("strength 0.75 of 20 steps: the last 15 timesteps, noisiest first (701 ... 1)", points=1,
               hint="Skip the first num_steps - int(num_steps * strength) timesteps of the full run, keep the rest.")
def _(run, learner):
    arr = _timesteps(run, learner, 20, 0.75)
    run.equal((int(arr[0]), int(arr[-1])), (701, 1), "img2img_timesteps(20, 0.75): first and last")


@IMG2IMG.check("the count is rounded down, as diffusers does (20 x 0.68 = 13.6 runs 13; 100 x 0.29 runs 28)",
               points=2, hint="int(num_steps * strength), not round(): 20 x 0.68 runs 13 steps, and in float "
                              "arithmetic 100 x 0.29 = 28.999999999999996 runs 28.")
def _(run, learner):
    for n, s in ((20, 0.68), (100, 0.29), (20, 0.7), (10, 0.05), (30, 0.51)):
        _timesteps(run, learner, n, s)


@IMG2IMG.check("random step counts and strengths equal the reference (diffusers' get_timesteps)", points=1)
def _(run, learner):
    rng = run.rng(0)
    for _ in range(6):
        n, s = int(rng.integers(2, 80)), float(np.round(rng.uniform(0.0, 1.0), 3))
        _timesteps(run, learner, n, s)


@IMG2IMG.check("a strength outside [0, 1] raises a ValueError", points=1,
               hint="Check 0 <= strength <= 1 first and raise ValueError with a message that says so.")
def _(run, learner):
    for s in (1.5, -0.1):
        run.raises("ValueError", learner.img2img_timesteps, 20, s, label=f"img2img_timesteps(20, {s})")


# ==============================================================================================
# Exercise: the inpainting blend step
# ==============================================================================================
BLEND = Exercise("inpaint_blend_step", "Inpainting: the blend step", targets=("blend_step",))


def _blend_case(run: Run, k: int, batch: int = 2, side: int = 8):
    x_t = run.randn(batch, 4, side, side, k=k)
    z_known = run.randn(batch, 4, side, side, k=k + 1) * 0.8
    noise = run.randn(batch, 4, side, side, k=k + 2)
    mask = (run.randn(batch, 1, side, side, k=k + 3) > 0.3).float()  # (B, 1, h, w): one mask for all 4 channels
    return x_t, z_known, noise, mask


def _blend(run: Run, learner, args, label: str) -> np.ndarray:
    got = run.call(learner.blend_step, *args, label=label)
    return run.tensor(got, label, shape=tuple(args[0].shape))


@BLEND.check("where the mask is 1 (repaint) the result is the sampler's latent x_t, unchanged", points=1,
             hint="mask = 1 marks the region to repaint: keep x_t there. If you get the known latent there instead, "
                  "the mask is the wrong way round (diffusers' convention: 1 repaints, 0 keeps).")
def _(run, learner):
    ab = sd_alphas_cumprod()
    args = (*_blend_case(run, 0), ab, 500)
    have = _blend(run, learner, args, "blend_step(x_t, z_known, noise, mask, alphas_cumprod, 500)")
    inside = args[3].expand_as(args[0]).bool().numpy()
    swapped = blend_step(*args[:3], 1 - args[3], *args[4:]).numpy()
    if np.allclose(have, swapped, rtol=1e-5, atol=1e-6):
        raise Failed("x_t where mask = 1 and the noised known latent where mask = 0",
                     "the two the other way round: the mask is inverted",
                     "mask = 1 marks the region to repaint (diffusers' convention): m * x_t + (1 - m) * known.")
    run.close(have[inside], args[0].double().numpy()[inside], "the result where mask = 1", rtol=1e-5, atol=1e-6,
              hint="Where mask = 1 return x_t itself; if the values there are the noised known latent, swap m and 1 - m.")


@BLEND.check("where the mask is 0 (keep) the result is the known latent noised to t (DDPM eq. 4)", points=2,
             hint="sqrt(alphas_cumprod[t]) * z_known + sqrt(1 - alphas_cumprod[t]) * noise: the level of t exactly, "
                  "not of t - 1 or t + 1, with square roots on both factors.")
def _(run, learner):
    ab = sd_alphas_cumprod()
    for k, t in ((10, 500), (20, 981), (30, 1), (40, int(run.rng(1).integers(2, 998)))):
        args = (*_blend_case(run, k), ab, t)
        have = _blend(run, learner, args, f"blend_step(..., alphas_cumprod, {t})")
        want = blend_step(*args).numpy()
        outside = ~args[3].expand_as(args[0]).bool().numpy()
        neighbours = [blend_step(*args[:5], u).numpy()[outside] for u in (t - 1, t + 1) if 0 <= u < len(ab)]
        if not np.allclose(have[outside], want[outside], rtol=1e-5, atol=1e-6) and any(
                np.allclose(have[outside], v, rtol=1e-5, atol=1e-6) for v in neighbours):
            raise Failed(f"the kept region at t = {t} noised with alphas_cumprod[{t}]",
                         "the level of a neighbouring timestep (t - 1 or t + 1)",
                         "alphas_cumprod is indexed by the timestep itself: alphas_cumprod[t].")
        run.close(have[outside], want[outside], f"the result where mask = 0, t = {t}", rtol=1e-5, atol=1e-6)


@BLEND.check("the whole blended latent equals the reference; a mask of shape (B, 1, h, w) applies to every channel",
             points=1, hint="m * x_t + (1 - m) * known, with m of shape (B, 1, h, w) broadcast over the 4 channels.")
def _(run, learner):
    ab = sd_alphas_cumprod()
    for k, batch in ((50, 1), (60, 3)):
        args = (*_blend_case(run, k, batch=batch), ab, 701)
        have = _blend(run, learner, args, f"blend_step(<batch {batch}>, ..., 701)")
        run.close(have, blend_step(*args).numpy(), f"blend_step(<batch {batch}>, ...)", rtol=1e-5, atol=1e-6)


@BLEND.check("Verify: with an all-ones mask nothing of the input survives; with all zeros, at t = 0, nearly all",
             points=1, hint="All ones: return x_t. All zeros: the known latent noised to t; at t = 0 that is "
                            "z_known up to sqrt(1 - alpha_bar_0) = 0.03 of noise.")
def _(run, learner):
    ab = sd_alphas_cumprod()
    x_t, z_known, noise, mask = _blend_case(run, 70)
    have = _blend(run, learner, (x_t, z_known, noise, torch.ones_like(mask), ab, 300), "blend_step(<all-ones mask>)")
    run.close(have, x_t.double().numpy(), "blend_step with an all-ones mask", rtol=1e-5, atol=1e-6)
    have = _blend(run, learner, (x_t, z_known, noise, torch.zeros_like(mask), ab, 0), "blend_step(<all-zeros mask>, t=0)")
    run.close(have, blend_step(x_t, z_known, noise, torch.zeros_like(mask), ab, 0).numpy(),
              "blend_step with an all-zeros mask at t = 0", rtol=1e-5, atol=1e-6)


# ==============================================================================================
# Check yourself: the inverse DDIM step (lesson 9, section 3)
# ==============================================================================================
DDIM_INVERSE = Exercise("ddim_inverse_step", "Check yourself: the inverse DDIM step", targets=("ddim_inverse_step",))


@DDIM_INVERSE.check("x_t from x_s: predict x0 at the level of s, move it to the level of t along eps", points=1,
                    hint="x0 = (x_s - sqrt(1 - alpha_bar_s) eps) / sqrt(alpha_bar_s); "
                         "x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.")
def _(run, learner):
    ab = sd_alphas_cumprod()
    for k, (s, t) in enumerate(((1, 51), (451, 501), (900, 951))):
        x_s, eps = run.randn(2, 4, 6, 6, k=k), run.randn(2, 4, 6, 6, k=k + 10)
        a_s, a_t = float(ab[s]), float(ab[t])
        label = f"ddim_inverse_step(x_s, eps, alpha_bar[{s}], alpha_bar[{t}])"
        got = run.call(learner.ddim_inverse_step, x_s, eps, a_s, a_t, label=label)
        run.close(got, ddim_inverse_step(x_s, eps, a_s, a_t).numpy(), label, rtol=1e-4, atol=1e-5, kind="tensor")


@DDIM_INVERSE.check("Verify: a forward DDIM step from your x_t with the same eps lands back on x_s", points=1,
                    hint="The inverse step is the forward one with s and t swapped; check the square roots and "
                         "which alpha_bar divides x_s.")
def _(run, learner):
    ab = sd_alphas_cumprod()
    x_s, eps = run.randn(3, 4, 5, 5, k=20), run.randn(3, 4, 5, 5, k=21)
    a_s, a_t = float(ab[301]), float(ab[351])
    got = run.call(learner.ddim_inverse_step, x_s, eps, a_s, a_t, label="ddim_inverse_step(x_s, eps, ...)")
    arr = run.tensor(got, "ddim_inverse_step(x_s, eps, ...)", shape=tuple(x_s.shape))
    back = ddim_step(torch.from_numpy(arr), eps, a_t, a_s).numpy()
    run.close(back, x_s.double().numpy(), "the forward DDIM step from your x_t", rtol=1e-4, atol=1e-5)
