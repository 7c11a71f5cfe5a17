"""Samplers: DDPM, DDIM, Euler, Euler ancestral, DPM-Solver++(2M) and Heun, one signature for all.

Lesson 5 ("DDIM and modern samplers") teaches them. tests/test_samplers_vs_diffusers.py proves
each equal to the diffusers scheduler of the same name over whole sampling loops, and
tests/test_real_unet_parity.py to StableDiffusionPipeline's own loop on a real U-Net.

Every sampler is called the same way (k-diffusion style):

    sample = ddim(model, noise, schedule, timesteps, cond,
                  prediction_type="epsilon", generator=g, callback=cb)

    model(x_t, t, cond) -> out   x_t (B, ...), t (B,) timesteps, cond: whatever the model takes
    noise                        (B, ...) standard Gaussian noise, the starting sample x_T
    schedule                     a NoiseSchedule (course_lib.schedules)
    timesteps                    the timesteps to visit, decreasing (make_timesteps), or an int N
                                 for N steps of SD's spacing (default_timesteps). Euler-type
                                 samplers also take fractional ones and pass them to the model
    prediction_type              what `out` is: "epsilon" (the noise) or "v_prediction"
                                 (v = sqrt(a) eps - sqrt(1-a) x0, Salimans & Ho 2022, Sec. 4)
    generator                    a torch.Generator for the noise that stochastic samplers add
    callback(i, t, x, x0_pred)   called after step i with the new sample and the model's x0

Notation used in the comments (code name -> paper symbol):
    a, a_t, a_prev   alpha_bar_t (DDPM's alpha-bar; the DDIM paper writes alpha_t for it)
    x                x_t, the current sample
    x0               x0_hat, the model's estimate of the clean sample
    eps              eps_hat, the model's estimate of the noise in x_t
    sigma            sqrt((1 - a) / a), the noise level of x / sqrt(a) (Karras et al. 2022)
    alpha, sig       sqrt(a), sqrt(1 - a): DPM-Solver's alpha_t, sigma_t; lam = log(alpha / sig)

From the model's output to x0 and eps, for x_t = sqrt(a) x0 + sqrt(1-a) eps:
    epsilon       x0 = (x_t - sqrt(1-a) out) / sqrt(a)          eps = out      (DDPM eq. 15)
    v_prediction  x0 = sqrt(a) x_t - sqrt(1-a) out              eps = sqrt(a) out + sqrt(1-a) x_t

Euler, Euler ancestral, Heun (and k-diffusion) work on x / sqrt(a) = x0 + sigma * eps instead of x_t;
their callback's x is that variable. Nothing here changes a caller's tensor in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from .schedules import NoiseSchedule, make_timesteps, sd_schedule

PredictionType = Literal["epsilon", "v_prediction"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
Model = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
Callback = Callable[[int, Any, torch.Tensor, torch.Tensor], None]

# diffusers replaces alpha_bar = 0 (zero terminal SNR) by 2^-24 wherever it needs sigma.
ZERO_SNR_ALPHA_BAR = 2.0**-24


# -----------------------------------------------------------------------------
# plumbing shared by every sampler


def _check_inputs(x: torch.Tensor, schedule: NoiseSchedule, prediction_type: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor (the starting noise), got {type(x).__name__}"
                         + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have shape (B, ...) with B >= 1, got {tuple(x.shape)}")
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")


def _check_timesteps(timesteps, schedule: NoiseSchedule, *, fractional_ok: bool) -> torch.Tensor:
    """Validate the timesteps to visit and return them as a 1-D CPU tensor."""
    T = schedule.num_train_timesteps
    if isinstance(timesteps, int) and not isinstance(timesteps, bool):
        timesteps = default_timesteps(timesteps, T)
    ts = torch.as_tensor(timesteps).detach().cpu()
    if ts.ndim != 1 or len(ts) == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {tuple(ts.shape)}")
    if ts.dtype == torch.bool or ts.is_complex():
        raise ValueError(f"timesteps must be integers (or floats for Euler-type samplers), got {ts.dtype}")
    if ts.is_floating_point() and not fractional_ok and not torch.equal(ts, ts.round()):
        raise ValueError(
            "this sampler looks alpha_bar up at integer timesteps but got fractional ones "
            f"({ts[:4].tolist()}...); make them with make_timesteps(..., integer=True)"
        )
    if ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(
            f"timesteps must lie in [0, {T - 1}] (the schedule's training timesteps), got values from "
            f"{ts.min().item()} to {ts.max().item()}"
        )
    if len(ts) > 1 and not torch.all(ts[1:] < ts[:-1]):
        raise ValueError(f"timesteps must be strictly decreasing (noisiest first), got {ts.tolist()[:8]}...")
    return ts


def default_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """What an int `timesteps` means: SD's spacing ("leading", steps_offset=1), which for
    num_steps = T (where the offset would step past T-1) is simply every timestep, T-1 ... 0."""
    T = num_train_timesteps
    offset = 1 if num_steps < T else 0
    return make_timesteps(num_steps, T, "leading", offset)


def _call_model(model: Model, x_in: torch.Tensor, t: torch.Tensor, cond: Any, like: torch.Tensor) -> torch.Tensor:
    out = model(x_in, t, cond)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the model must return a tensor, got {type(out).__name__}")
    if out.shape != like.shape:
        raise ValueError(
            f"the model returned shape {tuple(out.shape)} for a sample of shape {tuple(like.shape)}; "
            "it must predict one value (eps or v) per input value"
        )
    if out.dtype != like.dtype:
        raise ValueError(f"the model returned dtype {out.dtype} for a sample of dtype {like.dtype}; cast one of them")
    return out


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn from `generator` (as diffusers' randn_tensor does)."""
    if generator is None or generator.device.type == x.device.type:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if generator.device.type == "cpu":  # a CPU generator gives the same numbers on every device
        return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    raise ValueError(f"the generator is on {generator.device} but x is on {x.device}; "
                     "use a CPU generator or one on x's device")


