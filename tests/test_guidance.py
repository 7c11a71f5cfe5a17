"""course_lib.guidance: classifier-free guidance, negative prompts and guidance rescale vs diffusers (and, in
v-space for an epsilon model, vs ComfyUI's RescaleCFG)."""

import math


import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as diffusers_rescale

from course_lib.diffusers_bridge import diffusers_sampling_loop, sd_scheduler_config
from course_lib.guidance import (classifier_free_guidance, eps_to_v, guided_model, rescale_cfg_in_v_space,
                                 rescale_noise_cfg, v_to_eps)
from course_lib.samplers import ddim, dpmpp_2m, euler
from course_lib.schedules import add_noise, alpha_bar_at, make_timesteps, sd_schedule, velocity

SD_CONFIG = sd_scheduler_config()


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def text_model(x, t, cond):
    """A stand-in conditional model: cond (B, L, D) pulls each channel towards a prompt-dependent value."""
    w = (t.double() / 1000).to(x.dtype).view(-1, 1, 1, 1)
    per_channel = cond.mean(dim=1)[:, : x.shape[1]].view(x.shape[0], x.shape[1], 1, 1)  # (B, C, 1, 1)
    return 0.8 * torch.tanh(x) * (1 - 0.5 * w) + 0.5 * torch.sin(per_channel * 3 + w) + 0.1 * x.roll(1, -1)


class Recorder:
    """Wraps a model and records each call's inputs."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t, cond):
        self.calls.append((x.clone(), t.clone(), None if cond is None else cond.clone()))
        return self.model(x, t, cond)


# -----------------------------------------------------------------------------
# the two small units


def test_cfg_formula():
    u, c = randn(2, 4, 8, 8, seed=1), randn(2, 4, 8, 8, seed=2)
    torch.testing.assert_close(classifier_free_guidance(u, c, 7.5), u + 7.5 * (c - u))
    torch.testing.assert_close(classifier_free_guidance(u, c, 0.0), u)
    torch.testing.assert_close(classifier_free_guidance(u, c, 1.0), c)
    with pytest.raises(ValueError, match="same shape"):
        classifier_free_guidance(u, c[:1], 2.0)


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 16)])
def test_rescale_equals_diffusers(phi, shape):
    u, c = randn(*shape, seed=3), randn(*shape, seed=4) * 0.5 + 0.2
    guided = classifier_free_guidance(u, c, 7.5)
    before = guided.clone()
    ours = rescale_noise_cfg(guided, c, phi)
    torch.testing.assert_close(ours, diffusers_rescale(guided, c, guidance_rescale=phi), rtol=0, atol=1e-6)
    assert torch.equal(guided, before)
    if phi == 0.0:
        torch.testing.assert_close(ours, guided)
    if phi == 1.0:  # each sample now has the conditional prediction's std
        dims = tuple(range(1, len(shape)))
        torch.testing.assert_close(ours.std(dim=dims), c.std(dim=dims), rtol=1e-5, atol=1e-6)


def test_rescale_errors():
    g = randn(2, 8)
    with pytest.raises(ValueError, match="same shape"):
        rescale_noise_cfg(g, g[:, :4], 0.7)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rescale_noise_cfg(g, g, 1.5)
    with pytest.raises(ValueError, match="batched"):
        rescale_noise_cfg(g[0], g[0], 0.7)


# -----------------------------------------------------------------------------
# guidance rescale in v-space, for an epsilon model (Lin et al. 2023 define it on v; ComfyUI's RescaleCFG)


def test_eps_to_v_is_the_velocity_and_inverts():
    x0, eps, t = randn(3, 4, 8, 8, seed=11), randn(3, 4, 8, 8, seed=12), torch.tensor([10, 500, 990])
    schedule = sd_schedule()
    x_t = add_noise(x0, eps, t, schedule)
    alpha_bar = schedule.alphas_cumprod[t]  # (B,)
    torch.testing.assert_close(eps_to_v(eps, x_t, alpha_bar), velocity(x0, eps, t, schedule), rtol=0, atol=2e-5)
    torch.testing.assert_close(v_to_eps(eps_to_v(eps, x_t, alpha_bar), x_t, alpha_bar), eps, rtol=0, atol=1e-5)
    torch.testing.assert_close(eps_to_v(eps, x_t, alpha_bar.view(3, 1, 1, 1)), eps_to_v(eps, x_t, alpha_bar))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        eps_to_v(eps, x_t, 0.0)
    with pytest.raises(ValueError, match="one value per sample"):
        eps_to_v(eps, x_t, alpha_bar[:2])
    with pytest.raises(ValueError, match="same shape"):
        v_to_eps(eps[:2], x_t, alpha_bar)


def test_rescale_in_v_space_by_hand():
    """One sample of two values, alpha_bar = 1/2 and sqrt(1 - alpha_bar) x_t = (1, 1), so that eps = v / sqrt(2) + 1.
    v_cond = (1, -1), v_uncond = (0.5, -0.5); at w = 3 the guided v is (2, -2): std 2 sqrt(2) against the
    conditional v's sqrt(2). Rescaled: (1, -1); mixed with phi = 0.5: (1.5, -1.5), i.e. eps = 1 +- 1.5 / sqrt(2)."""
    r2 = math.sqrt(2)
    x_t = torch.tensor([[r2, r2]])
    eps_c, eps_u = torch.tensor([[1 + 1 / r2, 1 - 1 / r2]]), torch.tensor([[1 + 0.5 / r2, 1 - 0.5 / r2]])
    guided = classifier_free_guidance(eps_u, eps_c, 3.0)
    out = rescale_cfg_in_v_space(guided, eps_c, x_t, 0.5, 0.5)
    torch.testing.assert_close(out, torch.tensor([[1 + 1.5 / r2, 1 - 1.5 / r2]]), rtol=0, atol=1e-6)
    # diffusers' rescale of the eps itself: std(guided eps) = 2, std(eps_cond) = 1, so 0.5 (guided / 2) + 0.5 guided
    # = 0.75 guided: it also shrinks the x_t part (the mean 1 here) by a quarter, which the v-space rescale keeps
    torch.testing.assert_close(rescale_noise_cfg(guided, eps_c, 0.5), 0.75 * guided, rtol=0, atol=1e-6)
    torch.testing.assert_close(out - 0.75 * guided, torch.full((1, 2), 0.25), rtol=0, atol=1e-6)


