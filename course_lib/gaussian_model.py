"""A model whose right answer is known: the exact denoiser for Gaussian data.

Lesson 5 ("DDIM and modern samplers") uses it to measure each sampler's own discretisation error,
which on a trained U-Net can only be estimated; tests/test_samplers.py uses it to check the order
of each ODE solver, and course_lib.article_ddim to measure the article's DDIM against SD's.
Names follow the notation block in course_lib/schedules.py.

For data x0 ~ N(0, data_std^2 I) and x_t = sqrt_ab x0 + sqrt_1m_ab eps, x_t is Gaussian too,
x_t ~ N(0, var) with var = alpha_bar data_std^2 + 1 - alpha_bar, and the best possible (Bayes)
predictions are linear in x_t:
    E[eps | x_t] = sqrt_1m_ab x_t / var,      E[x0 | x_t] = data_std^2 sqrt_ab x_t / var.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .samplers import PREDICTION_TYPES, Model, PredictionType
from .schedules import NoiseSchedule, alpha_bar_at


def gaussian_data_model(
    schedule: NoiseSchedule, data_std: float = 1.0, prediction_type: PredictionType = "epsilon"
) -> Model:
    """The exact (Bayes-optimal) model for data x0 ~ N(0, data_std^2 I), per element.

    It answers model(x_t, t, cond) with E[eps | x_t] (or v = sqrt_ab eps - sqrt_1m_ab x0 built from
    E[eps | x_t] and E[x0 | x_t]), at possibly fractional timesteps, computed in float64. A
    sampler driven by it should end at `gaussian_data_ode_solution`; what it misses is the
    sampler's own discretisation error, measurable exactly. cond is ignored.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
    if data_std <= 0:
        raise ValueError(f"data_std must be positive, got {data_std}")

    def model(x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        alpha_bar = alpha_bar_at(schedule, t).to(x.device, torch.float64)
        alpha_bar = alpha_bar.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ...)
        sqrt_ab, sqrt_1m_ab = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x_t = x.double()
        var = alpha_bar * data_std**2 + 1 - alpha_bar
        eps = sqrt_1m_ab * x_t / var
        if prediction_type == "epsilon":
            return eps.to(x.dtype)
        x0 = data_std**2 * sqrt_ab * x_t / var
        return (sqrt_ab * eps - sqrt_1m_ab * x0).to(x.dtype)

    return model


def gaussian_data_ode_solution(
    x: torch.Tensor, alpha_bar_start: float, alpha_bar_end: float, data_std: float = 1.0
) -> torch.Tensor:
    """Where the probability-flow ODE carries x from alpha_bar_start to alpha_bar_end, for Gaussian data.

    The flow is linear and maps N(0, var_start) onto N(0, var_end), var = alpha_bar data_std^2 +
    1 - alpha_bar, so it is x * sqrt(var_end / var_start): the answer an exact ODE solver (DDIM
    with infinitely many steps) gives with `gaussian_data_model`.
    """
    var_start = alpha_bar_start * data_std**2 + 1 - alpha_bar_start
    var_end = alpha_bar_end * data_std**2 + 1 - alpha_bar_end
    return x * math.sqrt(var_end / var_start)
