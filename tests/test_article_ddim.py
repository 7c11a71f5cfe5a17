"""The DDIM sampler of the course's source article (episode 85 of a lesson series on diffusion models):
reproduced exactly, its departures from SD's DDIM measured, and its exercise 3 (DDIM step quality with a
perfect noise predictor) answered with the course's functions.

Run with -s to see exercise 3's table.
"""

import math

import pytest
import torch

from course_lib.article_ddim import article_ddim_departures, article_ddim_sample, article_schedule, article_timesteps
from course_lib.gaussian_model import gaussian_data_model, gaussian_data_ode_solution
from course_lib.samplers import ddim
from course_lib.schedules import NoiseSchedule, add_noise, linear_betas, make_timesteps, sd_schedule

SCHED = sd_schedule()


def article_style_model(x, t):
    """The article's model signature, model(x, t): a fixed function of x and t standing in for a U-Net."""
    w = (t.double() / 1000).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return 0.9 * torch.tanh(x) * (1 - 0.5 * w) + 0.3 * torch.sin(2 * x + 4 * w)


@pytest.mark.parametrize("num_steps", [50, 7, 3, 1])
def test_course_ddim_reproduces_the_article_exactly(num_steps):
    shape = (2, 4, 8, 8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        article_out = article_ddim_sample(article_style_model, article_schedule(SCHED), shape, num_steps)
        torch.manual_seed(123)
        noise = torch.randn(shape)  # the article's sampler draws its noise from the global RNG
    ours = ddim(lambda x, t, cond: article_style_model(x, t), noise, SCHED, article_timesteps(num_steps),
                set_alpha_to_one=True, clip_x0=1.0)
    assert (ours - article_out).abs().max().item() <= 1e-6
    # and configured like SD instead, the course lands somewhere else
    sd = ddim(lambda x, t, cond: article_style_model(x, t), noise, SCHED, make_timesteps(num_steps))
    assert (sd - article_out).abs().max().item() > 1e-3


def test_article_timesteps():
    assert article_timesteps(50).tolist()[:3] == [980, 960, 940] and article_timesteps(50)[-1].item() == 0
    assert len(article_timesteps(7)) == 8  # 1000 // 7 = 142 -> 0, 142, ..., 994: one step more than asked
    assert len(article_timesteps(3)) == 4
    with pytest.raises(ValueError, match="num_steps <= T"):
        article_timesteps(1001)


def test_measured_departures():
    state = torch.random.get_rng_state()
    d = article_ddim_departures(num_steps=50)
    assert torch.equal(torch.random.get_rng_state(), state), "the measurement must not disturb the global RNG"

    assert d["reproduced_by_ddim"]["max_abs"] <= 1e-6
    assert 0.5 < d["sample_rms"] < 2  # latent-sized samples
    # clamping x0 to [-1, 1] cuts off a good part of unit-variance latents and moves the result a lot
    assert d["clamp_x0"]["fraction_clamped_last_step"] > 0.2
    assert d["clamp_x0"]["rms"] > 0.1 * d["sample_rms"]
    # landing on alpha_bar = 1 instead of alpha_bar_0 = 0.99915 is a small but real difference
    assert d["final_alpha_bar"]["sd"] < 1.0 == d["final_alpha_bar"]["article"]
    assert 0 < d["final_alpha_bar"]["rms"] < 0.01 * d["sample_rms"]
    # range(0, T, 20) visits 980 ... 0; SD's leading + 1 visits 981 ... 1
    assert d["spacing"]["article_first_last"] == (980, 0) and d["spacing"]["sd_first_last"] == (981, 1)
    assert d["spacing"]["rms"] > 0
    assert d["total"]["rms"] >= d["clamp_x0"]["rms"] * 0.9
    assert d["model_calls"][7] == {"asked": 7, "run": 8}
    assert d["model_calls"][50] == {"asked": 50, "run": 50}
    assert d["eta_ignored"]["max_abs"] == 0.0  # the article accepts eta and never uses it


# -----------------------------------------------------------------------------
# The article's exercise 3: DDIM step quality with a perfect noise predictor (toy 1-D, T = 1000, linear betas)

STEPS = [5, 10, 20, 50, 100, 200, 500, 1000]


def knee(steps, mse, threshold=0.10):
    """The first step count after which the next (larger) one cuts the MSE by less than `threshold`."""
    for n, m, m_next in zip(steps, mse, mse[1:]):
        if m_next > (1 - threshold) * m:
            return n
    return None


def table(title, steps, mse):
    lines = [title, f"{'steps':>6} {'MSE':>11} {'MSE / MSE(1000)':>16}"]
    lines += [f"{n:>6} {m:>11.3e} {m / mse[-1]:>16.3g}" for n, m in zip(steps, mse)]
    lines.append(f"knee: {knee(steps, mse)}")
    return "\n".join(lines)


def test_article_exercise_3_perfect_noise_predictor():
    T = 1000
    sched = NoiseSchedule.from_betas(linear_betas(T))  # DDPM's linear schedule
    i = torch.arange(256)
    x0 = 0.8 * torch.sin(2 * math.pi * 3 * i / 256).view(1, 256)  # a known signal of length 256
    eps = torch.randn(1, 256, generator=torch.Generator().manual_seed(0))
    x_T = add_noise(x0, eps, T - 1, sched)  # noise added at the last timestep

    def perfect(x, t, cond):
        return eps  # "returns the exact noise"

    def mse(timesteps_for):
        return [(ddim(perfect, x_T, sched, timesteps_for(n), set_alpha_to_one=True) - x0).pow(2).mean().item()
                for n in STEPS]

    # (a) the article's own spacing, range(0, T, T // n): it starts at T - T/n, not where the noise was added
    article_mse = mse(article_timesteps)
    # (b) trailing spacing starts at T - 1: DDIM is then exact at every step count
    trailing_mse = mse(lambda n: make_timesteps(n, T, "trailing"))
    print("\n" + table("(a) the article's spacing, perfect noise predictor", STEPS, article_mse))
    print(table("(b) trailing spacing, perfect noise predictor", STEPS, trailing_mse))

    # (b): no discretisation error at all. With the exact noise, x_t = sqrt(a) x0 + sqrt(1-a) eps holds
    # at every visited timestep, whatever the step count; what is left is float32 rounding.
    assert max(trailing_mse) < 1e-8
    assert knee(STEPS, trailing_mse) == STEPS[0]  # more steps never help
    # (a): large errors that shrink with the step count -- from the skipped start, not from the ODE
    assert article_mse[0] > 0.1 and article_mse[-1] < 1e-8
    assert all(b < 0.9 * a for a, b in zip(article_mse, article_mse[1:]))
    assert knee(STEPS, article_mse) is None
    assert all(s > 1e3 * t for s, t in zip(article_mse[:-1], trailing_mse[:-1]))


def test_article_exercise_3_where_discretisation_error_shows():
    """Where DDIM's discretisation error really shows: the exact denoiser for Gaussian data, whose ODE
    solution is known in closed form. The error falls like 1/n^2 (first-order solver): no knee either."""
    T = 1000
    sched = NoiseSchedule.from_betas(linear_betas(T))
    model = gaussian_data_model(sched, 1.0)
    x_T = torch.randn(16, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = gaussian_data_ode_solution(x_T, sched.alphas_cumprod[T - 1].item(), 1.0)
    gauss_mse = [(ddim(model, x_T, sched, make_timesteps(n, T, "trailing"), set_alpha_to_one=True) - exact)
                 .pow(2).mean().item() for n in STEPS]
    print("\n" + table("(c) trailing spacing, exact Gaussian-data denoiser (error vs the exact ODE solution)",
                       STEPS, gauss_mse))
    assert all(b < 0.5 * a for a, b in zip(gauss_mse, gauss_mse[1:]))
    assert gauss_mse[-1] < 1e-4 < gauss_mse[0]
    assert knee(STEPS, gauss_mse) is None
