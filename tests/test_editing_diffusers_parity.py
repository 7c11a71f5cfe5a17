"""The course's img2img and DDIM inversion equal diffusers' on the course's weights (float32, CPU).

- img2img: ``StableDiffusionImg2ImgPipeline`` built from the shipped VAE and U-Net in diffusers' classes
  (``diffusers_weights.vae_to_diffusers`` / ``unet_to_diffusers``) and a ``DDIMScheduler`` with SD's settings,
  given the course's text states as ``prompt_embeds`` (the course's CLIP has no transformers twin), the same
  images and the same generator (it draws the VAE posterior sample, then the noise, in that order on both
  sides): the same final latents (``output_type="latent"``) to 1e-5, with and without guidance.
- ``img2img_timesteps`` against the pipeline's own ``get_timesteps``.
- DDIM inversion: ``ddim_inverse`` against ``DDIMInverseScheduler`` over whole inversion loops, on the stand-in
  model of tests/test_samplers_vs_diffusers.py (epsilon and v) and on the shipped U-Net in diffusers' class
  with and without guidance (the loop of ``StableDiffusionDiffEditPipeline.invert``: the same model calls).
"""

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionImg2ImgPipeline

from course_lib import data, editing
from course_lib.diffusers_bridge import sd_scheduler_config
from course_lib.diffusers_weights import unet_to_diffusers, vae_to_diffusers
from course_lib.schedules import sd_schedule
from course_lib.tiny_sd import load_tiny_sd