def _predict_x0(out, x, sqrt_a: float, sqrt_1ma: float, prediction_type: str) -> torch.Tensor:
    """x0_hat from the model output, for x = sqrt(a) x0 + sqrt(1-a) eps (DDPM eq. 15 for eps)."""
    if prediction_type == "epsilon":
        return (x - sqrt_1ma * out) / sqrt_a
    return sqrt_a * x - sqrt_1ma * out  # v-prediction


def _predict_eps(out, x, sqrt_a: float, sqrt_1ma: float, prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return out
    return sqrt_a * out + sqrt_1ma * x  # v-prediction


def _check_alpha_bar(a_first: float, prediction_type: str) -> None:
    if a_first == 0.0 and prediction_type == "epsilon":
        raise ValueError(
            "the first timestep has alpha_bar = 0 (zero terminal SNR), where an epsilon-prediction model "
            "cannot tell x0 apart (x0 = (x - sqrt(1-a) eps) / sqrt(a) divides by 0); "
            "use a v_prediction model or start from an earlier timestep"
        )


def sigmas_at(schedule: NoiseSchedule, timesteps: torch.Tensor) -> torch.Tensor:
    """sigma(t) = sqrt((1 - a_t) / a_t) at (possibly fractional) timesteps, float32.

    Between table entries sigma is interpolated linearly, as diffusers' Euler schedulers do
    (numpy.interp); alpha_bar = 0 (zero terminal SNR) counts as 2^-24, as in diffusers.
    """
    ab = schedule.alphas_cumprod
    ab = torch.where(ab == 0, torch.full_like(ab, ZERO_SNR_ALPHA_BAR), ab)
    table = (((1 - ab) / ab) ** 0.5).double()  # (T,)
    t = torch.as_tensor(timesteps).detach().cpu().double()  # (N,)
    lo = t.floor().long().clamp(0, len(table) - 1)
    hi = (lo + 1).clamp(max=len(table) - 1)
    return (table[lo] + (t - lo) * (table[hi] - table[lo])).float()  # (N,)


# -----------------------------------------------------------------------------
# DDPM


@torch.no_grad()
def ddpm(
    model: Model,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | int = 1000,
    cond: Any = None,
    *,
    prediction_type: PredictionType = "epsilon",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior (Ho et al. 2020, Algorithm 2), on any timesteps.

    From timestep t to the next visited one, s (alpha_bar_s = 1 after the last step):
        x0    = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)                               (eq. 15)
        beta  = 1 - a_t / a_s                      the beta of one step from t to s
        mean  = sqrt(a_s) beta / (1 - a_t) * x0 + sqrt(1 - beta) (1 - a_s) / (1 - a_t) * x_t   (eq. 7)
        var   = (1 - a_s) / (1 - a_t) * beta       beta-tilde, the posterior variance  (eq. 7)
        x_s   = mean + sqrt(var) z,  z ~ N(0, I); no noise on the last step
    With all 1000 timesteps this is DDPM exactly; with fewer it is DDIM with eta = 1.
    diffusers: DDPMScheduler (variance_type="fixed_small").
    """
    _check_inputs(x, schedule, prediction_type)
    ts = _check_timesteps(timesteps, schedule, fractional_ok=False)
    idx = ts.long()
    n, B = len(ts), x.shape[0]

    # Per-step coefficients, in float32 as diffusers computes them, then as Python floats so the
    # loop launches no extra kernels and never waits on the device.
    a_t = schedule.alphas_cumprod[idx]  # (n,)
    a_prev = torch.cat([schedule.alphas_cumprod[idx[1:]], torch.ones(1)])  # (n,) a_s
    _check_alpha_bar(a_t[0].item(), prediction_type)
    alpha_step = a_t / a_prev
    beta_step = 1 - alpha_step
    c_x0 = (a_prev**0.5 * beta_step) / (1 - a_t)
    c_xt = alpha_step**0.5 * (1 - a_prev) / (1 - a_t)
    std = (((1 - a_prev) / (1 - a_t) * beta_step).clamp(min=1e-20)) ** 0.5
    sqrt_a, sqrt_1ma = (a_t**0.5).tolist(), ((1 - a_t) ** 0.5).tolist()
    c_x0, c_xt, std = c_x0.tolist(), c_xt.tolist(), std.tolist()

    t_list, t_model = ts.tolist(), ts.to(x.device)
    for i in range(n):
        out = _call_model(model, x, t_model[i].expand(B), cond, x)
        x0 = _predict_x0(out, x, sqrt_a[i], sqrt_1ma[i], prediction_type)
        x = c_x0[i] * x0 + c_xt[i] * x  # posterior mean
        if i < n - 1:
            x = x + std[i] * _randn_like(x, generator)
        if callback is not None:
            callback(i, t_list[i], x, x0)
    return x


# -----------------------------------------------------------------------------
# DDIM


@torch.no_grad()
def ddim(
    model: Model,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | int = 50,
    cond: Any = None,
    *,
    prediction_type: PredictionType = "epsilon",
    eta: float = 0.0,
    set_alpha_to_one: bool = False,  # SD's setting; True makes the last step land on alpha_bar = 1
    clip_x0: float | None = None,  # clamp x0 to [-c, c]: for pixel models only, never for latents
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021): jump between any decreasing timesteps; eta = 0 is deterministic.

    From timestep t to the next visited one, s (after the last step: alpha_bar_0, or 1 if
    set_alpha_to_one):
        x0      = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)              predicted x0   (eq. 12)
        sigma_t = eta * sqrt((1 - a_s) / (1 - a_t)) * sqrt(1 - a_t / a_s)              (eq. 16)
        x_s     = sqrt(a_s) x0 + sqrt(1 - a_s - sigma_t^2) eps + sigma_t z             (eq. 12)
    eta = 1 gives DDPM's posterior variance; with set_alpha_to_one=True as well (DDPM's last step
    lands on alpha_bar = 1) it is the `ddpm` sampler on the same timesteps and noise. With SD's
    set_alpha_to_one=False the last step stops at alpha_bar_0 instead, a hair short of clean.
    The next timestep s is the next entry of `timesteps`: diffusers' DDIMScheduler instead
    computes t - T // N, which is wrong for "linspace", and for "trailing" when N does not
    divide T (diffusers #9261); tests/test_samplers_vs_diffusers.py shows the difference.
    """
    _check_inputs(x, schedule, prediction_type)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    if clip_x0 is not None and clip_x0 <= 0:
        raise ValueError(f"clip_x0 must be positive or None, got {clip_x0}")
    ts = _check_timesteps(timesteps, schedule, fractional_ok=False)
    idx = ts.long()
    n, B = len(ts), x.shape[0]

    ab = schedule.alphas_cumprod
    final = torch.ones(1) if set_alpha_to_one else ab[:1]
    a_t = ab[idx]  # (n,)
    a_prev = torch.cat([ab[idx[1:]], final])  # (n,) a_s
    _check_alpha_bar(a_t[0].item(), prediction_type)
    var = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)  # eq. 16 with eta = 1
    std = eta * var**0.5
    c_eps = (1 - a_prev - std**2) ** 0.5  # "direction pointing to x_t"
    c_x0 = a_prev**0.5
    sqrt_a, sqrt_1ma = (a_t**0.5).tolist(), ((1 - a_t) ** 0.5).tolist()
    std, c_eps, c_x0 = std.tolist(), c_eps.tolist(), c_x0.tolist()

    t_list, t_model = ts.tolist(), ts.to(x.device)
    for i in range(n):
        out = _call_model(model, x, t_model[i].expand(B), cond, x)
        x0 = _predict_x0(out, x, sqrt_a[i], sqrt_1ma[i], prediction_type)
        eps = _predict_eps(out, x, sqrt_a[i], sqrt_1ma[i], prediction_type)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        x = c_x0[i] * x0 + c_eps[i] * eps
        if eta > 0:
            x = x + std[i] * _randn_like(x, generator)
        if callback is not None:
            callback(i, t_list[i], x, x0)
    return x


