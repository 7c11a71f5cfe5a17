"""The course's samplers equal diffusers' schedulers over whole sampling loops (max abs diff <= 1e-5, float32).

Each pair is driven by the same deterministic stand-in model, from the same noise, with the same
generator for the noise that stochastic samplers add. Settings are Stable Diffusion's own
(scaled-linear betas, steps_offset=1, set_alpha_to_one=False, clip_sample=False), loaded with
`from_config` as a pipeline would. Where diffusers is wrong (DDIM's previous-timestep arithmetic),
the test shows the difference and checks the course against a closed form instead.
"""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from course_lib.diffusers_bridge import diffusers_sampling_loop, sd_scheduler_config
from course_lib.samplers import ddim, ddpm, dpmpp_2m, euler, euler_ancestral, heun
from course_lib.schedules import (
    NoiseSchedule,
    karras_sigmas,
    make_timesteps,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    sd_schedule,
    timesteps_for_sigmas,
)

TOL = 1e-5
SD_CONFIG = sd_scheduler_config()  # Stable Diffusion 1.x's scheduler_config.json
STEPS = [1, 7, 20, 50]
PREDICTIONS = ["epsilon", "v_prediction"]
SCHED = sd_schedule()
ZSNR = NoiseSchedule.from_betas(rescale_zero_terminal_snr(scaled_linear_betas()))
_AB = {False: DDPMScheduler.from_config(SD_CONFIG).alphas_cumprod.double(),
       True: DDPMScheduler.from_config({**SD_CONFIG, "rescale_betas_zero_snr": True}).alphas_cumprod.double()}


def make_stand_in(zero_snr=False):
    """A fixed function of (x, t) shaped like a denoiser: the exact noise predictor for unit-variance
    data plus a nonlinear wiggle, so that samples stay O(1) and every step matters."""
    ab = _AB[zero_snr]

    def model(x, t, cond=None):
        t = t.double()
        lo = t.floor().long().clamp(0, len(ab) - 2)
        w = t - lo
        a = (ab[lo] * (1 - w) + ab[lo + 1] * w).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        phase = torch.cos(3 * t / 1000).view_as(a)
        out = (1 - a).sqrt() * x.double() + 0.3 * torch.tanh(x.roll(1, -1).double() - 0.5 * x.double()) * phase
        return out.to(x.dtype)

    return model


MODEL = make_stand_in()


