"""The course's inpainting computes what diffusers' ``StableDiffusionInpaintPipeline`` computes.

The course's VAE and U-Nets go into diffusers' classes through ``course_lib.diffusers_weights``
(``vae_to_diffusers``, ``unet_to_diffusers``: a 9-channel U-Net becomes a ``UNet2DConditionModel`` with
in_channels=9). Text states come from the course's CLIP and are handed to the pipeline as ``prompt_embeds``.
With the same generator (the pipeline draws the starting noise, then samples the masked image's posterior),
DDIM and classifier-free guidance, the final latents (``output_type="latent"``) agree to 1e-5:

- with a 9-channel inpainting U-Net: ``inpainting.inpaint_with_unet`` (mask to the latent grid as diffusers
  does it, ``mask_mode="nearest"``);
- with the ordinary 4-channel U-Net, diffusers' legacy blending: ``inpainting.inpaint_blend`` with the
  starting noise reused for the known region (``known_noise="fixed"``), no resampling.
"""

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

from course_lib import data, diffusers_weights as W
from course_lib.diffusers_bridge import build_tiny_pipeline, sd_scheduler_config
from course_lib.inpainting import dilate, inpaint_blend, inpaint_unet_from_base, inpaint_with_unet
from course_lib.tiny_sd import load_tiny_sd
from course_lib.weights import WEIGHTS_DIR, load_inpaint_unet

TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd():
    return load_tiny_sd()


def diffusers_inpaint_pipeline(sd, unet):
    """``StableDiffusionInpaintPipeline`` around the course's VAE and ``unet`` (4 or 9 channels), DDIM as SD 1.x.
    Its text encoder is never run (the course's text states are passed as prompt_embeds); a tiny one fills the slot."""
    tiny = build_tiny_pipeline()
    pipe = StableDiffusionInpaintPipeline(
        vae=W.vae_to_diffusers(sd.vae), text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
        unet=W.unet_to_diffusers(unet), scheduler=DDIMScheduler.from_config(sd_scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def task(n=2):
    scenes = data.generate(n, seed=3, split="heldout")
    masks = dilate(scenes.masks[:, :1], 2)  # (n, 1, 64, 64): the first object, grown by 2 pixels
    masks[1:, :, 40:50, 3:20] = 1  # and a rectangle, so the masks are not on the 4-pixel grid
    return scenes.images_float(), masks, ["a blue square", "a large green circle in the centre"][:n]


def theirs(pipe, sd, image, mask, prompts, steps, scale, seed):
    out = pipe(prompt_embeds=sd.encode_prompt(prompts), negative_prompt_embeds=sd.encode_prompt([""] * len(prompts)),
               image=(image + 1) / 2, mask_image=mask,  # diffusers takes tensor images in [0, 1]
               height=64, width=64, num_inference_steps=steps, guidance_scale=scale,
               generator=torch.Generator().manual_seed(seed), output_type="latent")
    return out.images


def _inpaint_unets(sd):
    torch.manual_seed(0)
    net = inpaint_unet_from_base(sd.unet)
    with torch.no_grad():  # the mask and masked-image channels must matter: random weights there
        net.conv_in.weight[:, 4:].normal_(0, 0.1)
    nets = {"from_base_random_extra_channels": net}
    if (WEIGHTS_DIR / "inpaint_unet.json").exists():
        nets["shipped"] = load_inpaint_unet()
    return nets


@pytest.mark.parametrize("which", ["from_base_random_extra_channels", "shipped"])
@pytest.mark.parametrize("steps,scale", [(10, 5.0), (4, 1.0)])
def test_inpainting_unet_same_latents_as_stable_diffusion_inpaint_pipeline(sd, which, steps, scale):
    nets = _inpaint_unets(sd)
    if which not in nets:
        pytest.skip("no weights/inpaint_unet.* (python -m course_lib.train --only inpaint_unet)")
    net = nets[which]
    image, mask, prompts = task()
    _, ours = inpaint_with_unet(sd, net, image, mask, prompts, steps, scale, torch.Generator().manual_seed(7),
                                mask_mode="nearest", return_latents=True)
    ref = theirs(diffusers_inpaint_pipeline(sd, net), sd, image, mask, prompts, steps, scale, 7)
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=TOL)
    # the mask matters: another mask gives other latents (the comparison above is not of two no-ops)
    _, other = inpaint_with_unet(sd, net, image, torch.zeros_like(mask), prompts, steps, scale,
                                 torch.Generator().manual_seed(7), mask_mode="nearest", return_latents=True)
    assert (other - ours).abs().max() > 1e-2


@pytest.mark.parametrize("steps,scale", [(10, 5.0), (3, 1.0)])
def test_blending_same_latents_as_the_pipelines_legacy_4_channel_inpainting(sd, steps, scale):
    image, mask, prompts = task()
    _, ours = inpaint_blend(sd, image, mask, prompts, steps, scale, torch.Generator().manual_seed(11),
                            known_noise="fixed", mask_mode="nearest", return_latents=True)
    ref = theirs(diffusers_inpaint_pipeline(sd, sd.unet), sd, image, mask, prompts, steps, scale, 11)
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=TOL)


def test_with_max_pooled_masks_the_two_differ_only_where_the_mask_is_off_the_grid(sd):
    """Max pooling (the course's default) repaints every latent cell the mask touches; diffusers' nearest resize
    keeps a cell whose top-left pixel is unmasked. On a mask drawn on the 4-pixel grid they agree."""
    image, _, prompts = task(1)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:36, 8:28] = 1  # on the grid
    a = inpaint_blend(sd, image, mask, prompts, 4, 1.0, torch.Generator().manual_seed(1), mask_mode="max",
                      return_latents=True)[1]
    b = inpaint_blend(sd, image, mask, prompts, 4, 1.0, torch.Generator().manual_seed(1), mask_mode="nearest",
                      return_latents=True)[1]
    torch.testing.assert_close(a, b, atol=0, rtol=0)