# -----------------------------------------------------------------------------
# Euler and Euler ancestral (Karras et al. 2022; k-diffusion)

InitNoiseSigma = Literal["exact", "sigma_max"]


def _sigma_space_coefficients(sigmas: torch.Tensor) -> tuple[list, list, list]:
    """Per-step constants of the samplers that work on x = x_t / sqrt(a_t) = x0 + sigma eps.

    c_in  = sqrt(sigma^2 + 1): the model sees x / c_in, which is x_t itself
    c_v   = -sigma / sqrt(sigma^2 + 1), c_in2 = sigma^2 + 1: v-prediction gives x0 = c_v v + x / c_in2
    Computed in float32, as diffusers does, then kept as Python floats for the loop.
    """
    c_in2 = sigmas**2 + 1
    return (c_in2**0.5).tolist(), (-sigmas / c_in2**0.5).tolist(), c_in2.tolist()


def _x0_in_sigma_space(out, x, sigma: float, c_v: float, c_in2: float, prediction_type: str) -> torch.Tensor:
    """The model's x0 estimate in sigma space: x - sigma eps (epsilon) or c_v v + x / c_in2 (v)."""
    if prediction_type == "epsilon":
        return x - sigma * out
    return out * c_v + x / c_in2


def _euler_setup(x, schedule, timesteps, init_noise_sigma):
    if init_noise_sigma not in ("exact", "sigma_max"):
        raise ValueError(f"init_noise_sigma must be 'exact' or 'sigma_max', got {init_noise_sigma!r}")
    ts = _check_timesteps(timesteps, schedule, fractional_ok=True)
    sigmas = torch.cat([sigmas_at(schedule, ts), torch.zeros(1)])  # (n+1,) ending at sigma = 0
    s0 = sigmas[0]
    scale = (s0**2 + 1) ** 0.5 if init_noise_sigma == "exact" else s0
    # x_T (unit variance) -> x_T / sqrt(a) = x0 + sigma eps, the variable Euler integrates
    return ts, sigmas, x * scale.item()


