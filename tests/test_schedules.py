"""course_lib.schedules against diffusers' schedulers: betas, alpha_bar, spacing, forward process."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from course_lib.schedules import (
    ZERO_SNR_ALPHA_BAR,
    NoiseSchedule,
    add_noise,
    alpha_bar_at,
    cosine_betas,
    linear_betas,
    make_timesteps,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    sd_schedule,
    sigmas_at,
    snr,
    snr_db,
    velocity,
)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000, steps_offset=1)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: linear_betas(1000), dict(beta_schedule="linear")),
        (lambda: linear_betas(500, 2e-4, 0.03), dict(beta_schedule="linear", num_train_timesteps=500,
                                                     beta_start=2e-4, beta_end=0.03)),
        (lambda: scaled_linear_betas(1000), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
        (lambda: cosine_betas(1000), dict(beta_schedule="squaredcos_cap_v2")),
    ],
    ids=["linear", "linear-500", "scaled_linear", "cosine"],
)
def test_betas_and_alpha_bar_equal_diffusers(ours, theirs):
    ref = DDPMScheduler(**theirs)
    betas = ours()
    assert betas.dtype == torch.float32
    torch.testing.assert_close(betas, ref.betas, rtol=0, atol=1e-7)
    sched = NoiseSchedule.from_betas(betas)
    torch.testing.assert_close(sched.alphas_cumprod, ref.alphas_cumprod, rtol=1e-6, atol=1e-9)
    assert sched.num_train_timesteps == len(ref.betas)


def test_sd_schedule_is_sd_1x():
    s = sd_schedule()
    ref = DDIMScheduler(**SD)
    assert s.num_train_timesteps == 1000
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)
    assert abs(s.alphas_cumprod[0].item() - 0.99915) < 1e-5  # alpha_bar_0 = 1 - beta_0
    assert abs(s.alphas_cumprod[-1].item() - 0.0047) < 1e-4  # SD's last timestep is not pure noise


def test_rescale_zero_terminal_snr_equals_diffusers_and_hits_zero():
    betas = scaled_linear_betas(1000)
    before = betas.clone()
    ours = rescale_zero_terminal_snr(betas)
    torch.testing.assert_close(betas, before, rtol=0, atol=0)  # input untouched
    ref = DDIMScheduler(**SD, rescale_betas_zero_snr=True)
    torch.testing.assert_close(ours, ref.betas, rtol=0, atol=1e-7)
    ab = NoiseSchedule.from_betas(ours).alphas_cumprod
    assert ab[-1].item() == 0.0 and snr(ab)[-1].item() == 0.0  # zero terminal SNR
    torch.testing.assert_close(ab[0], sd_schedule().alphas_cumprod[0])  # first value kept


def test_snr_and_db():
    ab = sd_schedule().alphas_cumprod
    s = snr(ab)
    assert torch.all(s[1:] < s[:-1]), "SNR must fall as t grows"
    torch.testing.assert_close(snr_db(ab), 10 * torch.log10(ab / (1 - ab)))
    crossing = int(torch.nonzero(snr_db(ab) < 0)[0])
    assert 0 < crossing < 999 and snr_db(ab)[crossing - 1] >= 0


def test_sigmas_property():
    s = sd_schedule()
    torch.testing.assert_close(s.sigmas, ((1 - s.alphas_cumprod) / s.alphas_cumprod) ** 0.5)
    assert abs(s.sigmas[-1].item() - 14.61) < 0.01  # SD's sigma_max


@pytest.mark.parametrize("num_steps", [7, 20])
def test_sigmas_at_fractional_timesteps_equal_euler_discrete(num_steps):
    """Karras' sigma between table entries is interpolated as diffusers' Euler schedulers do (numpy.interp)."""
    scheduler = EulerDiscreteScheduler.from_config({**SD, "timestep_spacing": "linspace"})
    scheduler.set_timesteps(num_steps)
    ts = make_timesteps(num_steps, spacing="linspace", integer=False)
    assert not torch.equal(ts, ts.round())  # fractional timesteps, the case that needs interpolating
    torch.testing.assert_close(sigmas_at(sd_schedule(), ts), scheduler.sigmas[:-1], rtol=1e-6, atol=0)


def test_alpha_bar_at():
    s = sd_schedule()
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(alpha_bar_at(s, t), s.alphas_cumprod[t], rtol=1e-5, atol=0)  # the table at integers
    a = alpha_bar_at(s, torch.tensor([500.5])).item()
    assert s.alphas_cumprod[501].item() < a < s.alphas_cumprod[500].item()
    zsnr = NoiseSchedule.from_betas(rescale_zero_terminal_snr(scaled_linear_betas()))
    assert zsnr.alphas_cumprod[-1].item() == 0.0
    assert alpha_bar_at(zsnr, torch.tensor([999])).item() == pytest.approx(ZERO_SNR_ALPHA_BAR, rel=1e-3)  # as diffusers


# -----------------------------------------------------------------------------
# timestep spacing


def test_sd_spacing_examples():
    """The values quoted in lesson 5 (50 steps, SD's settings)."""
    lead, trail, lin = (make_timesteps(50, 1000, s, 1) for s in ("leading", "trailing", "linspace"))
    assert (lead[0].item(), lead[1].item(), lead[-1].item()) == (981, 961, 1)
    assert (trail[0].item(), trail[1].item(), trail[-1].item()) == (999, 979, 19)
    assert (lin[0].item(), lin[-1].item()) == (999, 0)
    for t in (lead, trail, lin):
        assert t.dtype == torch.int64 and t.shape == (50,) and torch.all(t[1:] < t[:-1])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_every_step_count_equals_diffusers(spacing):
    """All N from 1 to 999: DDIM/DDPM's integer timesteps, Euler's fractional ones, DPM-Solver's."""
    ddim, euler = DDIMScheduler(**SD, timestep_spacing=spacing), EulerDiscreteScheduler(**SD, timestep_spacing=spacing)
    dpm = DPMSolverMultistepScheduler(**SD, timestep_spacing=spacing)
    for n in range(1, 1000):
        ddim.set_timesteps(n)
        assert torch.equal(make_timesteps(n, 1000, spacing, 1), ddim.timesteps), (spacing, n)
        euler.set_timesteps(n)
        assert torch.equal(make_timesteps(n, 1000, spacing, 1, integer=False), euler.timesteps), (spacing, n)
        if spacing == "leading" and n == 999:
            continue  # diffusers' DPM-Solver reaches timestep 1000 here; see the test below
        dpm.set_timesteps(n)
        assert torch.equal(make_timesteps(n, 1000, spacing, 1, count_final_step=True), dpm.timesteps), (spacing, n)


def test_trailing_tie_rounds_like_diffusers():
    """T=1000, 48 steps: the 4th value is 937.5 in exact arithmetic; numpy's arange makes it 937.4999..."""
    ddim = DDIMScheduler(**SD, timestep_spacing="trailing")
    ddim.set_timesteps(48)
    assert ddim.timesteps[3].item() == 936
    assert make_timesteps(48, 1000, "trailing")[3].item() == 936


def test_diffusers_leading_offset_overflows_where_we_raise():
    """diffusers is wrong here: 1000 steps + steps_offset 1 make timestep 1000, past the table."""
    ddim = DDIMScheduler(**SD)
    ddim.set_timesteps(1000)
    assert ddim.timesteps.max().item() == 1000, "diffusers no longer overflows here; update this test"
    with pytest.raises(IndexError):
        ddim.alphas_cumprod[ddim.timesteps[0]]
    with pytest.raises(ValueError, match="past the last training timestep"):
        make_timesteps(1000, 1000, "leading", 1)
    assert make_timesteps(1000, 1000, "leading", 0).tolist() == list(range(999, -1, -1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_steps=10, spacing="uniform"), "unknown timestep spacing"),
        (dict(num_steps=1001), "more than the 1000 training timesteps"),
        (dict(num_steps=0), "positive int"),
        (dict(num_steps=2.5), "positive int"),
        (dict(num_steps=10, steps_offset=-1), "steps_offset"),
        (dict(num_steps=10, num_train_timesteps=1), "num_train_timesteps"),
    ],
)
def test_make_timesteps_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_timesteps(**kwargs)