def k_diffusion_rescale_cfg(x0_uncond, x0_cond, x, sigma, scale, phi):
    """ComfyUI's RescaleCFG (comfy_extras/nodes_model_advanced.py), derived anew in the variables it works in:
    k-diffusion's x = x_t / sqrt(alpha_bar) = x0 + sigma eps and the model's denoised outputs x0_hat.
    With c = sqrt(sigma^2 + 1) = 1 / sqrt(alpha_bar): v = (x / c^2 - x0) c / sigma and back x0 = x / c^2 - sigma v / c.
    Guide v, give it v_cond's std per sample, mix with phi; return the guided denoised output."""
    c = (sigma**2 + 1) ** 0.5
    v_u, v_c = (x / c**2 - x0_uncond) * c / sigma, (x / c**2 - x0_cond) * c / sigma
    v = v_u + scale * (v_c - v_u)
    dims = tuple(range(1, x.ndim))
    v = phi * v * (v_c.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True)) + (1 - phi) * v
    return x / c**2 - sigma * v / c


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.7, 1.0])
def test_rescale_in_v_space_equals_comfyui_rescale_cfg(phi):
    schedule, t = sd_schedule(), torch.tensor([999, 600, 250, 20])
    x_t, eps_u = randn(4, 4, 8, 8, seed=13), randn(4, 4, 8, 8, seed=14)
    eps_c = 0.8 * eps_u + 0.3 * randn(4, 4, 8, 8, seed=15) + 0.1
    alpha_bar = schedule.alphas_cumprod[t].double()  # (B,) in float64, for a tight comparison
    x_t, eps_u, eps_c = x_t.double(), eps_u.double(), eps_c.double()
    ours = rescale_cfg_in_v_space(classifier_free_guidance(eps_u, eps_c, 7.5), eps_c, x_t, alpha_bar, phi)
    ab = alpha_bar.view(-1, 1, 1, 1)
    sigma, x = ((1 - ab) / ab) ** 0.5, x_t / ab**0.5
    to_x0 = lambda eps: (x_t - (1 - ab) ** 0.5 * eps) / ab**0.5  # noqa: E731
    theirs = k_diffusion_rescale_cfg(to_x0(eps_u), to_x0(eps_c), x, sigma, 7.5, phi)
    torch.testing.assert_close(to_x0(ours), theirs, rtol=1e-9, atol=1e-9)