@torch.no_grad()
def euler(
    model: Model,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | int = 50,
    cond: Any = None,
    *,
    prediction_type: PredictionType = "epsilon",
    init_noise_sigma: InitNoiseSigma = "exact",
    generator: torch.Generator | None = None,  # unused: Euler is deterministic
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0(x, sigma)) / sigma.

    Karras et al. 2022, Algorithm 1 without its second-order correction. Here x is
    x_t / sqrt(a_t) = x0 + sigma * eps (their sigma(t) = t, s(t) = 1); the model sees x_t:
        x_in = x / sqrt(sigma^2 + 1)                   back to x_t (diffusers' scale_model_input)
        x0   = x - sigma * eps                         (eps-prediction)
        d    = (x - x0) / sigma                        the ODE's slope (Algorithm 1, line 4)
        x    = x + (sigma_next - sigma) * d            (Algorithm 1, line 5)
    The last step goes to sigma = 0, so the result is x0 itself.

    init_noise_sigma: how unit noise becomes the starting x. "exact" multiplies by
    sqrt(sigma_max^2 + 1) = 1 / sqrt(a_T), the exact change of variables, so the model's first
    input is the noise itself, as for DDIM. "sigma_max" multiplies by that first sigma alone,
    k-diffusion's convention, which diffusers' Euler schedulers use with "linspace" and
    "trailing" spacing (they use "exact" with "leading"). The two differ by 0.2% at SD's
    sigma_max = 14.6.
    """
    _check_inputs(x, schedule, prediction_type)
    ts, sigmas, x = _euler_setup(x, schedule, timesteps, init_noise_sigma)
    n, B = len(ts), x.shape[0]
    c_in, c_v, c_in2 = _sigma_space_coefficients(sigmas[:-1])
    dt = (sigmas[1:] - sigmas[:-1]).tolist()
    sig = sigmas.tolist()

    t_list, t_model = ts.tolist(), ts.to(x.device)
    for i in range(n):
        out = _call_model(model, x / c_in[i], t_model[i].expand(B), cond, x)
        x0 = _x0_in_sigma_space(out, x, sig[i], c_v[i], c_in2[i], prediction_type)
        d = (x - x0) / sig[i]
        x = x + d * dt[i]
        if callback is not None:
            callback(i, t_list[i], x, x0)
    return x


@torch.no_grad()
def euler_ancestral(
    model: Model,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | int = 50,
    cond: Any = None,
    *,
    prediction_type: PredictionType = "epsilon",
    init_noise_sigma: InitNoiseSigma = "exact",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler ancestral (k-diffusion's sample_euler_ancestral): an Euler step, then fresh noise.

    Moving from sigma to sigma_next, DDPM's posterior (eta = 1) keeps a part of the way
    deterministic and refills the rest with new noise:
        sigma_up   = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)   the fresh noise's std
        sigma_down = sqrt(sigma_next^2 - sigma_up^2)                          where the ODE step ends
        x = x + (sigma_down - sigma) * d + sigma_up * z,   z ~ N(0, I)
    so the noise level after the step is sqrt(sigma_down^2 + sigma_up^2) = sigma_next.
    Same variables and init_noise_sigma as `euler`. diffusers: EulerAncestralDiscreteScheduler.
    """
    _check_inputs(x, schedule, prediction_type)
    ts, sigmas, x = _euler_setup(x, schedule, timesteps, init_noise_sigma)
    n, B = len(ts), x.shape[0]
    s, s_next = sigmas[:-1], sigmas[1:]
    sigma_up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5  # (n,)
    sigma_down = (s_next**2 - sigma_up**2) ** 0.5  # (n,)
    c_in, c_v, c_in2 = _sigma_space_coefficients(s)
    dt = (sigma_down - s).tolist()
    sig, sigma_up = s.tolist(), sigma_up.tolist()

    t_list, t_model = ts.tolist(), ts.to(x.device)
    for i in range(n):
        out = _call_model(model, x / c_in[i], t_model[i].expand(B), cond, x)
        x0 = _x0_in_sigma_space(out, x, sig[i], c_v[i], c_in2[i], prediction_type)
        d = (x - x0) / sig[i]
        x = x + d * dt[i]
        if sigma_up[i] > 0:  # zero on the last step (sigma_next = 0): no noise to add
            x = x + _randn_like(x, generator) * sigma_up[i]
        if callback is not None:
            callback(i, t_list[i], x, x0)
    return x


@torch.no_grad()
def heun(
    model: Model,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | int = 50,
    cond: Any = None,
    *,
    prediction_type: PredictionType = "epsilon",
    init_noise_sigma: InitNoiseSigma = "exact",
    generator: torch.Generator | None = None,  # unused: Heun is deterministic
    callback: Callback | None = None,
) -> torch.Tensor:
    """Heun's method on the same ODE as `euler` (Karras et al. 2022, Algorithm 1, with its correction).

    An Euler step proposes x_next; the slope there is averaged with the slope at the start, and
    the step is taken again with that average (the trapezoidal rule):
        d      = (x - x0(x, sigma)) / sigma                                     (line 4)
        x_prop = x + (sigma_next - sigma) d                                     (line 5)
        d'     = (x_prop - x0(x_prop, sigma_next)) / sigma_next                 (line 7)
        x      = x + (sigma_next - sigma) (d + d') / 2                          (line 8)
    Second order, at two model calls per step; the last step, to sigma = 0, has no slope to
    average and stays an Euler step (line 6), so N steps cost 2N - 1 calls. Same variables and
    init_noise_sigma as `euler`. diffusers: HeunDiscreteScheduler, which runs the two halves of
    each step as separate entries of its timestep list (t0, t1, t1, t2, t2, ...).
    """
    _check_inputs(x, schedule, prediction_type)
    ts, sigmas, x = _euler_setup(x, schedule, timesteps, init_noise_sigma)
    n, B = len(ts), x.shape[0]
    c_in, c_v, c_in2 = _sigma_space_coefficients(sigmas)  # (n+1,) each; the last (sigma = 0) is never used
    dt = (sigmas[1:] - sigmas[:-1]).tolist()
    sig = sigmas.tolist()

    t_list, t_model = ts.tolist(), ts.to(x.device)
    for i in range(n):
        out = _call_model(model, x / c_in[i], t_model[i].expand(B), cond, x)
        x0 = _x0_in_sigma_space(out, x, sig[i], c_v[i], c_in2[i], prediction_type)
        d = (x - x0) / sig[i]
        if sig[i + 1] == 0:  # the final step: Euler
            x = x + d * dt[i]
        else:
            x_prop = x + d * dt[i]
            out = _call_model(model, x_prop / c_in[i + 1], t_model[i + 1].expand(B), cond, x)
            x0_prop = _x0_in_sigma_space(out, x_prop, sig[i + 1], c_v[i + 1], c_in2[i + 1], prediction_type)
            d_prop = (x_prop - x0_prop) / sig[i + 1]
            x = x + (d + d_prop) / 2 * dt[i]
        if callback is not None:
            callback(i, t_list[i], x, x0)
    return x


# -----------------------------------------------------------------------------
# DPM-Solver++(2M)


@torch.no_grad()
def dpmpp_2m(
    model: Model,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | int = 20,
    cond: Any = None,
    *,
    prediction_type: PredictionType = "epsilon",
    generator: torch.Generator | None = None,  # unused: DPM-Solver++(2M) is deterministic
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): a multistep 2nd-order ODE solver.

    It integrates the ODE in lam = log(alpha / sig) (half the log-SNR) for the data prediction
    x0, which is smooth in lam; with h = lam_next - lam:
        first order (= DDIM):  x_next = (sig_next / sig) x - alpha_next (e^-h - 1) x0
        second order:          D = x0 + (x0 - x0_prev) / (2 r),  r = h_prev / h
                               x_next = (sig_next / sig) x - alpha_next (e^-h - 1) D
    The first step (no previous x0 yet) and the last (to sig = 0) are first order, as in
    diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2).
    x is x_t itself (no input scaling). For diffusers' own timesteps, use
    make_timesteps(..., count_final_step=True).
    """
    _check_inputs(x, schedule, prediction_type)
    ts = _check_timesteps(timesteps, schedule, fractional_ok=True)
    n, B = len(ts), x.shape[0]
    sigmas = torch.cat([sigmas_at(schedule, ts), torch.zeros(1)])  # (n+1,)
    alpha = 1 / (sigmas**2 + 1) ** 0.5  # (n+1,) sqrt(a)
    sig = sigmas * alpha  # (n+1,) sqrt(1 - a)
    lam = torch.log(alpha) - torch.log(sig)  # (n+1,), +inf at the end
    h = lam[1:] - lam[:-1]  # (n,)
    c_x = (sig[1:] / sig[:-1]).tolist()
    c_d = (alpha[1:] * (torch.exp(-h) - 1.0)).tolist()
    inv_r = torch.ones(n)
    if n > 1:
        inv_r[1:] = 1.0 / (h[:-1] / h[1:])  # 1 / r with r = h_prev / h
    inv_r = inv_r.tolist()
    a_, s_ = alpha[:-1].tolist(), sig[:-1].tolist()

    t_list, t_model = ts.tolist(), ts.to(x.device)
    x0_prev = None
    for i in range(n):
        out = _call_model(model, x, t_model[i].expand(B), cond, x)
        x0 = _predict_x0(out, x, a_[i], s_[i], prediction_type)
        if i == 0 or i == n - 1:  # first order
            x = c_x[i] * x - c_d[i] * x0
        else:  # second order
            d1 = inv_r[i] * (x0 - x0_prev)
            x = c_x[i] * x - c_d[i] * x0 - (0.5 * c_d[i]) * d1
        x0_prev = x0
        if callback is not None:
            callback(i, t_list[i], x, x0)
    return x


# -----------------------------------------------------------------------------
# choosing a sampler by name

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "dpmpp_2m": dpmpp_2m,
    "heun": heun,
}
SamplerName = Literal["ddpm", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "heun"]


def sample(
    name: SamplerName,
    model: Model,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | int,
    cond: Any = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Run the sampler called `name` (a key of SAMPLERS); keyword arguments go to it."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](model, x, schedule, timesteps, cond, **kwargs)


def unet_model(unet: torch.nn.Module) -> Model:
    """Wrap a diffusers UNet2DConditionModel as model(x_t, t, cond) with cond the text embeddings."""

    def model(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]

    return model


# -----------------------------------------------------------------------------
# A model whose right answer is known: the exact denoiser for Gaussian data


def alpha_bar_at(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar at (possibly fractional) timesteps t: 1 / (1 + sigma(t)^2), float32 on t's device."""
    t = torch.as_tensor(t)
    return (1 / (1 + sigmas_at(schedule, t) ** 2)).to(t.device)