def noise(seed=0, shape=(2, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def diffusers_loop(scheduler, num_steps, x, model, seed=None, **step_kwargs):
    """The denoising loop of StableDiffusionPipeline, without guidance; a seed for the stochastic schedulers
    only (HeunDiscreteScheduler.step takes no generator)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return diffusers_sampling_loop(scheduler, num_steps, x, model, generator=generator, **step_kwargs)


def max_diff(a, b):
    return (a - b).abs().max().item()


# -----------------------------------------------------------------------------
# one test per scheduler pair


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("num_steps", STEPS)
def test_ddpm(num_steps, prediction_type):
    ref = diffusers_loop(DDPMScheduler.from_config(SD_CONFIG, prediction_type=prediction_type), num_steps,
                         noise(), MODEL, seed=1)
    ours = ddpm(MODEL, noise(), SCHED, make_timesteps(num_steps), prediction_type=prediction_type,
                generator=torch.Generator().manual_seed(1))
    assert max_diff(ours, ref) <= TOL


def test_ddpm_original_1000_steps():
    """Ho et al.'s own setting: linear betas 1e-4..0.02, all 1000 steps, DDPMScheduler's defaults."""
    sched = DDPMScheduler(clip_sample=False)
    ref = diffusers_loop(sched, 1000, noise(), MODEL, seed=3)
    course = NoiseSchedule.from_betas(sched.betas)
    ours = ddpm(MODEL, noise(), course, make_timesteps(1000, steps_offset=0),
                generator=torch.Generator().manual_seed(3))
    assert max_diff(ours, ref) <= TOL


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("num_steps", STEPS)
def test_ddim(num_steps, eta, prediction_type):
    ref = diffusers_loop(DDIMScheduler.from_config(SD_CONFIG, prediction_type=prediction_type), num_steps,
                         noise(), MODEL, seed=2, eta=eta)
    ours = ddim(MODEL, noise(), SCHED, make_timesteps(num_steps), prediction_type=prediction_type, eta=eta,
                generator=torch.Generator().manual_seed(2))
    assert max_diff(ours, ref) <= TOL


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("num_steps", [1, 20, 50])  # step counts that divide 1000: diffusers is right there
def test_ddim_trailing(num_steps, prediction_type):
    config = dict(SD_CONFIG, prediction_type=prediction_type, timestep_spacing="trailing")
    ref = diffusers_loop(DDIMScheduler.from_config(config), num_steps, noise(), MODEL)
    ours = ddim(MODEL, noise(), SCHED, make_timesteps(num_steps, spacing="trailing"), prediction_type=prediction_type)
    assert max_diff(ours, ref) <= TOL


def test_ddim_set_alpha_to_one_and_clip():
    """diffusers' DDIMScheduler defaults (set_alpha_to_one=True, clip_sample=True): the pixel-space settings."""
    config = dict(SD_CONFIG, set_alpha_to_one=True, clip_sample=True)
    ref = diffusers_loop(DDIMScheduler.from_config(config), 20, noise(), MODEL)
    ours = ddim(MODEL, noise(), SCHED, make_timesteps(20), set_alpha_to_one=True, clip_x0=1.0)
    assert max_diff(ours, ref) <= TOL


def _euler_args(spacing, num_steps):
    # diffusers' Euler keeps linspace timesteps fractional, and scales the starting noise by
    # sigma_max for linspace/trailing but by sqrt(sigma_max^2 + 1) for leading
    init = "exact" if spacing == "leading" else "sigma_max"
    return make_timesteps(num_steps, spacing=spacing, integer=False), init


# One test per sampler, alike in shape on purpose: a failure names the sampler and its scheduler.
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])  # linspace: Euler's default, so SD's
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("num_steps", STEPS)
def test_euler(num_steps, prediction_type, spacing):
    config = dict(SD_CONFIG, prediction_type=prediction_type, timestep_spacing=spacing)
    ref = diffusers_loop(EulerDiscreteScheduler.from_config(config), num_steps, noise(), MODEL)
    ts, init = _euler_args(spacing, num_steps)
    ours = euler(MODEL, noise(), SCHED, ts, prediction_type=prediction_type, init_noise_sigma=init)
    assert max_diff(ours, ref) <= TOL


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("num_steps", STEPS)
def test_euler_ancestral(num_steps, prediction_type, spacing):
    config = dict(SD_CONFIG, prediction_type=prediction_type, timestep_spacing=spacing)
    ref = diffusers_loop(EulerAncestralDiscreteScheduler.from_config(config), num_steps, noise(), MODEL, seed=4)
    ts, init = _euler_args(spacing, num_steps)
    ours = euler_ancestral(MODEL, noise(), SCHED, ts, prediction_type=prediction_type, init_noise_sigma=init,
                           generator=torch.Generator().manual_seed(4))
    assert max_diff(ours, ref) <= TOL


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("num_steps", STEPS)
def test_heun(num_steps, prediction_type, spacing):
    config = dict(SD_CONFIG, prediction_type=prediction_type, timestep_spacing=spacing)
    calls = []
    counted = lambda x, t, cond=None: calls.append(1) or MODEL(x, t, cond)  # noqa: E731
    ref = diffusers_loop(HeunDiscreteScheduler.from_config(config), num_steps, noise(), MODEL)
    ts, init = _euler_args(spacing, num_steps)
    ours = heun(counted, noise(), SCHED, ts, prediction_type=prediction_type, init_noise_sigma=init)
    assert max_diff(ours, ref) <= TOL
    assert len(calls) == 2 * num_steps - 1  # two model calls per step, one on the last


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])  # linspace: SD's, via from_config
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("num_steps", STEPS)
def test_dpmpp_2m(num_steps, prediction_type, spacing):
    config = dict(SD_CONFIG, prediction_type=prediction_type, timestep_spacing=spacing,
                  algorithm_type="dpmsolver++", solver_order=2)
    ref = diffusers_loop(DPMSolverMultistepScheduler.from_config(config), num_steps, noise(), MODEL)
    ts = make_timesteps(num_steps, spacing=spacing, count_final_step=True)
    ours = dpmpp_2m(MODEL, noise(), SCHED, ts, prediction_type=prediction_type)
    assert max_diff(ours, ref) <= TOL


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("num_steps", [2, 7, 20])
def test_dpmpp_2m_karras_sigmas(num_steps, prediction_type):
    """use_karras_sigmas=True: the same sigmas, the model called at the same rounded timesteps, the same loop."""
    config = dict(SD_CONFIG, prediction_type=prediction_type, algorithm_type="dpmsolver++", solver_order=2,
                  use_karras_sigmas=True)
    scheduler = DPMSolverMultistepScheduler.from_config(config)
    ref = diffusers_loop(scheduler, num_steps, noise(), MODEL)
    sigmas = karras_sigmas(SCHED, num_steps)
    ts = timesteps_for_sigmas(SCHED, sigmas).round().long()
    torch.testing.assert_close(sigmas, scheduler.sigmas[:-1], rtol=0, atol=0)
    assert torch.equal(ts, scheduler.timesteps)
    ours = dpmpp_2m(MODEL, noise(), SCHED, ts, prediction_type=prediction_type, sigmas=sigmas)
    assert max_diff(ours, ref) <= TOL
    with pytest.raises(ValueError, match="strictly decreasing"):
        dpmpp_2m(MODEL, noise(), SCHED, ts, sigmas=sigmas.flip(0))


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "heun"])
@pytest.mark.parametrize("num_steps", [1, 20])
def test_zero_terminal_snr_v_prediction_trailing(name, num_steps):
    """Lin et al. 2023's recipe: zero-terminal-SNR betas, v-prediction, trailing timesteps."""
    config = dict(SD_CONFIG, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    model = make_stand_in(zero_snr=True)
    ts = make_timesteps(num_steps, spacing="trailing")
    g = torch.Generator().manual_seed(5)
    if name == "ddpm":
        ref = diffusers_loop(DDPMScheduler.from_config(config), num_steps, noise(), model, seed=5)
        ours = ddpm(model, noise(), ZSNR, ts, prediction_type="v_prediction", generator=g)
    elif name == "ddim":
        ref = diffusers_loop(DDIMScheduler.from_config(config), num_steps, noise(), model)
        ours = ddim(model, noise(), ZSNR, ts, prediction_type="v_prediction")
    elif name == "euler":
        ref = diffusers_loop(EulerDiscreteScheduler.from_config(config), num_steps, noise(), model)
        ours = euler(model, noise(), ZSNR, ts, prediction_type="v_prediction", init_noise_sigma="sigma_max")
    elif name == "euler_ancestral":
        ref = diffusers_loop(EulerAncestralDiscreteScheduler.from_config(config), num_steps, noise(), model, seed=5)
        ours = euler_ancestral(model, noise(), ZSNR, ts, prediction_type="v_prediction", init_noise_sigma="sigma_max",
                               generator=g)
    elif name == "heun":
        # HeunDiscreteScheduler has no rescale_betas_zero_snr option: give it the rescaled betas, and the
        # 2^-24 stand-in for alpha_bar = 0 that diffusers' Euler schedulers use
        heun_config = {k: v for k, v in config.items() if k != "rescale_betas_zero_snr"}
        scheduler = HeunDiscreteScheduler.from_config({**heun_config, "trained_betas": ZSNR.betas.tolist()})
        scheduler.alphas_cumprod[-1] = 2**-24
        ref = diffusers_loop(scheduler, num_steps, noise(), model)
        ours = heun(model, noise(), ZSNR, ts, prediction_type="v_prediction", init_noise_sigma="sigma_max")
    else:
        ref = diffusers_loop(DPMSolverMultistepScheduler.from_config(config), num_steps, noise(), model)
        ours = dpmpp_2m(model, noise(), ZSNR, ts, prediction_type="v_prediction")
    assert torch.isfinite(ours).all()
    assert max_diff(ours, ref) <= TOL


# -----------------------------------------------------------------------------
# where diffusers is wrong: DDIM's previous timestep is t - T // N (diffusers #9261)


def gaussian_eps_model(data_std, prediction_type):
    """The exact model for data ~ N(0, data_std^2), written with the alpha_bar table at integer t."""
    ab = _AB[False]

    def model(x, t, cond=None):
        a = ab[t.long()].view(-1, *([1] * (x.ndim - 1)))
        v = a * data_std**2 + 1 - a
        eps, x0 = (1 - a).sqrt() * x.double() / v, data_std**2 * a.sqrt() * x.double() / v
        out = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return out.to(x.dtype)

    return model


def ddim_closed_form(x, pairs, data_std):
    """Deterministic DDIM with the Gaussian model is linear: each jump from alpha_bar a (where the model
    is asked) to alpha_bar s multiplies x by (sqrt(s) data_std^2 sqrt(a) + sqrt(1-s) sqrt(1-a)) / v(a)."""
    factor = 1.0
    for a, s in pairs:
        v = a * data_std**2 + 1 - a
        factor *= (s**0.5 * data_std**2 * a**0.5 + (1 - s) ** 0.5 * (1 - a) ** 0.5) / v
    return x.double() * factor


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("spacing, num_steps", [("trailing", 7), ("trailing", 48), ("linspace", 20), ("linspace", 7)])
def test_ddim_where_diffusers_is_wrong(spacing, num_steps, prediction_type):
    data_std = 0.7
    model = gaussian_eps_model(data_std, prediction_type)
    ab = _AB[False]
    ts = make_timesteps(num_steps, spacing=spacing)
    config = dict(SD_CONFIG, timestep_spacing=spacing, prediction_type=prediction_type)
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(num_steps)
    assert torch.equal(scheduler.timesteps, ts)  # same timesteps visited...

    final = ab[0].item()  # set_alpha_to_one=False
    right = [ab[t].item() for t in ts[1:]] + [final]  # ...but the course jumps to the next visited one
    step = 1000 // num_steps
    wrong = [ab[t - step].item() if t - step >= 0 else final for t in ts.tolist()]  # diffusers: t - T // N
    assert right != wrong

    x = noise(shape=(4, 64))
    ours = ddim(model, x, SCHED, ts, prediction_type=prediction_type)
    theirs = diffusers_loop(scheduler, num_steps, x, model)
    asked = [ab[t].item() for t in ts]
    assert max_diff(ours.double(), ddim_closed_form(x, zip(asked, right), data_std)) <= TOL
    # diffusers lands elsewhere, and exactly where its arithmetic says
    assert max_diff(theirs.double(), ddim_closed_form(x, zip(asked, wrong), data_std)) <= TOL
    assert max_diff(ours, theirs) > 1e-3, "diffusers' DDIM now agrees: has #9261 been fixed? update this test"
