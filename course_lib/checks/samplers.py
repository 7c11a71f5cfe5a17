"""Checks of DDIM and modern samplers: the DDIM step estimator, one Euler step, one DPM-Solver++(2M) step,
timestep spacing.

| id | where | kind |
| --- | --- | --- |
| ddim_step_estimator | solutions/05_samplers_exercises.ipynb | graded exercise (episode 85's DDIM step estimator) |
| euler_step | solutions/05_samplers_exercises.ipynb | graded exercise |
| dpmpp_2m_step | solutions/05_samplers_exercises.ipynb | graded exercise |
| timestep_spacing | notebooks/05_ddim_and_samplers.ipynb | check yourself |

Notation (code name -> paper symbol):
    alpha_bar   ᾱ_t                    cumulative product of (1 - β) (DDPM)
    sigma       σ_t = sqrt((1 - ᾱ_t)/ᾱ_t)   noise level of x/sqrt(ᾱ) (Karras et al. 2022, k-diffusion)
    denoised    D(x; σ)                the model's estimate of x_0
    alpha_t, sigma_t   DPM-Solver's α_t = sqrt(ᾱ_t) = 1 / sqrt(σ² + 1) and σ_t = sqrt(1 - ᾱ_t) = σ α_t (Lu et al. 2022)
    lam         λ = log(α_t / σ_t) = -log σ   half the log-SNR; h = λ_next - λ > 0
    T           number of training timesteps (1000), timesteps 0 .. T-1
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from course_tools.checking import Exercise, Run
from course_lib import gaussian_model, samplers
from course_lib.schedules import make_timesteps, sd_schedule, sigmas_at

STEP_COUNTS = (5, 10, 20, 50, 100, 200, 500, 1000)

# ==============================================================================================
# Reference implementations
# ==============================================================================================


def linear_alpha_bars(T: int = 1000) -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), dim=0)


def evenly_spaced_timesteps(T: int, num_steps: int) -> torch.Tensor:
    """num_steps integer timesteps from T-1 down to 0, evenly spaced ("linspace" spacing)."""
    return torch.from_numpy(np.linspace(T - 1, 0, num_steps).round().astype(np.int64))


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) with eta = 0: predict x_0, then re-noise it to the previous level
    along the same noise direction. No clamping: latents do not live in [-1, 1]."""
    x0 = (x_t - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
    return math.sqrt(alpha_bar_prev) * x0 + math.sqrt(1 - alpha_bar_prev) * eps


def gaussian_ode_error(x_T: torch.Tensor, num_steps: int, sigma_data: float = 0.5, model_sigma: float | None = None,
                       T: int = 1000) -> float:
    """MSE between DDIM's end point and the exact probability-flow ODE solution for data ~ N(0, sigma_data²),
    starting from x_T at t = T-1, with the optimal noise predictor of data ~ N(0, model_sigma²)."""
    model_sigma = sigma_data if model_sigma is None else model_sigma
    ab = linear_alpha_bars(T)
    ts = evenly_spaced_timesteps(T, num_steps)
    x = x_T.double()
    for i, t in enumerate(ts.tolist()):
        a = float(ab[t])
        a_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        eps = math.sqrt(1 - a) * x / (a * model_sigma**2 + 1 - a)  # E[eps | x_t] for Gaussian data
        x = ddim_step(x, eps, a, a_prev)
    a_T = float(ab[T - 1])
    exact = sigma_data * x_T.double() / math.sqrt(a_T * sigma_data**2 + 1 - a_T)
    return float(((x - exact) ** 2).mean())


def knee(mses: dict) -> int:
    """The first step count after which the next one lowers the MSE by less than 10 %."""
    counts = sorted(mses)
    for a, b in zip(counts, counts[1:]):
        if (mses[a] - mses[b]) / mses[a] < 0.1:
            return a
    return counts[-1]


def sigmas_from_alpha_bars(alpha_bars: torch.Tensor) -> torch.Tensor:
    return ((1 - alpha_bars.double()) / alpha_bars.double()).sqrt()


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Euler on dx/dσ = (x - D(x; σ)) / σ (Karras et al. 2022, eq. 3 and alg. 1)."""
    d = (x.double() - denoised.double()) / sigma
    return x.double() + d * (sigma_next - sigma)


def dpmpp_2m_step(x: torch.Tensor, x0: torch.Tensor, x0_prev: torch.Tensor | None, sigma_prev: float | None,
                  sigma: float, sigma_next: float) -> torch.Tensor:
    """One step of DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2) on x = x_t, from Karras' σ to σ_next.

    With α_t = 1 / sqrt(σ² + 1), σ_t = σ α_t, λ = -log σ, h = λ_next - λ (so e^-h = σ_next / σ):
        first order (no x0_prev, or σ_next = 0):  x_next = (σ_t_next / σ_t) x - α_next (e^-h - 1) x0   (DDIM)
        second order:  D = x0 + (x0 - x0_prev) / (2 r),  r = h_prev / h,  then the same step with D.
    As course_lib.samplers.dpmpp_2m and diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++").
    """
    x, x0 = x.double(), x0.double()
    alpha, alpha_next = 1 / math.sqrt(sigma**2 + 1), 1 / math.sqrt(sigma_next**2 + 1)
    c_x = (sigma_next * alpha_next) / (sigma * alpha)  # σ_t_next / σ_t
    c_d = alpha_next * (sigma_next / sigma - 1)  # α_next (e^-h - 1)
    if x0_prev is None or sigma_next == 0:
        return c_x * x - c_d * x0
    r = math.log(sigma_prev / sigma) / math.log(sigma / sigma_next)  # h_prev / h
    D = x0 + (x0 - x0_prev.double()) / (2 * r)
    return c_x * x - c_d * D


# ==============================================================================================
# Exercise: the DDIM step estimator
# ==============================================================================================
DDIM_ESTIMATOR = Exercise("ddim_step_estimator", "DDIM step estimator", targets=("DDIMStepEstimator",),
                          call_timeout=20.0)


@DDIM_ESTIMATOR.setup
def _(run: Run, learner) -> dict:
    return {"est": run.call(learner.DDIMStepEstimator, label="DDIMStepEstimator()")}


@DDIM_ESTIMATOR.check("timesteps(n): n integers from T-1 down to 0, evenly spaced", points=1,
                      hint="np.linspace(T - 1, 0, n).round(), as integers. range(0, T, T // n) starts at 980 for "
                           "n = 50 (never at pure noise) and gives 4 steps for n = 3.")
def _(run, learner):
    for n in (3, 7, 50, 1000, int(run.rng(0).integers(2, 999))):
        got = run.call(learner.est.timesteps, n)
        run.tensor(got, f"timesteps({n})", shape=(n,))
        run.close(got, evenly_spaced_timesteps(1000, n), f"timesteps({n})", rtol=0, atol=0, kind="tensor")


@DDIM_ESTIMATOR.check("ddim_step(x_t, eps, t, t_prev) is DDIM's update with eta = 0, and no clamping", points=2,
                      hint="x0 = (x_t - sqrt(1 - ᾱ_t)·eps) / sqrt(ᾱ_t); x_prev = sqrt(ᾱ_prev)·x0 + sqrt(1 - ᾱ_prev)·eps,"
                           " with ᾱ_prev = 1 when t_prev < 0. Do not clamp x0 to [-1, 1]: these signals (and SD's "
                           "latents) go beyond it.")
def _(run, learner):
    ab = linear_alpha_bars()
    for k, (t, t_prev) in enumerate([(999, 979), (500, 250), (20, 0), (0, -1), (999, -1)]):
        x0 = 3 * run.randn(64, k=k, dtype=torch.float64)
        eps = run.randn(64, k=k + 10, dtype=torch.float64)
        x_t = ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * eps
        got = run.call(learner.est.ddim_step, x_t, eps, t, t_prev)
        want = ddim_step(x_t, eps, float(ab[t]), float(ab[t_prev]) if t_prev >= 0 else 1.0)
        run.close(got, want, f"ddim_step(x_t, eps, {t}, {t_prev})", rtol=1e-5, atol=1e-6, kind="tensor")


@DDIM_ESTIMATOR.check("Verify: with the perfect noise predictor the reconstruction MSE is near 0 at every step count",
                      points=2, hint="The oracle returns the exact noise used to make x_T; then every DDIM step lands "
                                     "exactly on the same trajectory. Work in float64, and do not clamp.")
def _(run, learner):
    got = run.call(learner.est.sweep, list(STEP_COUNTS))
    run.expect(isinstance(got, dict) and sorted(got) == list(STEP_COUNTS), f"a dict keyed by {list(STEP_COUNTS)}",
               f"{str(got)[:80]}")
    mses = {n: run.number(got[n], f"sweep(...)[{n}]") for n in STEP_COUNTS}
    run.expect(all(0 <= m < 1e-8 for m in mses.values()), "every MSE below 1e-8",
               ", ".join(f"{n}: {m:.2g}" for n, m in mses.items()))


@DDIM_ESTIMATOR.check("ddim_reconstruct(x0, n) recovers any signal, not only the built-in one",
                      hint="Noise x0 to t = T-1 with fresh noise, then run the DDIM steps with the oracle predictor.")
def _(run, learner):
    for k, n in enumerate((4, 37)):
        x0 = 2.5 * run.randn(48, k=k + 3, dtype=torch.float64)
        got = run.call(learner.est.ddim_reconstruct, x0, n)
        run.close(got, x0, f"ddim_reconstruct(<random signal>, {n})", rtol=1e-4, atol=1e-4, kind="tensor")


@DDIM_ESTIMATOR.check("ode_error(x_T, n): DDIM against the exact ODE solution for Gaussian data", points=2,
                      hint="Predictor: eps = sqrt(1 - ᾱ)·x / (ᾱ·model_sigma² + 1 - ᾱ); exact end point: "
                           "sigma_data·x_T / sqrt(ᾱ_{T-1}·sigma_data² + 1 - ᾱ_{T-1}); return the MSE between them.")
def _(run, learner):
    x_T = run.randn(256, k=5, dtype=torch.float64)
    for n, kw in [(5, {}), (50, {}), (20, {"sigma_data": 2.0}), (50, {"model_sigma": 0.55})]:
        got = run.call(learner.est.ode_error, x_T, n, **kw)
        run.close(got, gaussian_ode_error(x_T, n, **kw), f"ode_error(x_T, {n}{''.join(f', {k}={v}' for k, v in kw.items())})",
                  rtol=1e-4, atol=1e-12, kind="number")


@DDIM_ESTIMATOR.check("knee(mses): the first step count after which the next one gains less than 10 %",
                      hint="Go through the step counts in increasing order; return the count n whose successor "
                           "improves the MSE by less than 10 % of mse[n]; if none does, the largest count.")
def _(run, learner):
    rng = run.rng(6)
    cases = [{5: 1.0, 10: 0.5, 20: 0.46, 50: 0.45}, {5: 1.0, 10: 0.25, 20: 0.06}, {10: 0.3, 5: 0.9, 20: 0.29}]
    for _ in range(2):
        vals = np.sort(rng.random(6))[::-1] * 10
        cases.append({int(n): float(v) for n, v in zip((5, 10, 20, 50, 100, 200), vals)})
    for case in cases:
        run.equal(run.call(learner.est.knee, case), knee(case), f"knee({ {k: round(v, 3) for k, v in case.items()} })")


# ==============================================================================================
# Exercise: one Euler step
# ==============================================================================================
EULER = Exercise("euler_step", "One Euler step", targets=("sigmas_from_alpha_bars", "scale_model_input",
                                                               "euler_step"))


@EULER.check("sigmas_from_alpha_bars(alpha_bars) = sqrt((1 - ᾱ) / ᾱ)",
             hint="σ is the noise level of x_t / sqrt(ᾱ_t): x_t = sqrt(ᾱ)(x_0 + σ·eps).")
def _(run, learner):
    for ab in (linear_alpha_bars(), torch.rand(5, generator=run.generator(0), dtype=torch.float64) * 0.98 + 0.01):
        run.close(run.call(learner.sigmas_from_alpha_bars, ab), sigmas_from_alpha_bars(ab),
                  f"sigmas_from_alpha_bars(<{len(ab)} values>)", rtol=1e-5, kind="tensor")


@EULER.check("scale_model_input(x, sigma) = x / sqrt(sigma² + 1)",
             hint="The model was trained on x_t = sqrt(ᾱ)(x_0 + σ·eps), which is x / sqrt(σ² + 1) in sigma space.")
def _(run, learner):
    for k, sigma in enumerate((14.6, 0.03, float(run.rng(1).uniform(0.1, 10)))):
        x = run.randn(2, 4, 8, 8, k=k) * sigma
        run.close(run.call(learner.scale_model_input, x, sigma), x.double() / math.sqrt(sigma**2 + 1),
                  f"scale_model_input(x, {sigma:g})", rtol=1e-5, atol=1e-6, kind="tensor")


@EULER.check("euler_step(x, denoised, sigma, sigma_next) follows dx/dσ = (x - denoised) / σ", points=2,
             hint="d = (x - denoised) / sigma; return x + d · (sigma_next - sigma).")
def _(run, learner):
    for k, (sigma, sigma_next) in enumerate([(14.6, 9.0), (1.0, 0.5), (0.2, 0.05)]):
        x = run.randn(2, 4, 8, 8, k=k) * sigma
        denoised = run.randn(2, 4, 8, 8, k=k + 5)
        run.close(run.call(learner.euler_step, x, denoised, sigma, sigma_next), euler_step(x, denoised, sigma, sigma_next),
                  f"euler_step(x, denoised, {sigma}, {sigma_next})", rtol=1e-5, atol=1e-5, kind="tensor")


@EULER.check("the last step, to sigma_next = 0, lands exactly on the denoised estimate",
             hint="x + (x - D)/σ · (0 - σ) = D: the final Euler step returns the model's x_0 estimate.")
def _(run, learner):
    x, denoised = run.randn(3, 16, k=7) * 0.7, run.randn(3, 16, k=8)
    run.close(run.call(learner.euler_step, x, denoised, 0.7, 0.0), denoised, "euler_step(x, denoised, 0.7, 0.0)",
              rtol=1e-5, atol=1e-5, kind="tensor")


@EULER.check("Verify: a whole Euler loop converges to the exact ODE solution as the steps grow", points=2,
             hint="The Euler method is first order: 4x the steps should cut the error about 4x (the MSE about 16x).")
def _(run, learner):
    s = 0.5  # data ~ N(0, s²): D(x; σ) = x·s² / (s² + σ²) and x(0) = x(σ_max)·s / sqrt(s² + σ_max²)
    sig_all = sigmas_from_alpha_bars(linear_alpha_bars())
    x_start = run.randn(256, k=9, dtype=torch.float64) * math.sqrt(s**2 + float(sig_all[-1]) ** 2)
    errors = {}
    for n in (10, 40):
        sigmas = sig_all[evenly_spaced_timesteps(1000, n)].tolist() + [0.0]
        x = x_start
        for sigma, sigma_next in zip(sigmas, sigmas[1:]):
            x = run.call(learner.euler_step, x, x * s**2 / (s**2 + sigma**2), sigma, sigma_next,
                         label=f"euler_step(x, denoised, {sigma:.4g}, {sigma_next:.4g})")
            x = torch.as_tensor(run.tensor(x, "euler_step(...)", shape=x_start.shape))
        exact = x_start * s / math.sqrt(s**2 + float(sig_all[-1]) ** 2)
        errors[n] = float(((x - exact) ** 2).mean())
    run.expect(errors[10] / max(errors[40], 1e-300) > 8, "the MSE at 40 steps at least 8x below the MSE at 10 steps",
               f"MSE {errors[10]:.3g} at 10 steps, {errors[40]:.3g} at 40")


# ==============================================================================================
# Exercise: one DPM-Solver++(2M) step
# ==============================================================================================
DPMPP_2M = Exercise("dpmpp_2m_step", "One DPM-Solver++(2M) step", targets=("dpmpp_2m_step",))

# (sigma_prev, sigma, sigma_next): uneven steps, so that r = h_prev / h is not 1
_DPM_STEPS = [(14.6, 6.0, 2.2), (3.0, 1.1, 0.5), (0.9, 0.3, 0.04)]


def _dpm_inputs(run: Run, k: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t = α (x0 + σ eps) and two different x0 estimates, float32 of shape (2, 4, 8, 8)."""
    x0, x0_prev = run.randn(2, 4, 8, 8, k=k), run.randn(2, 4, 8, 8, k=k + 20)
    x = (x0 + sigma * run.randn(2, 4, 8, 8, k=k + 40)) / math.sqrt(sigma**2 + 1)
    return x, x0, x0_prev