def gaussian_data_model(
    schedule: NoiseSchedule, data_std: float = 1.0, prediction_type: PredictionType = "epsilon"
) -> Model:
    """The exact (Bayes-optimal) model for data x0 ~ N(0, data_std^2 I), per element.

    With x_t = sqrt(a) x0 + sqrt(1-a) eps, x_t ~ N(0, v) with v = a s^2 + 1 - a, and
        E[eps | x_t] = sqrt(1 - a) x_t / v,      E[x0 | x_t] = s^2 sqrt(a) x_t / v.
    A sampler driven by it should end at `gaussian_data_ode_solution`; what it misses is
    the sampler's own discretisation error, measurable exactly. cond is ignored.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
    if data_std <= 0:
        raise ValueError(f"data_std must be positive, got {data_std}")

    def model(x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        a = alpha_bar_at(schedule, t).to(x.device, torch.float64).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ...)
        xd = x.double()
        v = a * data_std**2 + 1 - a
        eps = (1 - a).sqrt() * xd / v
        if prediction_type == "epsilon":
            return eps.to(x.dtype)
        x0 = data_std**2 * a.sqrt() * xd / v
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).to(x.dtype)

    return model


def gaussian_data_ode_solution(
    x: torch.Tensor, alpha_bar_start: float, alpha_bar_end: float, data_std: float = 1.0
) -> torch.Tensor:
    """Where the probability-flow ODE carries x from alpha_bar_start to alpha_bar_end, for Gaussian data.

    The flow is linear and maps N(0, v_start) onto N(0, v_end), v = a s^2 + 1 - a, so it is
    x * sqrt(v_end / v_start): the answer an exact ODE solver (DDIM with infinitely many
    steps) gives with `gaussian_data_model`.
    """
    v_start = alpha_bar_start * data_std**2 + 1 - alpha_bar_start
    v_end = alpha_bar_end * data_std**2 + 1 - alpha_bar_end
    return x * math.sqrt(v_end / v_start)


# -----------------------------------------------------------------------------
# The seed lesson's DDIM, kept as it was written, for lesson 5 to take apart.


@dataclass
class SeedSchedule:
    """The schedule object the seed's code expects: `T` and `alpha_bars`."""

    T: int
    alpha_bars: torch.Tensor  # (T,)


