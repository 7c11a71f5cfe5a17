"""Noise schedules: betas, alpha_bar, sigma, SNR, timestep spacing and the forward process.

Lesson 0 (the recap of part 1) teaches these; lesson 5's samplers run on them, and
tests/test_schedules.py proves each one equal to what diffusers' schedulers compute.

Notation: the one set of names for the whole of course_lib (the other modules point here and use
these spellings). For x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4),
code name -> paper symbol:

    t               t             a timestep 0 .. T-1 (T = num_train_timesteps); 0 is the least noisy,
                                  as in diffusers
    betas           beta_t        variance of the noise added at step t
    alphas          alpha_t       1 - beta_t (DDPM's alpha_t; not DPM-Solver's, see sqrt_ab)
    alpha_bar       alpha-bar_t   prod_{s <= t} alpha_s, the share of the signal's power left at t
                                  (DDPM eq. 4; the DDIM paper writes alpha_t for it). The schedule's
                                  table of it is `alphas_cumprod`, diffusers' name for it
    sqrt_ab         sqrt(alpha-bar_t)      the signal's scale in x_t: DPM-Solver's alpha_t
    sqrt_1m_ab      sqrt(1 - alpha-bar_t)  the noise's scale in x_t: DPM-Solver's sigma_t (Lu et al.
                                  2022), which is *not* Karras' sigma below
    snr             SNR(t)        alpha_bar / (1 - alpha_bar) = 1 / sigma^2 (Kingma et al. 2021, VDM)
    sigma, sigmas   sigma         sqrt((1 - alpha_bar) / alpha_bar): Karras et al. 2022's noise level,
                                  that of x = x_t / sqrt(alpha_bar) = x0 + sigma eps, the variable
                                  Euler and Heun integrate (k-diffusion's sigma)
    lam             lambda_t      log(sqrt_ab / sqrt_1m_ab) = -log(sigma), half the log-SNR (DPM-Solver)
    c_in, c_skip,   Karras et al. 2022, Table 1 (as in k-diffusion): the denoiser
    c_out           D(x; sigma) = c_skip x + c_out F(c_in x, t), with c_in = 1 / sqrt(sigma^2 + 1),
                                  so that c_in x = x_t; eps-prediction: c_skip = 1, c_out = -sigma;
                                  v-prediction: c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1)
    x0, eps         x0_hat, eps_hat   the model's estimates of the clean sample and of the noise in x_t
    v               v             sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022, Sec. 4)
    std             sigma_t of DDIM eq. 16: the std of the fresh noise a stochastic step adds

Flow matching (course_lib.flow) has a sigma of its own, x = (1 - sigma) x0 + sigma eps; flow.py names it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Spacing = Literal["leading", "trailing", "linspace"]
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")


# -----------------------------------------------------------------------------
# beta schedules


def _check_num_timesteps(num_train_timesteps: int) -> None:
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")


def linear_betas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's schedule (Ho et al. 2020, Sec. 4): betas evenly spaced from beta_start to beta_end."""
    _check_num_timesteps(num_train_timesteps)
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)  # (T,)