def dpmpp_2m_mistakes(x: torch.Tensor, x0: torch.Tensor, x0_prev: torch.Tensor | None, sigma_prev: float | None,
                      sigma: float, sigma_next: float) -> dict[str, torch.Tensor]:
    """The usual wrong answers to `dpmpp_2m_step`, each with the hint that names it."""
    alpha, alpha_next = 1 / math.sqrt(sigma**2 + 1), 1 / math.sqrt(sigma_next**2 + 1)
    sigma_t, sigma_t_next = sigma * alpha, sigma_next * alpha_next
    x, x0 = x.double(), x0.double()
    D = x0
    if x0_prev is not None:
        r = math.log(sigma_prev / sigma) / math.log(sigma / sigma_next)
        D = x0 + (x0 - x0_prev.double()) / (2 * r)
    out = {
        "h has the wrong sign: h = λ_next - λ = log(σ/σ_next) > 0, so e^-h = σ_next/σ < 1 and α_next·(e^-h - 1) < 0.":
            (sigma_t_next / sigma_t) * x - alpha_next * (sigma / sigma_next - 1) * D,
        "These are DPM-Solver's coefficients for the noise prediction, x_next = (α_next/α)·x - σ_t_next·(e^h - 1)·ε̂ "
        "(Lu et al. 2022a). DPM-Solver++ integrates the data prediction x0: x_next = (σ_t_next/σ_t)·x - "
        "α_next·(e^-h - 1)·D.": (alpha_next / alpha) * x - sigma_t_next * (sigma / sigma_next - 1) * D,
    }
    if x0_prev is not None:
        out["This is the first-order step (DDIM): a middle step also uses the previous x0, "
            "D = x0 + (x0 - x0_prev) / (2r) with r = h_prev / h."] = dpmpp_2m_step(x, x0, None, None, sigma, sigma_next)
        out["The correction has the wrong sign: D = x0 + (x0 - x0_prev) / (2r), the newer estimate first."] = \
            dpmpp_2m_step(x, x0, x0_prev, sigma_prev, sigma, sigma_next) + 2 * alpha_next * (sigma_next / sigma - 1) \
            * (D - x0)  # D' = x0 - (D - x0)
    return out