def seed_schedule(schedule: NoiseSchedule) -> SeedSchedule:
    return SeedSchedule(T=schedule.num_train_timesteps, alpha_bars=schedule.alphas_cumprod)


@torch.no_grad()
def seed_ddim_sample(model, schedule, shape, num_steps=50, eta=0.0):
    """A faithful copy of the seed lesson's `ddim_sample` (only the comments are the course's).

    model(x, t_batch) predicts the noise; schedule has `.T` and `.alpha_bars` (see
    `seed_schedule`). Kept with its departures from Stable Diffusion's DDIM, which
    `seed_ddim_departures` measures: x0 clamped to [-1, 1] (wrong for latents), the last step
    landing on alpha_bar = 1 (SD: alpha_bar_0), timesteps range(0, T, T // num_steps) (SD:
    "leading" + 1; and more steps than asked for when num_steps does not divide T), `eta`
    accepted but never used, and the starting noise drawn from the global RNG.
    """
    # the timesteps to visit, noisiest first
    step_size = schedule.T // num_steps
    timesteps = list(
        range(0, schedule.T, step_size))[::-1]

    x = torch.randn(shape)

    for i, t in enumerate(timesteps):
        t_batch = torch.full(
            (shape[0],), t, dtype=torch.long)
        pred_noise = model(x, t_batch)

        alpha_bar_t = schedule.alpha_bars[t]
        if i + 1 < len(timesteps):
            alpha_bar_prev = schedule.alpha_bars[
                timesteps[i + 1]]
        else:
            alpha_bar_prev = torch.tensor(1.0)

        # x0 from x_t and the predicted noise
        pred_x0 = (
            (x - torch.sqrt(1 - alpha_bar_t)
             * pred_noise)
            / torch.sqrt(alpha_bar_t))
        pred_x0 = pred_x0.clamp(-1, 1)

        # the part of x_{t_prev} that is noise
        dir_xt = (torch.sqrt(1 - alpha_bar_prev)
                  * pred_noise)

        # the deterministic (eta = 0) update
        x = (torch.sqrt(alpha_bar_prev) * pred_x0
             + dir_xt)

    return x