# -----------------------------------------------------------------------------
# forward process


def test_add_noise_and_velocity_equal_diffusers():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    ref = DDPMScheduler(**SD)
    s = sd_schedule()
    x0_before = x0.clone()
    torch.testing.assert_close(add_noise(x0, noise, t, s), ref.add_noise(x0, noise, t), rtol=0, atol=1e-6)
    torch.testing.assert_close(velocity(x0, noise, t, s), ref.get_velocity(x0, noise, t), rtol=0, atol=1e-6)
    assert torch.equal(x0, x0_before)
    # one int timestep for the whole batch
    torch.testing.assert_close(add_noise(x0, noise, 500, s), ref.add_noise(x0, noise, torch.tensor([500] * 3)))


def test_add_noise_errors():
    s = sd_schedule()
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        add_noise(x, torch.zeros(2, 4), 0, s)
    with pytest.raises(ValueError, match="same dtype"):
        add_noise(x, torch.zeros(2, 3, dtype=torch.float64), 0, s)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        add_noise(x, x, torch.tensor([0, 1000]), s)
    with pytest.raises(ValueError, match="one per sample"):
        add_noise(x, x, torch.tensor([0, 1, 2]), s)


def test_schedule_errors():
    with pytest.raises(ValueError, match="same length"):
        NoiseSchedule(betas=torch.zeros(10), alphas_cumprod=torch.ones(9))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        NoiseSchedule.from_betas(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="beta_start"):
        linear_betas(1000, 0.02, 0.01)
    with pytest.raises(ValueError, match="max_beta"):
        cosine_betas(1000, max_beta=1.0)