def _dpm_hint(have: np.ndarray, *args: Any) -> str | None:
    """The hint of the first usual mistake the learner's answer equals; None when it is none of them."""
    for hint, wrong in dpmpp_2m_mistakes(*args).items():
        if np.allclose(have, wrong.numpy(), rtol=1e-4, atol=1e-5):
            return hint
    return None


def _dpm_step_check(run: Run, learner, args: tuple, label: str) -> None:
    got = run.call(learner.dpmpp_2m_step, *args, label=label)
    have = run.tensor(got, label, shape=args[0].shape)
    run.close(got, dpmpp_2m_step(*args), label, rtol=1e-4, atol=1e-5, kind="tensor", hint=_dpm_hint(have, *args))


@DPMPP_2M.check("the first step (x0_prev = None) is first order: exactly one DDIM step", points=2,
                hint="α_t = 1/sqrt(σ² + 1), σ_t = σ·α_t, e^-h = σ_next/σ (λ = -log σ); "
                     "x_next = (σ_t_next/σ_t)·x - α_next·(e^-h - 1)·x0. Note the sign: e^-h - 1 < 0.")
def _(run, learner):
    for k, (_, s, sn) in enumerate(_DPM_STEPS):
        x, x0, _ = _dpm_inputs(run, k, s)
        ab_s, ab_n = 1 / (s**2 + 1), 1 / (sn**2 + 1)  # the same step written as DDIM's (eq. 12, eta = 0)
        eps = (x.double() - math.sqrt(ab_s) * x0.double()) / math.sqrt(1 - ab_s)
        assert torch.allclose(dpmpp_2m_step(x, x0, None, None, s, sn),
                              math.sqrt(ab_n) * x0.double() + math.sqrt(1 - ab_n) * eps, atol=1e-6)
        _dpm_step_check(run, learner, (x, x0, None, None, s, sn), f"dpmpp_2m_step(x, x0, None, None, {s}, {sn})")