def scaled_linear_betas(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Stable Diffusion's schedule: sqrt(beta) evenly spaced, then squared.

    diffusers calls it "scaled_linear"; with the defaults it is SD 1.x/2.x's schedule.
    """
    _check_num_timesteps(num_train_timesteps)
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2  # (T,)


def cosine_betas(num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule (Nichol & Dhariwal 2021, eq. 17).

    alpha_bar(t) = f(t) / f(0) with f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), and
    beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), clipped at max_beta so that the last steps
    stay finite. diffusers calls it "squaredcos_cap_v2".
    """
    _check_num_timesteps(num_train_timesteps)
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"max_beta must lie in (0, 1), got {max_beta}")
    t = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps  # (T+1,) in [0, 1]
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # (T+1,)
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)  # (T,)
    return betas.to(torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that the last timestep has zero SNR (Lin et al. 2023, Algorithm 1).

    sqrt(alpha_bar) is shifted so that its last value is 0 and scaled so that its first value
    is unchanged; betas are then recovered from the new alpha_bar. At t = T-1 the model then
    sees pure noise, as it does when sampling starts. alpha_bar_{T-1} = 0 makes an
    epsilon-prediction model useless there (x0 = (x_t - sqrt_1m_ab eps) / sqrt_ab divides by 0),
    which is why the paper pairs it with v-prediction. The input is not modified.
    """
    if betas.ndim != 1 or len(betas) < 2:
        raise ValueError(f"betas must be a 1-D tensor with at least 2 entries, got shape {tuple(betas.shape)}")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,)
    sqrt_ab = alphas_cumprod.sqrt()  # (T,)
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))  # first value kept, last value 0
    alphas_cumprod = sqrt_ab**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])  # undo the cumprod
    return 1.0 - alphas


# -----------------------------------------------------------------------------
# the schedule object


@dataclass
class NoiseSchedule:
    """A discrete noise schedule: the betas and the alpha_bar they imply.

    Both are float32 CPU tensors of length T. Samplers read them; they never change them.
    """

    betas: torch.Tensor  # (T,) beta_t
    alphas_cumprod: torch.Tensor  # (T,) alpha_bar_t = prod_{s<=t} (1 - beta_s)

    def __post_init__(self) -> None:
        if self.betas.ndim != 1 or self.alphas_cumprod.shape != self.betas.shape:
            raise ValueError(
                "betas and alphas_cumprod must be 1-D tensors of the same length, got shapes "
                f"{tuple(self.betas.shape)} and {tuple(self.alphas_cumprod.shape)}"
            )
        if len(self.betas) < 2:
            raise ValueError("a noise schedule needs at least 2 timesteps")
        if not (torch.all(self.alphas_cumprod >= 0) and torch.all(self.alphas_cumprod <= 1)):
            raise ValueError("alphas_cumprod must lie in [0, 1]")

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "NoiseSchedule":
        """Build the schedule from betas: alpha_bar_t = prod_{s<=t} (1 - beta_s) (DDPM eq. 4)."""
        betas = torch.as_tensor(betas, dtype=torch.float32).detach().cpu().clone()
        if betas.ndim != 1:
            raise ValueError(f"betas must be 1-D, got shape {tuple(betas.shape)}")
        if torch.any(betas < 0) or torch.any(betas > 1):
            raise ValueError("betas must lie in [0, 1]")
        return cls(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas  # (T,)

    @property
    def sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): the noise level of x_t / sqrt(alpha_bar_t)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # (T,)


def sd_schedule() -> NoiseSchedule:
    """Stable Diffusion 1.x/2.x: 1000 steps, scaled-linear betas from 0.00085 to 0.012."""
    return NoiseSchedule.from_betas(scaled_linear_betas(1000, 0.00085, 0.012))


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) of x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps."""
    return alphas_cumprod / (1 - alphas_cumprod)


def snr_db(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The SNR in decibels, 10 log10(SNR): 0 dB is where signal and noise are equally strong."""
    return 10 * torch.log10(snr(alphas_cumprod))


# diffusers replaces alpha_bar = 0 (zero terminal SNR) by 2^-24 wherever it needs sigma.
ZERO_SNR_ALPHA_BAR = 2.0**-24


def sigmas_at(schedule: NoiseSchedule, timesteps: torch.Tensor) -> torch.Tensor:
    """sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t) at (possibly fractional) timesteps, float32.

    Between table entries sigma is interpolated linearly, as diffusers' Euler schedulers do
    (numpy.interp); alpha_bar = 0 (zero terminal SNR) counts as 2^-24, as in diffusers.
    """
    alpha_bar = schedule.alphas_cumprod
    alpha_bar = torch.where(alpha_bar == 0, torch.full_like(alpha_bar, ZERO_SNR_ALPHA_BAR), alpha_bar)
    table = (((1 - alpha_bar) / alpha_bar) ** 0.5).double()  # (T,)
    t = torch.as_tensor(timesteps).detach().cpu().double()  # (N,)
    lo = t.floor().long().clamp(0, len(table) - 1)
    hi = (lo + 1).clamp(max=len(table) - 1)
    return (table[lo] + (t - lo) * (table[hi] - table[lo])).float()  # (N,)


def alpha_bar_at(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar at (possibly fractional) timesteps t: 1 / (1 + sigma(t)^2), float32 on t's device."""
    t = torch.as_tensor(t)
    return (1 / (1 + sigmas_at(schedule, t) ** 2)).to(t.device)


def karras_sigmas(schedule: NoiseSchedule, num_steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022's noise levels (eq. 5): num_steps sigmas from sigma_max down to sigma_min.

        sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho

    spaced evenly in sigma^(1/rho), so with rho = 7 the steps crowd towards small sigma, where the
    images' details form. sigma_max and sigma_min are the schedule's own (t = T-1 and t = 0).
    diffusers: use_karras_sigmas=True (its _convert_to_karras); lesson 5 runs DPM-Solver++(2M) on them.
    Returns float32, shape (num_steps,).
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2 (Karras' spacing needs two ends), got {num_steps!r}")
    if rho <= 0:
        raise ValueError(f"rho must be positive (Karras et al. use 7), got {rho}")
    table = schedule.sigmas  # (T,) float32, as diffusers computes it
    sigma_min, sigma_max = table[0].item(), table[-1].item()
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)  # (N,)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).float()


def timesteps_for_sigmas(schedule: NoiseSchedule, sigmas: torch.Tensor) -> torch.Tensor:
    """The (fractional) timestep at which the schedule has each sigma: log(sigma) interpolated linearly
    between table entries, as diffusers' _sigma_to_t does. Returns float64, shape of `sigmas`.

    DPM-Solver++ with Karras sigmas calls the model at these timesteps rounded to integers
    (diffusers' DPMSolverMultistepScheduler, use_karras_sigmas=True) and steps with the sigmas themselves.
    """
    log_table = torch.log(schedule.sigmas).double()  # (T,) increasing with t
    log_s = torch.log(torch.as_tensor(sigmas, dtype=torch.float64).clamp(min=1e-10)).reshape(-1)  # (N,)
    dists = log_s[None, :] - log_table[:, None]  # (T, N)
    lo = (dists >= 0).long().cumsum(0).argmax(0).clamp(max=len(log_table) - 2)  # (N,) last entry <= log sigma
    low, high = log_table[lo], log_table[lo + 1]
    w = ((low - log_s) / (low - high)).clamp(0, 1)
    return ((1 - w) * lo + w * (lo + 1)).reshape(torch.as_tensor(sigmas).shape)


# -----------------------------------------------------------------------------
# timestep spacing (Lin et al. 2023, Table 2)


def make_timesteps(
    num_steps: int,
    num_train_timesteps: int = 1000,
    spacing: Spacing = "leading",
    steps_offset: int = 1,
    *,
    integer: bool = True,
    count_final_step: bool = False,
) -> torch.Tensor:
    """Choose which of the T training timesteps a sampler visits, in decreasing order.

    spacing (Lin et al. 2023, Table 2; examples for T=1000, 50 steps):
        "leading"   0, 20, ..., 980, plus steps_offset (SD uses 1): 981 ... 1.
                    Never visits the noisiest timesteps when steps_offset is small.
        "trailing"  counts back from T-1 in steps of T/num_steps: 999, 979, ..., 19.
        "linspace"  num_steps points spread evenly over [0, T-1], rounded: 999 ... 0.
    steps_offset only applies to "leading", as in diffusers.

    integer: True rounds "linspace" to integers (diffusers' DDPM, DDIM). False keeps the
        fractional values as float32 (diffusers' Euler schedulers do; they interpolate
        sigma between table entries). The other spacings are integers either way.
    count_final_step: True spaces num_steps + 1 points and drops the last one, so that the
        final jump to the clean sample is as long as the others. diffusers'
        DPMSolverMultistepScheduler does this for "leading" and "linspace".

    Returns a LongTensor (float32 when integer=False) of shape (num_steps,).
    """
    _check_num_timesteps(num_train_timesteps)
    T = num_train_timesteps
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if num_steps > T:
        raise ValueError(
            f"num_steps={num_steps} is more than the {T} training timesteps; a sampler cannot visit "
            f"more timesteps than the model was trained on. Use num_steps <= {T}."
        )
    if not isinstance(steps_offset, int) or steps_offset < 0:
        raise ValueError(f"steps_offset must be a non-negative int, got {steps_offset!r}")

    n = num_steps + 1 if count_final_step else num_steps
    if spacing == "leading":
        step_ratio = T // n
        t = torch.arange(n, dtype=torch.float64).flip(0) * step_ratio  # (n,) e.g. 980, 960, ..., 0
        if count_final_step:
            t = t[:-1]  # drop t = 0
        t = t + steps_offset
        if t[0] > T - 1:
            raise ValueError(
                f"leading spacing with {num_steps} steps and steps_offset={steps_offset} reaches timestep "
                f"{int(t[0])}, past the last training timestep {T - 1}; lower steps_offset or num_steps"
            )
    elif spacing == "trailing":
        # T, T - T/n, T - 2T/n, ... rounded, minus 1. diffusers counts down with
        # numpy.arange(T, 0, -T/n), which steps by delta = (T - T/n) - T in float64; we do the
        # same so that ties like 937.5 (T=1000, n=48) round the way diffusers' do.
        step_ratio = T / num_steps
        count = math.ceil(T / step_ratio)
        delta = (T - step_ratio) - T
        t = (T + torch.arange(count, dtype=torch.float64) * delta).round() - 1  # (num_steps,)
    else:  # linspace
        # i * (T-1)/(n-1) for i = 0 .. n-1, the last point set to T-1 exactly: numpy.linspace's
        # arithmetic, which diffusers uses (torch.linspace rounds a few values differently).
        t = torch.arange(n, dtype=torch.float64)
        if n > 1:
            t = t * ((T - 1) / (n - 1))
            t[-1] = T - 1
        t = t.flip(0)  # (n,) T-1 ... 0
        if count_final_step:
            t = t[:-1]
        if integer:
            t = t.round()  # round half to even, like numpy
    if integer:
        return t.to(torch.int64)
    return t.to(torch.float32)


# -----------------------------------------------------------------------------
# the forward process


def _per_sample(values: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, ...) to broadcast against `like`, on its device and dtype."""
    t = torch.as_tensor(t, device=values.device).long().reshape(-1)  # (B,) or (1,)
    if t.numel() not in (1, like.shape[0]):
        raise ValueError(f"t must hold 1 or {like.shape[0]} timesteps (one per sample), got {t.numel()}")
    if torch.any(t < 0) or torch.any(t >= len(values)):
        raise ValueError(f"timesteps must lie in [0, {len(values) - 1}], got {t.tolist()}")
    v = values[t].to(device=like.device, dtype=like.dtype)  # (B,)
    return v.reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, ...)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int, schedule: NoiseSchedule) -> torch.Tensor:
    """Sample q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (DDPM eq. 4).

    x0, noise: (B, ...) of the same shape and dtype; t: an int or (B,) integer timesteps.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
    if x0.dtype != noise.dtype:
        raise ValueError(f"x0 and noise must have the same dtype, got {x0.dtype} and {noise.dtype}")
    alpha_bar = _per_sample(schedule.alphas_cumprod, t, x0)  # (B, 1, ...)
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int, schedule: NoiseSchedule) -> torch.Tensor:
    """The v-prediction target v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022, Sec. 4)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
    alpha_bar = _per_sample(schedule.alphas_cumprod, t, x0)  # (B, 1, ...)
    return alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * x0
