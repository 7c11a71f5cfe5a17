"""The DDIM sampler of the course's source article, kept as it was written, for lesson 5 to take apart.

The article is episode 85 of a lesson series on diffusion models; its `ddim_sample` is copied here
verbatim (only the comments are the course's), with what it needs to run (`article_schedule`, the
timesteps it visits) and a measurement of how it departs from Stable Diffusion's DDIM
(`article_ddim_departures`). Lesson 5 ("DDIM and modern samplers"), section 6, shows it whole and
runs it on the tiny SD; tests/test_article_ddim.py proves that the course's `samplers.ddim`,
configured like it, reproduces it exactly. Names follow the notation block in
course_lib/schedules.py, except inside the copied function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gaussian_model import gaussian_data_model
from .samplers import ddim
from .schedules import NoiseSchedule, make_timesteps, sd_schedule


@dataclass
class ArticleSchedule:
    """The schedule object the article's code expects: `T` and `alpha_bars`."""

    T: int
    alpha_bars: torch.Tensor  # (T,)


def article_schedule(schedule: NoiseSchedule) -> ArticleSchedule:
    """A course NoiseSchedule in the shape the article's `ddim_sample` reads."""
    return ArticleSchedule(T=schedule.num_train_timesteps, alpha_bars=schedule.alphas_cumprod)


@torch.no_grad()
def article_ddim_sample(model, schedule, shape, num_steps=50, eta=0.0):
    """A faithful copy of the article's `ddim_sample` (only the comments are the course's).

    model(x, t_batch) predicts the noise; schedule has `.T` and `.alpha_bars` (see
    `article_schedule`). Kept with its departures from Stable Diffusion's DDIM, which
    `article_ddim_departures` measures: x0 clamped to [-1, 1] (wrong for latents), the last step
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


def article_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The timesteps the article's sampler visits: range(0, T, T // num_steps), noisiest first."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    step = num_train_timesteps // num_steps
    if step == 0:
        raise ValueError(f"the article's spacing needs num_steps <= T = {num_train_timesteps}, got {num_steps}")
    return torch.arange(0, num_train_timesteps, step).flip(0)  # (>= num_steps,)


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a - b).double()
    return {"max_abs": d.abs().max().item(), "rms": d.pow(2).mean().sqrt().item()}


def article_ddim_departures(
    num_steps: int = 50, shape: tuple[int, ...] = (4, 4, 8, 8), data_std: float = 1.0, seed: int = 0
) -> dict:
    """Measure how the article's `ddim_sample` departs from Stable Diffusion's DDIM.

    Drives both with the exact model for Gaussian "latents" of std `data_std` (SD's scaled
    latents have std close to 1) on SD's schedule, from the same starting noise (the article's
    own draw from the global RNG, with that RNG's state restored afterwards). It walks from
    the article's sampler to SD's DDIM one setting at a time and reports how far each change
    moves the final sample:
        clamp_x0          x0 clamped to [-1, 1]  ->  not clamped
        final_alpha_bar   last step to alpha_bar = 1  ->  alpha_bar_0 (set_alpha_to_one=False)
        spacing           range(0, T, T // N)  ->  "leading" + steps_offset 1
        total             the article's sampler  ->  SD's DDIM (all three)
    plus `reproduced_by_ddim` (the course's `ddim`, configured like the article's sampler, against
    the article's code), `model_calls` (asked vs run, for a few step counts) and `eta_ignored` (eta = 0 vs
    eta = 1 in the article's code). Differences are {"max_abs", "rms"}; `sample_rms` gives scale.
    """
    schedule = sd_schedule()
    T = schedule.num_train_timesteps
    model = gaussian_data_model(schedule, data_std)

    def article_model(x, t):  # the article's signature, model(x, t)
        return model(x, t, None)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        noise = torch.randn(shape)  # the draw article_ddim_sample makes first
        torch.manual_seed(seed)
        article_out = article_ddim_sample(article_model, article_schedule(schedule), shape, num_steps)
        torch.manual_seed(seed)
        article_out_eta1 = article_ddim_sample(article_model, article_schedule(schedule), shape, num_steps,
                                               eta=1.0)

    clamped = []
    article_ts = article_timesteps(num_steps, T)
    like_article = ddim(model, noise, schedule, article_ts, set_alpha_to_one=True, clip_x0=1.0,
                     callback=lambda i, t, x, x0: clamped.append((x0.abs() >= 1).double().mean().item()))
    no_clamp = ddim(model, noise, schedule, article_ts, set_alpha_to_one=True)
    sd_final = ddim(model, noise, schedule, article_ts, set_alpha_to_one=False)
    sd_ddim = ddim(model, noise, schedule, make_timesteps(num_steps, T, "leading", 1), set_alpha_to_one=False)
    sd_ts = make_timesteps(num_steps, T, "leading", 1)
    return {
        "num_steps": num_steps,
        "sample_rms": sd_ddim.double().pow(2).mean().sqrt().item(),
        "reproduced_by_ddim": _diff(like_article, article_out),
        "clamp_x0": {**_diff(article_out, no_clamp), "fraction_clamped_last_step": clamped[-1],
                     "fraction_clamped_mean": sum(clamped) / len(clamped)},
        "final_alpha_bar": {**_diff(no_clamp, sd_final), "article": 1.0, "sd": schedule.alphas_cumprod[0].item()},
        "spacing": {**_diff(sd_final, sd_ddim),
                    "article_first_last": (int(article_ts[0]), int(article_ts[-1])),
                    "sd_first_last": (int(sd_ts[0]), int(sd_ts[-1]))},
        "total": _diff(article_out, sd_ddim),
        "model_calls": {n: {"asked": n, "run": len(article_timesteps(n, T))}
                        for n in sorted({3, 7, 30, num_steps})},
        "eta_ignored": _diff(article_out, article_out_eta1),
    }