@DPMPP_2M.check("a middle step is second order: D = x0 + (x0 - x0_prev) / (2r), r = h_prev / h", points=2,
                hint="h = λ_next - λ = log(σ/σ_next) > 0, h_prev = log(σ_prev/σ); work with the data prediction "
                     "x0 (DPM-Solver++), not the noise: x_next = (σ_t_next/σ_t)·x - α_next·(e^-h - 1)·D.")
def _(run, learner):
    for k, (sp, s, sn) in enumerate(_DPM_STEPS):
        x, x0, x0_prev = _dpm_inputs(run, k + 3, s)
        _dpm_step_check(run, learner, (x, x0, x0_prev, sp, s, sn), f"dpmpp_2m_step(x, x0, x0_prev, {sp}, {s}, {sn})")


@DPMPP_2M.check("the last step, to sigma_next = 0, is first order and lands on x0", points=1,
                hint="At σ_next = 0: α_next = 1, σ_t_next = 0 and e^-h = σ_next/σ = 0, so x_next = x0 "
                     "(diffusers' final_sigmas_type='zero'). log(0) is -inf: take e^-h as σ_next/σ.")
def _(run, learner):
    x, x0, x0_prev = _dpm_inputs(run, 7, 0.3)
    label = "dpmpp_2m_step(x, x0, x0_prev, 0.9, 0.3, 0.0)"
    got = run.call(learner.dpmpp_2m_step, x, x0, x0_prev, 0.9, 0.3, 0.0, label=label)
    run.close(got, x0, label, rtol=1e-5, atol=1e-6, kind="tensor")