def test_rescale_in_v_space_phi_zero_and_one():
    schedule, t = sd_schedule(), torch.tensor([950, 400, 30])
    x_t, eps_u = randn(3, 4, 8, 8, seed=16), randn(3, 4, 8, 8, seed=17)
    eps_c = eps_u + 0.2 * randn(3, 4, 8, 8, seed=18)
    alpha_bar = schedule.alphas_cumprod[t]
    guided = classifier_free_guidance(eps_u, eps_c, 20.0)
    before = guided.clone()
    torch.testing.assert_close(rescale_cfg_in_v_space(guided, eps_c, x_t, alpha_bar, 0.0), guided, rtol=0, atol=2e-5)
    full = rescale_cfg_in_v_space(guided, eps_c, x_t, alpha_bar, 1.0)
    dims = (1, 2, 3)
    v_full, v_cond = eps_to_v(full, x_t, alpha_bar), eps_to_v(eps_c, x_t, alpha_bar)
    torch.testing.assert_close(v_full.std(dim=dims), v_cond.std(dim=dims), rtol=1e-5, atol=1e-6)
    assert (eps_to_v(guided, x_t, alpha_bar).std(dim=dims) > 1.5 * v_cond.std(dim=dims)).all()  # it did shrink
    assert torch.equal(guided, before)
    with pytest.raises(ValueError, match="same shape"):
        rescale_cfg_in_v_space(guided, eps_c[:2], x_t, alpha_bar, 0.7)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rescale_cfg_in_v_space(guided, eps_c, x_t, alpha_bar, 1.2)


def test_guided_model_rescales_in_v_space():
    schedule = sd_schedule()
    x, t = randn(2, 4, 8, 8), torch.tensor([900, 300])
    cond, uncond = randn(2, 6, 8, seed=5), randn(2, 6, 8, seed=6)
    out = guided_model(text_model, cond, uncond, 7.5, 0.7, rescale_space="v", schedule=schedule)(x, t)
    pc = text_model(x, t, cond)
    guided = classifier_free_guidance(text_model(x, t, uncond), pc, 7.5)
    expected = rescale_cfg_in_v_space(guided, pc, x, alpha_bar_at(schedule, t), 0.7)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert (out - rescale_noise_cfg(guided, pc, 0.7)).abs().max() > 1e-2  # not the eps-space rescale
    plain = guided_model(text_model, cond, uncond, 7.5, 0.0, rescale_space="v", schedule=schedule)(x, t)
    torch.testing.assert_close(plain, guided, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="schedule"):
        guided_model(text_model, cond, uncond, 7.5, 0.7, rescale_space="v")
    with pytest.raises(ValueError, match="rescale_space"):
        guided_model(text_model, cond, uncond, 7.5, 0.7, rescale_space="x0", schedule=schedule)


# -----------------------------------------------------------------------------
# the guided model


def test_one_batched_forward_pass_uncond_first():
    x, t = randn(2, 4, 8, 8), torch.tensor([500, 500])
    cond, uncond = randn(2, 6, 8, seed=5), randn(2, 6, 8, seed=6)
    rec = Recorder(text_model)
    out = guided_model(rec, cond, uncond, 7.5)(x, t)
    assert len(rec.calls) == 1, "CFG must be one batched forward pass"
    xs, ts, cs = rec.calls[0]
    assert xs.shape[0] == 4 and torch.equal(xs[:2], x) and torch.equal(xs[2:], x)
    assert torch.equal(ts, torch.cat([t, t]))
    assert torch.equal(cs[:2], uncond) and torch.equal(cs[2:], cond)  # the pipeline's order
    two_passes = classifier_free_guidance(text_model(x, t, uncond), text_model(x, t, cond), 7.5)
    torch.testing.assert_close(out, two_passes, rtol=0, atol=1e-6)


def test_scale_one_skips_the_unconditional_pass():
    x, t, cond = randn(2, 4, 8, 8), torch.tensor([10, 10]), randn(2, 6, 8, seed=5)
    rec = Recorder(text_model)
    out = guided_model(rec, cond, None, 1.0)(x, t)
    assert len(rec.calls) == 1 and rec.calls[0][0].shape[0] == 2
    torch.testing.assert_close(out, text_model(x, t, cond))


def test_negative_prompt_is_the_unconditional_branch():
    x, t = randn(2, 4, 8, 8), torch.tensor([700, 700])
    cond, empty, negative = randn(1, 6, 8, seed=5), randn(1, 6, 8, seed=6), randn(1, 6, 8, seed=7)
    with_empty = guided_model(text_model, cond, empty, 5.0)(x, t)
    with_negative = guided_model(text_model, cond, negative, 5.0)(x, t)
    assert (with_empty - with_negative).abs().max() > 0.1
    # batch-1 embeddings are shared by the whole batch; guidance steers away from the negative prompt
    c2, n2 = cond.expand(2, -1, -1), negative.expand(2, -1, -1)
    expected = text_model(x, t, n2) + 5.0 * (text_model(x, t, c2) - text_model(x, t, n2))
    torch.testing.assert_close(with_negative, expected, rtol=0, atol=1e-6)


