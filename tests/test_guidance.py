"""course_lib.guidance: classifier-free guidance, negative prompts and guidance rescale vs diffusers."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as diffusers_rescale

from course_lib.diffusers_bridge import diffusers_sampling_loop, sd_scheduler_config
from course_lib.guidance import classifier_free_guidance, guided_model, rescale_noise_cfg
from course_lib.samplers import ddim, dpmpp_2m, euler
from course_lib.schedules import make_timesteps, sd_schedule

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