def _dpm_loop(step: Any, noise: torch.Tensor, timesteps: torch.Tensor, data_std: float = 0.5) -> torch.Tensor:
    """A whole DPM-Solver++(2M) loop on SD's schedule, the exact Gaussian-data model, built from `step`."""
    sched = sd_schedule()
    model = gaussian_model.gaussian_data_model(sched, data_std)
    sig = sigmas_at(sched, timesteps).tolist() + [0.0]
    x, x0_prev = noise, None
    for i, t in enumerate(timesteps.tolist()):
        alpha = 1 / math.sqrt(sig[i] ** 2 + 1)
        eps = model(x, torch.full((x.shape[0],), t), None).double()
        x0 = (x.double() - sig[i] * alpha * eps) / alpha
        x = torch.as_tensor(step(x, x0, x0_prev, sig[i - 1] if i else None, sig[i], sig[i + 1])).double()
        x0_prev = x0
    return x


@DPMPP_2M.check("Verify: a whole loop of your steps equals the course's dpmpp_2m (and so diffusers')", points=2,
                hint="Each step: first order when x0_prev is None or sigma_next = 0, second order otherwise. The "
                     "loop here passes the previous step's x0 and sigma; the course's sampler is "
                     "course_lib.samplers.dpmpp_2m.")
