"""Unit tests of course_lib.samplers: the shared signature, errors, devices, and what the math promises."""

import math

import pytest
import torch

from course_lib.gaussian_model import gaussian_data_model, gaussian_data_ode_solution
from course_lib.samplers import (
    SAMPLERS,
    Denoiser,
    ddim,
    ddpm,
    default_timesteps,
    dpmpp_2m,
    euler,
    euler_ancestral,
    heun,
    sample,
)
from course_lib.schedules import (
    NoiseSchedule,
    make_timesteps,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    sd_schedule,
    sigmas_at,
)

SCHED = sd_schedule()
SHAPE = (2, 4, 8, 8)
STOCHASTIC = {"ddpm", "euler_ancestral"}


def toy_model(x, t, cond):
    """A fixed smooth function of x, t (and cond when given): a deterministic stand-in denoiser."""
    w = (t.to(torch.float64) / 1000).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    out = torch.tanh(0.7 * x + 0.3 * x.roll(1, -1)) * (0.6 + 0.4 * torch.cos(3 * w)) + 0.2 * torch.sin(5 * w + x)
    if cond is not None:
        out = out + 0.1 * cond.mean(dim=tuple(range(1, cond.ndim))).view(-1, *([1] * (x.ndim - 1)))
    return out


def noise(seed=0, shape=SHAPE, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_shared_signature_callback_and_no_mutation(name):
    x, cond = noise(), torch.randn(2, 3, 5)
    x_before, cond_before = x.clone(), cond.clone()
    calls = []
    out = sample(name, toy_model, x, SCHED, make_timesteps(7), cond, prediction_type="epsilon", generator=gen(),
                 callback=lambda i, t, xi, x0: calls.append((i, t, xi.shape, x0.shape)))
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert torch.equal(x, x_before) and torch.equal(cond, cond_before), "a sampler changed its caller's tensors"
    assert [c[0] for c in calls] == list(range(7))
    assert [c[1] for c in calls] == make_timesteps(7).tolist()
    assert all(c[2] == x.shape and c[3] == x.shape for c in calls)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_generator_makes_runs_repeatable(name):
    run = lambda seed: SAMPLERS[name](toy_model, noise(), SCHED, 10, generator=gen(seed))  # noqa: E731
    assert torch.equal(run(1), run(1))
    if name in STOCHASTIC:
        assert not torch.allclose(run(1), run(2)), "a stochastic sampler ignored its generator"
    else:
        assert torch.equal(run(1), run(2)), "a deterministic sampler depends on the generator"


def test_ddim_eta_one_is_ddpm():
    """DDIM paper: eta = 1 gives DDPM's posterior; same timesteps and noise -> the same sample."""
    ts = make_timesteps(20)
    a = ddim(toy_model, noise(), SCHED, ts, eta=1.0, set_alpha_to_one=True, generator=gen())
    b = ddpm(toy_model, noise(), SCHED, ts, generator=gen())
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    c = ddim(toy_model, noise(), SCHED, ts, eta=0.0)
    assert (a - c).abs().max() > 0.1, "eta had no effect"


def test_ddim_is_euler_in_disguise():
    """Deterministic DDIM is Euler's method on x / sqrt(alpha_bar) (Karras et al. 2022, Sec. 3)."""
    for ts in (make_timesteps(1), make_timesteps(13, spacing="trailing"), make_timesteps(50)):
        a = ddim(toy_model, noise(), SCHED, ts, set_alpha_to_one=True)
        b = euler(toy_model, noise(), SCHED, ts, init_noise_sigma="exact")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_epsilon_and_v_prediction_give_the_same_sample(name):
    """One denoiser written two ways (eps or v) must sample the same thing."""
    ts = make_timesteps(12, spacing="trailing")
    kw = dict(generator=gen()) if name in STOCHASTIC else {}
    a = SAMPLERS[name](gaussian_data_model(SCHED, 0.8, "epsilon"), noise(), SCHED, ts, prediction_type="epsilon", **kw)
    kw = dict(generator=gen()) if name in STOCHASTIC else {}
    b = SAMPLERS[name](gaussian_data_model(SCHED, 0.8, "v_prediction"), noise(), SCHED, ts,
                       prediction_type="v_prediction", **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_ode_samplers_converge_and_higher_order_wins():
    """On Gaussian data the exact ODE answer is known: errors fall with steps, DPM-Solver++ beats Euler."""
    x = noise(shape=(64, 256))
    start = 999
    a_start = SCHED.alphas_cumprod[start].item()
    exact = gaussian_data_ode_solution(x, a_start, 1.0)  # x0 = the end of the flow at alpha_bar = 1
    model = gaussian_data_model(SCHED, 1.0)

    def err(fn, n):
        ts = make_timesteps(n, spacing="trailing")
        kw = dict(set_alpha_to_one=True) if fn is ddim else {}
        return (fn(model, x, SCHED, ts, **kw) - exact).pow(2).mean().item()

    for fn in (ddim, euler, dpmpp_2m):
        errors = [err(fn, n) for n in (5, 10, 20, 50)]
        assert all(b < a for a, b in zip(errors, errors[1:])), (fn.__name__, errors)
    assert err(dpmpp_2m, 20) < 0.2 * err(euler, 20)
    assert err(dpmpp_2m, 20) < err(euler, 50)


def test_heun_is_second_order_when_its_last_step_is_short():
    """Heun's correction makes the error fall about 4x per doubling of steps (order 2), as long as the
    final Euler jump to sigma = 0 is short: "linspace" ends at t = 0 (sigma 0.03); "trailing" ends at
    t = T/N - 1, and that long first-order jump then dominates."""
    x = noise(shape=(64, 256))
    exact = gaussian_data_ode_solution(x, SCHED.alphas_cumprod[999].item(), 1.0)
    model = gaussian_data_model(SCHED, 1.0)

    def err(fn, n, spacing):
        ts = make_timesteps(n, spacing=spacing, integer=False)
        return (fn(model, x, SCHED, ts) - exact).pow(2).mean().sqrt().item()

    order = lambda fn, spacing: math.log2(err(fn, 10, spacing) / err(fn, 20, spacing))  # noqa: E731
    assert order(heun, "linspace") > 1.8
    assert 0.7 < order(euler, "linspace") < 1.3
    assert order(heun, "trailing") < 1.3
    assert err(heun, 20, "linspace") < 0.2 * err(euler, 40, "linspace")  # 39 model calls against 40


def test_integer_and_float_timesteps_for_euler():
    a = euler(toy_model, noise(), SCHED, make_timesteps(20, spacing="trailing"))
    b = euler(toy_model, noise(), SCHED, make_timesteps(20, spacing="trailing").float())
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoiser_gives_the_exact_x0_and_eps_in_both_views(prediction_type):
    """The wrapped model, eps- or v-predicting, answers E[x0 | x_t] and E[eps | x_t] for Gaussian data: on x_t
    itself (both constructors), and as Karras' D(x; sigma) on x = x_t / sqrt(alpha_bar) (Table 1's c_in, c_skip,
    c_out), with x_t = sqrt_ab x0 + sqrt_1m_ab eps holding for its two estimates."""
    data_std = 0.8
    model = gaussian_data_model(SCHED, data_std, prediction_type)
    x_t = noise(dtype=torch.float64)
    ts = make_timesteps(7, spacing="trailing")
    for build in (Denoiser.at_timesteps, Denoiser.at_sigmas):
        den = build(model, x_t, SCHED, ts, None, prediction_type)
        for i in range(den.n):
            a = den.sqrt_ab[i].double() ** 2  # alpha_bar at step i, as the denoiser sees it
            var = a * data_std**2 + 1 - a
            exact_x0 = data_std**2 * a.sqrt() * x_t / var
            exact_eps = (1 - a).sqrt() * x_t / var
            x0, eps = den.x0_eps(x_t, i)
            torch.testing.assert_close(x0, exact_x0, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(eps, exact_eps, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(den.sqrt_ab[i] * x0 + den.sqrt_1m_ab[i] * eps, x_t, rtol=1e-5, atol=1e-5)
            if build is Denoiser.at_sigmas:
                sigma = den.sigmas[i].item()
                assert abs(sigma - ((1 - a) / a).sqrt().item()) < 1e-4 * sigma
                torch.testing.assert_close(den.D(x_t / den.sqrt_ab[i].item(), i), exact_x0, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at_sigmas"):
        Denoiser.at_timesteps(model, x_t, SCHED, ts, None, prediction_type).D(x_t, 0)


def test_sigmas_at_interpolates_between_entries():
    s = SCHED.sigmas
    assert torch.equal(sigmas_at(SCHED, torch.tensor([0, 500, 999])), s[[0, 500, 999]])
    mid = sigmas_at(SCHED, torch.tensor([500.25])).item()
    assert abs(mid - (0.75 * s[500].item() + 0.25 * s[501].item())) < 1e-5


def test_zero_terminal_snr_needs_v_prediction():
    zsnr = NoiseSchedule.from_betas(rescale_zero_terminal_snr(scaled_linear_betas()))
    ts = make_timesteps(10, spacing="trailing")  # starts at t = 999, where alpha_bar = 0
    for fn in (ddpm, ddim):
        with pytest.raises(ValueError, match="zero terminal SNR"):
            fn(toy_model, noise(), zsnr, ts, generator=gen())
    for fn in SAMPLERS.values():
        out = fn(toy_model, noise(), zsnr, ts, prediction_type="v_prediction", generator=gen())
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_dtype_follows_the_input(name, dtype):
    out = SAMPLERS[name](toy_model, noise(dtype=dtype), SCHED, 5, generator=gen())
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_devices_agree(name, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ref = SAMPLERS[name](toy_model, noise(), SCHED, 8, generator=gen())
    out = SAMPLERS[name](toy_model, noise().to(device), SCHED, 8, generator=gen())  # CPU generator, x on device
    assert out.device.type == device
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


# -----------------------------------------------------------------------------
# clear errors


def test_unknown_sampler_name():
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        sample("plms", toy_model, noise(), SCHED, 5)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(prediction_type="sample"), "unknown prediction_type"),
        (dict(timesteps=torch.tensor([10, 20, 30])), "strictly decreasing"),
        (dict(timesteps=torch.tensor([1000, 500])), r"\[0, 999\]"),
        (dict(timesteps=torch.tensor([], dtype=torch.long)), "non-empty"),
        (dict(timesteps=1001), "more than the 1000 training timesteps"),
        (dict(model=lambda x, t, c: x[:, :2]), "returned shape"),
        (dict(model=lambda x, t, c: x.double()), "returned dtype"),
        (dict(model=lambda x, t, c: None), "must return a tensor"),
        (dict(x=torch.zeros(2, 4, dtype=torch.long)), "floating-point"),
        (dict(schedule="sd"), "NoiseSchedule"),
    ],
)
def test_bad_arguments(name, bad, match):
    args = dict(model=toy_model, x=noise(), schedule=SCHED, timesteps=make_timesteps(5))
    kwargs = {}
    for k, v in bad.items():
        (args if k in args else kwargs)[k] = v
    with pytest.raises(ValueError, match=match):
        SAMPLERS[name](args["model"], args["x"], args["schedule"], args["timesteps"], generator=gen(), **kwargs)


def test_sampler_specific_errors():
    with pytest.raises(ValueError, match="eta must lie"):
        ddim(toy_model, noise(), SCHED, 5, eta=1.5)
    with pytest.raises(ValueError, match="fractional"):
        ddim(toy_model, noise(), SCHED, make_timesteps(7, spacing="linspace", integer=False))
    with pytest.raises(ValueError, match="init_noise_sigma"):
        euler(toy_model, noise(), SCHED, 5, init_noise_sigma="karras")
    with pytest.raises(ValueError, match="clip_x0"):
        ddim(toy_model, noise(), SCHED, 5, clip_x0=0.0)


def test_euler_ancestral_is_ddpm_in_disguise():
    """Euler ancestral's split of sigma_next into sigma_down and sigma_up is DDPM's posterior in sigma units:
    with the same grid and the same noise draws, the two samplers give the same sample."""
    for ts in (make_timesteps(1), make_timesteps(9, spacing="trailing"), make_timesteps(30)):
        a = euler_ancestral(toy_model, noise(), SCHED, ts, init_noise_sigma="exact", generator=gen())
        b = ddpm(toy_model, noise(), SCHED, ts, generator=gen())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_int_timesteps_mean_sd_spacing():
    assert torch.equal(default_timesteps(50), make_timesteps(50, 1000, "leading", 1))
    assert torch.equal(default_timesteps(1000), torch.arange(999, -1, -1))  # every timestep: plain DDPM
    a = ddim(toy_model, noise(), SCHED, 20)
    b = ddim(toy_model, noise(), SCHED, make_timesteps(20))
    assert torch.equal(a, b)