TOL = 1e-5
# From images, the two VAE encoders' posterior samples differ by ~3e-6 (float32 rounding through the encoder,
# tests/test_vae_diffusers_parity.py); ten steps at w = 5 and strength 1 carry that to ~3e-5. From the same
# latents the loops agree to 1e-5 (test_the_loops_agree_from_the_same_latents; in practice bit for bit).
FROM_IMAGES_GUIDED_TOL = 5e-5
INVERSION_TOL = 3e-5  # 50 inverse steps of the real U-Net, each adding float32 rounding of ~1e-6
PROMPTS = ["a blue circle", "a large red striped square on a black background"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd():
    return load_tiny_sd()


@pytest.fixture(scope="module")
def pipe(sd):
    """StableDiffusionImg2ImgPipeline with the shipped weights (no text encoder: the text states are given)."""
    p = StableDiffusionImg2ImgPipeline(
        vae=vae_to_diffusers(sd.vae), text_encoder=None, tokenizer=None, unet=unet_to_diffusers(sd.unet),
        scheduler=DDIMScheduler.from_config(sd_scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def images():
    return data.generate(2, seed=3, split="heldout").images_float()  # (2, 3, 64, 64) in [-1, 1]


def their_latents(sd, pipe, images, strength, num_steps, w, seed):
    cond, uncond = sd.encode_prompt(PROMPTS), sd.encode_prompt([""] * len(PROMPTS))
    # the pipeline takes tensors in [0, 1] (and maps them to [-1, 1] itself, as 2 x - 1)
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=(images + 1) / 2, strength=strength,
               num_inference_steps=num_steps, guidance_scale=w, generator=torch.Generator().manual_seed(seed),
               output_type="latent")
    return out.images  # (B, 4, 16, 16): the final latents, not decoded


@pytest.mark.parametrize("w", [1.0, 5.0], ids=["no guidance", "w=5"])
@pytest.mark.parametrize("strength,num_steps", [(0.3, 20), (0.75, 20), (1.0, 10), (0.55, 7)])
def test_img2img_equals_the_img2img_pipeline(sd, pipe, images, strength, num_steps, w):
    ours = editing.img2img(sd, images, PROMPTS, strength, num_steps, w, generator=torch.Generator().manual_seed(1),
                           return_latents=True)[1]
    theirs = their_latents(sd, pipe, images, strength, num_steps, w, seed=1)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= (TOL if w == 1.0 else FROM_IMAGES_GUIDED_TOL)
    # and the comparison can tell: another seed's noise lands elsewhere
    other = their_latents(sd, pipe, images, strength, num_steps, w, seed=2)
    assert (ours - other).abs().max().item() > 0.1


def test_the_posterior_sample_is_the_pipelines(sd, pipe, images):
    """encode_images draws q(z | x) from the generator as retrieve_latents(sample_mode="sample") does."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    ours = editing.encode_images(sd, images, torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = retrieve_latents(pipe.vae.encode(images), generator=torch.Generator().manual_seed(4))
    assert (ours - theirs * pipe.vae.config.scaling_factor).abs().max().item() <= TOL
    mean = editing.encode_images(sd, images, sample_posterior=False)
    assert (ours - mean).abs().max().item() > 1e-3  # the sample is not the mean


@pytest.mark.parametrize("w", [1.0, 3.0, 7.5])
@pytest.mark.parametrize("strength,num_steps", [(0.3, 20), (0.6, 20), (1.0, 10), (0.55, 7)])
def test_the_loops_agree_from_the_same_latents(sd, pipe, images, strength, num_steps, w):
    """The posterior mean (sample_posterior=False) given to both: the pipeline takes 4-channel input as latents."""
    z0 = editing.encode_images(sd, images, sample_posterior=False)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(5))
    ours = editing.img2img_from_latents(sd, z0, PROMPTS, strength, num_steps, w, noise=noise)
    cond, uncond = sd.encode_prompt(PROMPTS), sd.encode_prompt([""] * 2)
    g = torch.Generator().manual_seed(5)  # the pipeline draws only the noise from it: latents need no sample
    theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=z0, strength=strength,
                  num_inference_steps=num_steps, guidance_scale=w, generator=g, output_type="latent").images
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("num_steps", [1, 7, 20, 50])
def test_img2img_timesteps_equal_get_timesteps(pipe, num_steps):
    for strength in [0.0, 0.04, 0.1, 0.29, 0.3, 0.5, 0.7, 0.75, 0.999, 1.0]:
        pipe.scheduler.set_timesteps(num_steps)
        theirs, n = pipe.get_timesteps(num_steps, strength, "cpu")
        ours = editing.img2img_timesteps(num_steps, strength)
        assert ours.tolist() == theirs.tolist(), (num_steps, strength)
        assert len(ours) == n


def test_the_pipeline_fails_where_no_step_runs_and_the_course_returns_the_image(sd, pipe, images):
    """Below strength 1 / num_steps diffusers noises the latents at an empty list of timesteps and fails
    with a shape error; the course returns the image's own latents (documented in img2img)."""
    with pytest.raises(RuntimeError):
        their_latents(sd, pipe, images, 0.04, 20, 5.0, seed=0)
    z0 = editing.encode_images(sd, images, sample_posterior=False)
    out = editing.img2img_from_latents(sd, z0, PROMPTS, 0.04, 20, 5.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, z0)


# -----------------------------------------------------------------------------
# DDIM inversion


def stand_in(schedule):
    """tests/test_samplers_vs_diffusers.py's deterministic model of (x, t): a denoiser's shape, nonlinear."""
    ab = schedule.alphas_cumprod.double()

    def model(x, t, cond=None):
        a = ab[t.long()].view(-1, 1, 1, 1)
        phase = torch.cos(3 * t.double() / 1000).view_as(a)
        out = (1 - a).sqrt() * x.double() + 0.3 * torch.tanh(x.roll(1, -1).double() - 0.5 * x.double()) * phase
        return out.to(x.dtype)

    return model


def diffusers_inversion(scheduler, num_steps, x, model, cond=None):
    """The inversion loop of StableDiffusionDiffEditPipeline.invert / pix2pix-zero, without guidance."""
    scheduler.set_timesteps(num_steps)
    for t in scheduler.timesteps:
        out = model(x, t.expand(x.shape[0]), cond)
        x = scheduler.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [1, 7, 20, 50])
def test_ddim_inverse_equals_ddim_inverse_scheduler(prediction_type, num_steps):
    schedule = sd_schedule()
    model = stand_in(schedule)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = editing.ddim_inverse(model, x0, schedule, num_steps, prediction_type=prediction_type)
    scheduler = DDIMInverseScheduler.from_config(sd_scheduler_config(prediction_type=prediction_type))
    theirs = diffusers_inversion(scheduler, num_steps, x0, model)
    assert (ours - theirs).abs().max().item() <= TOL
    # it did move (one "leading" step only goes from alpha_bar_0 to t = 1: a small move)
    assert (ours - x0).abs().max().item() > (1e-3 if num_steps == 1 else 0.1)


@pytest.mark.parametrize("w", [1.0, 3.0], ids=["no guidance", "w=3"])
@pytest.mark.parametrize("num_steps", [10, 50])
def test_ddim_invert_equals_the_inverse_scheduler_loop_on_the_shipped_unet(sd, images, w, num_steps):
    z0 = editing.encode_images(sd, images, sample_posterior=False)
    ours = editing.ddim_invert(sd, z0, PROMPTS, num_steps, w)
    unet = unet_to_diffusers(sd.unet)
    cond, uncond = sd.encode_prompt(PROMPTS), sd.encode_prompt([""] * 2)
    scheduler = DDIMInverseScheduler.from_config(sd_scheduler_config())
    scheduler.set_timesteps(num_steps)
    x = z0
    with torch.no_grad():
        for t in scheduler.timesteps:  # StableDiffusionDiffEditPipeline.invert's loop
            if w > 1:
                out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond]), return_dict=False)[0]
                eps_uncond, eps_cond = out.chunk(2)
                eps = eps_uncond + w * (eps_cond - eps_uncond)
            else:
                eps = unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
            x = scheduler.step(eps, t, x).prev_sample
    assert (ours - x).abs().max().item() <= INVERSION_TOL