def _(run, learner):
    sched = sd_schedule()
    for k, n in enumerate((4, 10)):
        noise = run.randn(2, 4, 8, 8, k=k + 30)
        ts = make_timesteps(n, spacing="trailing")

        def step(*args, _i=iter(range(n))):
            i = next(_i)
            got = run.call(learner.dpmpp_2m_step, *args, label=f"dpmpp_2m_step(...) at step {i} of a {n}-step loop")
            return run.tensor(got, f"dpmpp_2m_step(...) at step {i}", shape=noise.shape)

        got = _dpm_loop(step, noise, ts)
        want = samplers.dpmpp_2m(gaussian_model.gaussian_data_model(sched, 0.5), noise, sched, ts)
        run.close(got, want, f"a {n}-step loop of dpmpp_2m_step against samplers.dpmpp_2m", rtol=1e-4, atol=1e-4,
                  kind="any")


# ==============================================================================================
# Check yourself (notebooks/05_ddim_and_samplers.ipynb): which timesteps a sampler visits under "leading"
# (with SD's steps_offset), "trailing" and "linspace" spacing
# ==============================================================================================


def spaced_timesteps(num_steps: int, spacing: str, steps_offset: int = 1, T: int = 1000) -> torch.Tensor:
    """diffusers' spacings (Lin et al. 2023, Table 2), noisiest first; steps_offset applies to "leading" only."""
    return make_timesteps(num_steps, T, spacing, steps_offset if spacing == "leading" else 0)


