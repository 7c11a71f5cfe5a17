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
                                 (v = sqrt_ab eps - sqrt_1m_ab x0, Salimans & Ho 2022, Sec. 4)
    generator                    a torch.Generator for the noise that stochastic samplers add
    callback(i, t, x, x0)        called after step i with the new sample and the model's x0_hat

The model is wrapped once, in a `Denoiser` (as k-diffusion wraps a model into a denoiser), which
turns its eps or v into what the samplers need; each sampler's loop is then its update rule.
Names follow the notation block in course_lib/schedules.py (alpha_bar, sqrt_ab, sqrt_1m_ab,
Karras' sigma, c_in / c_skip / c_out, lam). DDPM, DDIM and DPM-Solver++ work on x_t itself;
Euler, Euler ancestral and Heun (like k-diffusion) on x = x_t / sqrt_ab = x0 + sigma eps, and
their callback's x is that variable. Nothing here changes a caller's tensor in place.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch

from .schedules import NoiseSchedule, make_timesteps, sigmas_at

PredictionType = Literal["epsilon", "v_prediction"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
Model = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
Callback = Callable[[int, Any, torch.Tensor, torch.Tensor], None]
InitNoiseSigma = Literal["exact", "sigma_max"]


# -----------------------------------------------------------------------------
# checks and noise, shared by every sampler


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


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn from `generator` (as diffusers' randn_tensor does)."""
    if generator is None or generator.device.type == x.device.type:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if generator.device.type == "cpu":  # a CPU generator gives the same numbers on every device
        return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    raise ValueError(f"the generator is on {generator.device} but x is on {x.device}; "
                     "use a CPU generator or one on x's device")


# -----------------------------------------------------------------------------
# the model, wrapped once


class Denoiser:
    """The model wrapped for one sampling run: whatever it predicts, it answers what samplers ask.

    k-diffusion does this once, in external.py (DiscreteEpsDDPMDenoiser for eps-prediction,
    DiscreteVDDPMDenoiser for v); diffusers' schedulers redo it inside every step(). Built for
    the timesteps a sampler visits, with each step's coefficients computed once, in float32 as
    diffusers computes them, and kept as Python floats so the loop launches no extra kernels
    and never waits on the device. Step i is timesteps[i]. Two views of the same prediction:

    x0_eps(x_t, i) -> (x0_hat, eps_hat), on x_t = sqrt_ab x0 + sqrt_1m_ab eps (DDPM, DDIM,
    DPM-Solver++). With F the model's output at (x_t, t_i):
        epsilon       x0 = (x_t - sqrt_1m_ab F) / sqrt_ab     eps = F                  (DDPM eq. 15)
        v_prediction  x0 = sqrt_ab x_t - sqrt_1m_ab F         eps = sqrt_ab F + sqrt_1m_ab x_t

    D(x, i) -> x0_hat, Karras et al. 2022's denoiser on x = x_t / sqrt_ab = x0 + sigma eps
    (Euler, Euler ancestral, Heun):
        D(x; sigma) = c_skip x + c_out F(c_in x, t_i)                       (eq. 7, Table 1)
        c_in = 1 / sqrt(sigma^2 + 1)          so the model sees c_in x = x_t, as it was trained
        epsilon       c_skip = 1                  c_out = -sigma
        v_prediction  c_skip = 1 / (sigma^2 + 1)  c_out = -sigma / sqrt(sigma^2 + 1)   (sigma_data = 1)

    Build it with `at_timesteps` (alpha_bar read from the schedule's table: DDPM, DDIM) or
    `at_sigmas` (sigma interpolated at possibly fractional timesteps: the sigma-based samplers).
    Every model call is checked here, once: a tensor, one value per input value, the input's dtype.
    """

    def __init__(self, model: Model, x: torch.Tensor, timesteps: torch.Tensor, cond: Any,
                 prediction_type: str, sqrt_ab: torch.Tensor, sqrt_1m_ab: torch.Tensor,
                 sigmas: torch.Tensor | None = None):
        self.model, self.cond, self.prediction_type = model, cond, prediction_type
        self.timesteps = timesteps  # (n,) CPU tensor
        self.n = len(timesteps)
        self.t = timesteps.tolist()  # as Python numbers, for callbacks
        self._t_model = timesteps.to(x.device)  # (n,) what the model is called with
        self.sqrt_ab, self.sqrt_1m_ab = sqrt_ab, sqrt_1m_ab  # (n,) float32 each
        self._sqrt_ab, self._sqrt_1m_ab = sqrt_ab.tolist(), sqrt_1m_ab.tolist()
        self.alpha_bar: torch.Tensor | None = None  # (n,) the table's alpha_bar_t; set by at_timesteps
        self.sigmas = sigmas  # (n+1,) Karras' sigma at each step and 0 after the last; None for at_timesteps
        if sigmas is not None:
            # c_in and c_skip are kept as the numbers they divide by: x / sqrt(sigma^2 + 1) is the float32
            # arithmetic of diffusers' scale_model_input and step(), and keeps the samplers bit-identical to them
            s = sigmas[:-1]  # (n,)
            self._inv_c_in = ((s**2 + 1) ** 0.5).tolist()
            if prediction_type == "epsilon":
                self._inv_c_skip, self._c_out = None, (-s).tolist()  # c_skip = 1
            else:
                self._inv_c_skip, self._c_out = (s**2 + 1).tolist(), (-s / (s**2 + 1) ** 0.5).tolist()

    @classmethod
    def at_timesteps(cls, model: Model, x: torch.Tensor, schedule: NoiseSchedule, timesteps, cond: Any,
                     prediction_type: str) -> "Denoiser":
        """alpha_bar from the schedule's table at integer timesteps (diffusers' DDPM and DDIM schedulers)."""
        _check_inputs(x, schedule, prediction_type)
        ts = _check_timesteps(timesteps, schedule, fractional_ok=False)
        alpha_bar = schedule.alphas_cumprod[ts.long()]  # (n,)
        if alpha_bar[0].item() == 0.0 and prediction_type == "epsilon":
            raise ValueError(
                "the first timestep has alpha_bar = 0 (zero terminal SNR), where an epsilon-prediction model "
                "cannot tell x0 apart (x0 = (x_t - sqrt_1m_ab eps) / sqrt_ab divides by 0); "
                "use a v_prediction model or start from an earlier timestep"
            )
        den = cls(model, x, ts, cond, prediction_type, alpha_bar**0.5, (1 - alpha_bar) ** 0.5)
        den.alpha_bar = alpha_bar
        return den

    @classmethod
    def at_sigmas(cls, model: Model, x: torch.Tensor, schedule: NoiseSchedule, timesteps, cond: Any,
                  prediction_type: str, sigmas: torch.Tensor | None = None) -> "Denoiser":
        """Karras' sigma at possibly fractional timesteps, alpha_bar = 1 / (sigma^2 + 1) (diffusers'
        sigma-based schedulers: Euler, Euler ancestral, Heun, DPM-Solver multistep).

        `sigmas`, one per timestep, replaces the schedule's sigma at those timesteps: the model is
        still called at `timesteps`, the steps use `sigmas` (Karras sigmas with the timesteps
        rounded, as diffusers' use_karras_sigmas=True does; schedules.karras_sigmas)."""
        _check_inputs(x, schedule, prediction_type)
        ts = _check_timesteps(timesteps, schedule, fractional_ok=True)
        if sigmas is None:
            sigmas = sigmas_at(schedule, ts)  # (n,)
        else:
            sigmas = torch.as_tensor(sigmas).detach().cpu().float()
            if sigmas.shape != ts.shape or not torch.all(sigmas > 0) or not torch.all(sigmas[1:] < sigmas[:-1]):
                raise ValueError(f"sigmas must hold one positive, strictly decreasing value per timestep ({len(ts)}), "
                                 f"got shape {tuple(sigmas.shape)}: make them with schedules.karras_sigmas")
        sigmas = torch.cat([sigmas, torch.zeros(1)])  # (n+1,) ending at sigma = 0
        sqrt_ab = 1 / (sigmas[:-1] ** 2 + 1) ** 0.5  # (n,)
        return cls(model, x, ts, cond, prediction_type, sqrt_ab, sigmas[:-1] * sqrt_ab, sigmas)

    def model_output(self, x_t: torch.Tensor, i: int) -> torch.Tensor:
        """F(x_t, t_i): the model's eps or v at step i, checked."""
        out = self.model(x_t, self._t_model[i].expand(x_t.shape[0]), self.cond)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"the model must return a tensor, got {type(out).__name__}")
        if out.shape != x_t.shape:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} for a sample of shape {tuple(x_t.shape)}; "
                "it must predict one value (eps or v) per input value"
            )
        if out.dtype != x_t.dtype:
            raise ValueError(f"the model returned dtype {out.dtype} for a sample of dtype {x_t.dtype}; "
                             "cast one of them")
        return out

    def x0_eps(self, x_t: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) at step i, for x_t = sqrt_ab x0 + sqrt_1m_ab eps."""
        F, sqrt_ab, sqrt_1m_ab = self.model_output(x_t, i), self._sqrt_ab[i], self._sqrt_1m_ab[i]
        if self.prediction_type == "epsilon":
            return (x_t - sqrt_1m_ab * F) / sqrt_ab, F
        return sqrt_ab * x_t - sqrt_1m_ab * F, sqrt_ab * F + sqrt_1m_ab * x_t  # v-prediction

    def D(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """x0_hat = D(x; sigma_i) = c_skip x + c_out F(c_in x, t_i), for x = x0 + sigma_i eps."""
        if self.sigmas is None:
            raise ValueError("D(x; sigma) needs Karras' sigmas: build the Denoiser with Denoiser.at_sigmas")
        F = self.model_output(x / self._inv_c_in[i], i)
        c_skip_x = x if self.prediction_type == "epsilon" else x / self._inv_c_skip[i]  # c_skip = 1 for eps
        return c_skip_x + self._c_out[i] * F

    def start(self, noise: torch.Tensor, init_noise_sigma: InitNoiseSigma) -> torch.Tensor:
        """Unit noise x_T -> the starting x = x_T / sqrt_ab = x0 + sigma eps of the sigma-based samplers.

        "exact" multiplies by sqrt(sigma_max^2 + 1) = 1 / sqrt_ab at the first step, the exact
        change of variables, so the model's first input is the noise itself, as for DDIM.
        "sigma_max" multiplies by that first sigma alone, k-diffusion's convention, which diffusers'
        Euler schedulers use with "linspace" and "trailing" spacing (they use "exact" with
        "leading"). The two differ by 0.2% at SD's sigma_max = 14.6.
        """
        if self.sigmas is None:
            raise ValueError("start needs Karras' sigmas: build the Denoiser with Denoiser.at_sigmas")
        if init_noise_sigma not in ("exact", "sigma_max"):
            raise ValueError(f"init_noise_sigma must be 'exact' or 'sigma_max', got {init_noise_sigma!r}")
        sigma_max = self.sigmas[0]
        scale = (sigma_max**2 + 1) ** 0.5 if init_noise_sigma == "exact" else sigma_max
        return noise * scale.item()


# Each sampler below spells out the same signature on purpose (one signature for all, as in
# k-diffusion), so that every function reads alone; only the update rules differ.
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
        beta  = 1 - alpha_bar_t / alpha_bar_s      the beta of one step from t to s
        mean  = sqrt(alpha_bar_s) beta / (1 - alpha_bar_t) x0
                + sqrt(1 - beta) (1 - alpha_bar_s) / (1 - alpha_bar_t) x_t            (eq. 7)
        std^2 = (1 - alpha_bar_s) / (1 - alpha_bar_t) beta   beta-tilde, the posterior variance (eq. 7)
        x_s   = mean + std z,  z ~ N(0, I); no noise on the last step
    With all 1000 timesteps this is DDPM exactly; with fewer it is DDIM with eta = 1.
    diffusers: DDPMScheduler (variance_type="fixed_small").
    """
    den = Denoiser.at_timesteps(model, x, schedule, timesteps, cond, prediction_type)
    alpha_bar_t = den.alpha_bar  # (n,)
    alpha_bar_s = torch.cat([alpha_bar_t[1:], torch.ones(1)])  # (n,) at the next step; 1 after the last
    beta = 1 - alpha_bar_t / alpha_bar_s
    c_x0 = (alpha_bar_s**0.5 * beta / (1 - alpha_bar_t)).tolist()
    c_xt = ((alpha_bar_t / alpha_bar_s) ** 0.5 * (1 - alpha_bar_s) / (1 - alpha_bar_t)).tolist()  # sqrt(1 - beta) first
    std = ((((1 - alpha_bar_s) / (1 - alpha_bar_t) * beta).clamp(min=1e-20)) ** 0.5).tolist()

    for i in range(den.n):
        x0, _ = den.x0_eps(x, i)
        x = c_x0[i] * x0 + c_xt[i] * x  # the posterior mean
        if i < den.n - 1:
            x = x + std[i] * _randn_like(x, generator)
        if callback is not None:
            callback(i, den.t[i], x, x0)
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
        std = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_s)   (eq. 16)
        x_s = sqrt(alpha_bar_s) x0 + sqrt(1 - alpha_bar_s - std^2) eps + std z                   (eq. 12)
    eta = 1 gives DDPM's posterior variance; with set_alpha_to_one=True as well (DDPM's last step
    lands on alpha_bar = 1) it is the `ddpm` sampler on the same timesteps and noise. With SD's
    set_alpha_to_one=False the last step stops at alpha_bar_0 instead, a hair short of clean.
    The next timestep s is the next entry of `timesteps`: diffusers' DDIMScheduler instead
    computes t - T // N, which is wrong for "linspace", and for "trailing" when N does not
    divide T (diffusers #9261); tests/test_samplers_vs_diffusers.py shows the difference.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    if clip_x0 is not None and clip_x0 <= 0:
        raise ValueError(f"clip_x0 must be positive or None, got {clip_x0}")
    den = Denoiser.at_timesteps(model, x, schedule, timesteps, cond, prediction_type)
    alpha_bar_t = den.alpha_bar  # (n,)
    final = torch.ones(1) if set_alpha_to_one else schedule.alphas_cumprod[:1]
    alpha_bar_s = torch.cat([alpha_bar_t[1:], final])  # (n,) at the next step
    std = eta * (((1 - alpha_bar_s) / (1 - alpha_bar_t)) * (1 - alpha_bar_t / alpha_bar_s)) ** 0.5  # (n,) eq. 16
    c_eps = ((1 - alpha_bar_s - std**2) ** 0.5).tolist()  # "direction pointing to x_t"
    c_x0, std = (alpha_bar_s**0.5).tolist(), std.tolist()

    for i in range(den.n):
        x0, eps = den.x0_eps(x, i)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        x = c_x0[i] * x0 + c_eps[i] * eps
        if eta > 0:
            x = x + std[i] * _randn_like(x, generator)
        if callback is not None:
            callback(i, den.t[i], x, x0)
    return x


# -----------------------------------------------------------------------------
# Euler, Euler ancestral and Heun (Karras et al. 2022; k-diffusion)


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
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma.

    Karras et al. 2022, Algorithm 1 without its second-order correction, on
    x = x_t / sqrt_ab = x0 + sigma eps (their sigma(t) = t, s(t) = 1):
        d = (x - D(x; sigma)) / sigma                  the ODE's slope (Algorithm 1, line 4)
        x = x + (sigma_next - sigma) d                 (Algorithm 1, line 5)
    The last step goes to sigma = 0, so the result is x0 itself. init_noise_sigma: how unit
    noise becomes the starting x (see Denoiser.start). diffusers: EulerDiscreteScheduler.
    """
    den = Denoiser.at_sigmas(model, x, schedule, timesteps, cond, prediction_type)
    x = den.start(x, init_noise_sigma)
    sigma = den.sigmas.tolist()  # (n+1,)
    dt = (den.sigmas[1:] - den.sigmas[:-1]).tolist()  # (n,) sigma_next - sigma, in float32 as diffusers

    for i in range(den.n):
        x0 = den.D(x, i)
        d = (x - x0) / sigma[i]
        x = x + d * dt[i]
        if callback is not None:
            callback(i, den.t[i], x, x0)
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
        x = x + (sigma_down - sigma) d + sigma_up z,   z ~ N(0, I)
    so the noise level after the step is sqrt(sigma_down^2 + sigma_up^2) = sigma_next.
    Same variables and init_noise_sigma as `euler`. diffusers: EulerAncestralDiscreteScheduler.
    """
    den = Denoiser.at_sigmas(model, x, schedule, timesteps, cond, prediction_type)
    x = den.start(x, init_noise_sigma)
    s, s_next = den.sigmas[:-1], den.sigmas[1:]  # (n,) each
    sigma_up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
    sigma_down = (s_next**2 - sigma_up**2) ** 0.5
    dt, sigma, sigma_up = (sigma_down - s).tolist(), s.tolist(), sigma_up.tolist()

    for i in range(den.n):
        x0 = den.D(x, i)
        d = (x - x0) / sigma[i]
        x = x + d * dt[i]
        if sigma_up[i] > 0:  # zero on the last step (sigma_next = 0): no noise to add
            x = x + _randn_like(x, generator) * sigma_up[i]
        if callback is not None:
            callback(i, den.t[i], x, x0)
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

    An Euler step proposes x_prop; the slope there is averaged with the slope at the start, and
    the step is taken again with that average (the trapezoidal rule):
        d      = (x - D(x; sigma)) / sigma                                  (line 4)
        x_prop = x + (sigma_next - sigma) d                                 (line 5)
        d'     = (x_prop - D(x_prop; sigma_next)) / sigma_next              (line 7)
        x      = x + (sigma_next - sigma) (d + d') / 2                      (line 8)
    Second order, at two model calls per step; the last step, to sigma = 0, has no slope to
    average and stays an Euler step (line 6), so N steps cost 2N - 1 calls. Same variables and
    init_noise_sigma as `euler`. diffusers: HeunDiscreteScheduler, which runs the two halves of
    each step as separate entries of its timestep list (t0, t1, t1, t2, t2, ...).
    """
    den = Denoiser.at_sigmas(model, x, schedule, timesteps, cond, prediction_type)
    x = den.start(x, init_noise_sigma)
    sigma = den.sigmas.tolist()  # (n+1,)
    dt = (den.sigmas[1:] - den.sigmas[:-1]).tolist()  # (n,) sigma_next - sigma, in float32 as diffusers

    for i in range(den.n):
        x0 = den.D(x, i)
        d = (x - x0) / sigma[i]
        if sigma[i + 1] == 0:  # the final step: Euler
            x = x + d * dt[i]
        else:
            x_prop = x + d * dt[i]
            d_prop = (x_prop - den.D(x_prop, i + 1)) / sigma[i + 1]
            x = x + (d + d_prop) / 2 * dt[i]
        if callback is not None:
            callback(i, den.t[i], x, x0)
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
    sigmas: torch.Tensor | None = None,  # (n,) noise levels to step through instead of the timesteps' own
    generator: torch.Generator | None = None,  # unused: DPM-Solver++(2M) is deterministic
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): a multistep 2nd-order ODE solver.

    In DPM-Solver's notation alpha_t = sqrt_ab and sigma_t = sqrt_1m_ab (not Karras' sigma). It
    integrates the ODE in lam = log(alpha_t / sigma_t) (half the log-SNR) for the data prediction
    x0, which is smooth in lam; with h = lam_next - lam:
        first order (= DDIM):  x_next = (sigma_t_next / sigma_t) x - alpha_t_next (e^-h - 1) x0
        second order:          D = x0 + (x0 - x0_prev) / (2 r),  r = h_prev / h
                               x_next = (sigma_t_next / sigma_t) x - alpha_t_next (e^-h - 1) D
    The first step (no previous x0 yet) and the last (to sigma_t = 0) are first order, as in
    diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2).
    x is x_t itself (no input scaling). For diffusers' own timesteps, use
    make_timesteps(..., count_final_step=True). Karras sigmas (use_karras_sigmas=True): pass
    sigmas=karras_sigmas(schedule, n) and timesteps=timesteps_for_sigmas(schedule, sigmas).round()
    (course_lib.schedules); the model is called at the timesteps, the steps use the sigmas.
    """
    den = Denoiser.at_sigmas(model, x, schedule, timesteps, cond, prediction_type, sigmas)
    n = den.n
    alpha_t = torch.cat([den.sqrt_ab, torch.ones(1)])  # (n+1,) DPM-Solver's alpha_t; 1 at sigma = 0
    sigma_t = torch.cat([den.sqrt_1m_ab, torch.zeros(1)])  # (n+1,) DPM-Solver's sigma_t; 0 at the end
    lam = torch.log(alpha_t) - torch.log(sigma_t)  # (n+1,), +inf at the end
    h = lam[1:] - lam[:-1]  # (n,)
    c_x = (sigma_t[1:] / sigma_t[:-1]).tolist()
    c_d = (alpha_t[1:] * (torch.exp(-h) - 1.0)).tolist()
    inv_r = torch.ones(n)
    if n > 1:
        inv_r[1:] = 1.0 / (h[:-1] / h[1:])  # 1 / r with r = h_prev / h
    inv_r = inv_r.tolist()

    x0_prev = None
    for i in range(n):
        x0, _ = den.x0_eps(x, i)
        if i == 0 or i == n - 1:  # first order
            x = c_x[i] * x - c_d[i] * x0
        else:  # second order
            d1 = inv_r[i] * (x0 - x0_prev)
            x = c_x[i] * x - c_d[i] * x0 - (0.5 * c_d[i]) * d1
        x0_prev = x0
        if callback is not None:
            callback(i, den.t[i], x, x0)
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