def test_guided_model_with_rescale():
    x, t = randn(2, 4, 8, 8), torch.tensor([900, 900])
    cond, uncond = randn(2, 6, 8, seed=5), randn(2, 6, 8, seed=6)
    out = guided_model(text_model, cond, uncond, 7.5, guidance_rescale=0.7)(x, t)
    pc = text_model(x, t, cond)
    expected = diffusers_rescale(classifier_free_guidance(text_model(x, t, uncond), pc, 7.5), pc, guidance_rescale=0.7)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_per_sample_scales_equal_one_run_per_scale():
    """A (B,) tensor of scales guides each row with its own scale: one batch sweeps the scale."""
    x, t = randn(3, 4, 8, 8), torch.tensor([500, 500, 500])
    cond, uncond = randn(3, 6, 8, seed=5), randn(3, 6, 8, seed=6)
    scales = torch.tensor([1.0, 3.0, 7.5])
    swept = guided_model(text_model, cond, uncond, scales)(x, t)
    for i, w in enumerate(scales.tolist()):
        alone = guided_model(text_model, cond[i:i + 1], uncond[i:i + 1], w)(x[i:i + 1], t[i:i + 1])
        torch.testing.assert_close(swept[i:i + 1], alone, rtol=0, atol=1e-6)
    rec = Recorder(text_model)
    guided_model(rec, cond, None, torch.ones(3))(x, t)  # every scale is 1: no unconditional half
    assert len(rec.calls) == 1 and rec.calls[0][0].shape[0] == 3
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        guided_model(text_model, cond, uncond, torch.tensor([1.0, 2.0]))(x, t)
    with pytest.raises(ValueError, match="1-D"):
        guided_model(text_model, cond, uncond, torch.ones(3, 1))


def test_guided_model_errors():
    cond = randn(2, 6, 8)
    with pytest.raises(ValueError, match="uncond"):
        guided_model(text_model, cond, None, 7.5)
    with pytest.raises(ValueError, match="match cond"):
        guided_model(text_model, cond, randn(2, 5, 8), 7.5)
    with pytest.raises(ValueError, match="dtype"):
        guided_model(text_model, cond, cond.double(), 7.5)
    with pytest.raises(ValueError, match="guidance_rescale"):
        guided_model(text_model, cond, cond, 7.5, guidance_rescale=2.0)
    with pytest.raises(ValueError, match="must be a tensor"):
        guided_model(text_model, "a red circle", cond, 7.5)
    with pytest.raises(ValueError, match="finite"):
        guided_model(text_model, cond, cond, float("nan"))
    with pytest.raises(ValueError, match="finite"):
        guided_model(text_model, cond, cond, torch.tensor([3.0, float("inf")]))
    g = guided_model(text_model, cond, cond, 7.5)
    with pytest.raises(ValueError, match="cond=None"):
        g(randn(2, 4, 8, 8), torch.tensor([1, 1]), cond)
    with pytest.raises(ValueError, match="batch size 2 but x has 3"):
        g(randn(3, 4, 8, 8), torch.tensor([1, 1, 1]))


# -----------------------------------------------------------------------------
# whole guided loops: the course's samplers + guided_model vs the pipeline's loop with diffusers' schedulers


def pipeline_loop(scheduler, num_steps, noise, cond, uncond, scale, rescale):
    """StableDiffusionPipeline's denoising loop, verbatim in substance, on the stand-in model."""
    return diffusers_sampling_loop(scheduler, num_steps, noise, text_model, cond, uncond, guidance_scale=scale,
                                   guidance_rescale=rescale)


@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_guided_sampling_equals_the_pipeline_loop(name, prediction_type, rescale):
    noise = randn(2, 4, 8, 8, seed=9)
    cond, uncond = randn(2, 6, 8, seed=5), randn(2, 6, 8, seed=6)
    config = dict(SD_CONFIG, prediction_type=prediction_type)
    model = guided_model(text_model, cond, uncond, 7.5, guidance_rescale=rescale)
    n = 12
    if name == "ddim":
        ref = pipeline_loop(DDIMScheduler.from_config(config), n, noise, cond, uncond, 7.5, rescale)
        ours = ddim(model, noise, sd_schedule(), make_timesteps(n), prediction_type=prediction_type)
    elif name == "euler":
        ref = pipeline_loop(EulerDiscreteScheduler.from_config(config), n, noise, cond, uncond, 7.5, rescale)
        ours = euler(model, noise, sd_schedule(), make_timesteps(n, spacing="linspace", integer=False),
                     prediction_type=prediction_type, init_noise_sigma="sigma_max")
    else:
        ref = pipeline_loop(DPMSolverMultistepScheduler.from_config(config), n, noise, cond, uncond, 7.5, rescale)
        ours = dpmpp_2m(model, noise, sd_schedule(), make_timesteps(n, spacing="linspace", count_final_step=True),
                        prediction_type=prediction_type)
    assert (ours - ref).abs().max().item() <= 1e-5