TIMESTEP_SPACING = Exercise("timestep_spacing", "Check yourself: timestep spacing", targets=("spaced_timesteps",))


def _ts(run: Run, learner, n: int, spacing: str, **kw: Any) -> np.ndarray:
    label = f"spaced_timesteps({n}, {spacing!r}" + "".join(f", {k}={v}" for k, v in kw.items()) + ")"
    got = run.call(learner.spaced_timesteps, n, spacing, **kw, label=label)
    arr = run.tensor(got, label, shape=(n,), kind="any")
    run.expect(bool(np.all(np.diff(arr) < 0)), f"{label} in decreasing order (noisiest first)",
               f"{arr[:5].astype(int).tolist()}...", "Samplers start at the noisiest timestep: flip the order.")
    return arr


@TIMESTEP_SPACING.check('"leading": multiples of T // N, plus steps_offset (SD: 981, 961, ..., 1 for 50 steps)',
                        points=1,
                        hint="np.arange(N)[::-1] * (T // N) + steps_offset.")
def _(run, learner):
    for n, off in ((50, 1), (20, 0), (int(run.rng(2).integers(3, 60)), 1)):
        want = spaced_timesteps(n, "leading", off).numpy()
        run.close(_ts(run, learner, n, "leading", steps_offset=off), want, f"spaced_timesteps({n}, 'leading', "
                  f"steps_offset={off})", rtol=0, atol=0)


@TIMESTEP_SPACING.check('"trailing": count back from T - 1 in steps of T / N (999, 979, ..., 19 for 50 steps)',
                        points=1,
                        hint="np.round(np.arange(T, 0, -T / N)) - 1: it always starts at the last training timestep.")
def _(run, learner):
    for n in (50, 7, int(run.rng(3).integers(3, 60))):
        got = _ts(run, learner, n, "trailing")
        want = spaced_timesteps(n, "trailing").numpy()
        run.equal(int(got[0]), 999, f"spaced_timesteps({n}, 'trailing')[0]",
                  "Trailing spacing starts at T - 1 = 999, the timestep with the least signal.")
        run.close(got, want, f"spaced_timesteps({n}, 'trailing')", rtol=0, atol=1,
                  hint="Count back from T in steps of T / N, round, subtract 1.")


@TIMESTEP_SPACING.check('"linspace": N points evenly over [0, T - 1], rounded (999 ... 0)', points=1,
                        hint="np.linspace(0, T - 1, N).round()[::-1]: both ends are visited.")
def _(run, learner):
    for n in (50, 7, int(run.rng(4).integers(3, 60))):
        got = _ts(run, learner, n, "linspace")
        run.equal((int(got[0]), int(got[-1])), (999, 0), f"spaced_timesteps({n}, 'linspace') first and last")
        run.close(got, spaced_timesteps(n, "linspace").numpy(), f"spaced_timesteps({n}, 'linspace')", rtol=0, atol=1)