def seed_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The timesteps the seed's sampler visits: range(0, T, T // num_steps), noisiest first."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    step = num_train_timesteps // num_steps
    if step == 0:
        raise ValueError(f"the seed's spacing needs num_steps <= T = {num_train_timesteps}, got {num_steps}")
    return torch.arange(0, num_train_timesteps, step).flip(0)  # (>= num_steps,)


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a - b).double()
    return {"max_abs": d.abs().max().item(), "rms": d.pow(2).mean().sqrt().item()}


def seed_ddim_departures(
    num_steps: int = 50, shape: tuple[int, ...] = (4, 4, 8, 8), data_std: float = 1.0, seed: int = 0
) -> dict:
    """Measure how the seed's `ddim_sample` departs from Stable Diffusion's DDIM.

    Drives both with the exact model for Gaussian "latents" of std `data_std` (SD's scaled
    latents have std close to 1) on SD's schedule, from the same starting noise (the seed's
    own draw from the global RNG, with that RNG's state restored afterwards). It walks from
    the seed's sampler to SD's DDIM one setting at a time and reports how far each change
    moves the final sample:
        clamp_x0          x0 clamped to [-1, 1]  ->  not clamped
        final_alpha_bar   last step to alpha_bar = 1  ->  alpha_bar_0 (set_alpha_to_one=False)
        spacing           range(0, T, T // N)  ->  "leading" + steps_offset 1
        total             the seed's sampler  ->  SD's DDIM (all three)
    plus `reproduced_by_ddim` (the course's `ddim`, configured like the seed, against the seed's
    code), `model_calls` (asked vs run, for a few step counts) and `eta_ignored` (eta = 0 vs
    eta = 1 in the seed's code). Differences are {"max_abs", "rms"}; `sample_rms` gives scale.
    """
    schedule = sd_schedule()
    T = schedule.num_train_timesteps
    model = gaussian_data_model(schedule, data_std)

    def seed_model(x, t):
        return model(x, t, None)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        noise = torch.randn(shape)  # the draw seed_ddim_sample makes first
        torch.manual_seed(seed)
        seed_out = seed_ddim_sample(seed_model, seed_schedule(schedule), shape, num_steps)
        torch.manual_seed(seed)
        seed_out_eta1 = seed_ddim_sample(seed_model, seed_schedule(schedule), shape, num_steps, eta=1.0)

    clamped = []
    seed_ts = seed_timesteps(num_steps, T)
    like_seed = ddim(model, noise, schedule, seed_ts, set_alpha_to_one=True, clip_x0=1.0,
                     callback=lambda i, t, x, x0: clamped.append((x0.abs() >= 1).double().mean().item()))
    no_clamp = ddim(model, noise, schedule, seed_ts, set_alpha_to_one=True)
    sd_final = ddim(model, noise, schedule, seed_ts, set_alpha_to_one=False)
    sd_ddim = ddim(model, noise, schedule, make_timesteps(num_steps, T, "leading", 1), set_alpha_to_one=False)
    sd_ts = make_timesteps(num_steps, T, "leading", 1)
    return {
        "num_steps": num_steps,
        "sample_rms": sd_ddim.double().pow(2).mean().sqrt().item(),
        "reproduced_by_ddim": _diff(like_seed, seed_out),
        "clamp_x0": {**_diff(seed_out, no_clamp), "fraction_clamped_last_step": clamped[-1],
                     "fraction_clamped_mean": sum(clamped) / len(clamped)},
        "final_alpha_bar": {**_diff(no_clamp, sd_final), "seed": 1.0, "sd": schedule.alphas_cumprod[0].item()},
        "spacing": {**_diff(sd_final, sd_ddim),
                    "seed_first_last": (int(seed_ts[0]), int(seed_ts[-1])),
                    "sd_first_last": (int(sd_ts[0]), int(sd_ts[-1]))},
        "total": _diff(seed_out, sd_ddim),
        "model_calls": {n: {"asked": n, "run": len(seed_timesteps(n, T))} for n in sorted({3, 7, 30, num_steps})},
        "eta_ignored": _diff(seed_out, seed_out_eta1),
    }
