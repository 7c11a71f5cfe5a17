"""Inpainting: repaint the masked region of an image, keep the rest. Lesson 9 (editing) uses it.

Two ways, both on the course's tiny Stable Diffusion (``sd``: a ``tiny_sd.TinySD``):

1. **Blending with the ordinary U-Net** (``inpaint_blend``). The U-Net never sees the mask. At every DDIM
   step the known region (mask = 0) of the latent is overwritten with the input's own latent noised to the
   timestep just reached, so the unknown region is denoised *next to* a correct noisy version of the rest
   (Lugmayr et al. 2022, "RePaint", eq. 8; diffusers' legacy inpainting did the same with the 4-channel
   U-Net in ``StableDiffusionInpaintPipeline``). The model only ever sees the known region through the
   noise, so the two halves can disagree: seams. RePaint's **resampling** fixes part of that: after a step
   down, noise the latent back up and denoise again, ``resample`` times (``jump_length`` steps at a time),
   so that the generated region is harmonised with the known one over several passes.

2. **A dedicated inpainting U-Net** (``inpaint_with_unet``), as SD's inpainting model
   (``stable-diffusion-inpainting``, Rombach et al. 2022, section 4.5): the U-Net takes 4 + 1 + 4 = 9 input
   channels, ``cat([z_t, mask, masked_image_latents])`` in the order of diffusers'
   ``StableDiffusionInpaintPipeline.__call__``: it *sees* the mask and what is around it and is trained for
   the job. ``inpaint_unet_from_base`` builds one from the course's U-Net with the 5 new input channels of
   ``conv_in`` set to zero, so it starts out as exactly the base model (SD 1.5-inpainting was started from
   SD 1.2 the same way); ``course_lib.train.train_inpaint_unet`` fine-tunes it on random masks.

Mask convention (as diffusers): a mask is 1 (True) where the image is to be **repainted**, 0 where it is
kept. Images are (B, 3, 64, 64) float in [-1, 1]; masks are (B, 1, 64, 64) (or (1, 64, 64) / (64, 64),
or batch 1 for every image), bool or float holding only 0 and 1.

The latent grid is 16 x 16: one latent cell covers 4 x 4 pixels. ``latent_mask`` brings a pixel mask to
it by **max pooling** (a cell is repainted if any of its 16 pixels is), so that nothing that was asked to
change is pinned to the old image; diffusers instead resizes with ``F.interpolate`` (nearest: the cell
takes its top-left pixel), available as ``mode="nearest"`` and used for the parity tests.

Notation as in ``course_lib/schedules.py``: alpha_bar_t, x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .guidance import guided_model
from .samplers import default_timesteps, sample
from .unet import UNet

MaskMode = Literal["max", "nearest"]
KnownNoise = Literal["fresh", "fixed"]


# --- Checking inputs. -------------------------------------------------------------------------------------

def check_image(image: torch.Tensor, size: int = 64) -> torch.Tensor:
    """``image`` as a (B, 3, size, size) float tensor in [-1, 1], or a ValueError that says what is wrong."""
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a torch tensor (B, 3, {size}, {size}) in [-1, 1], got {type(image).__name__}")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[1] != 3 or tuple(image.shape[-2:]) != (size, size):
        raise ValueError(f"image must be (B, 3, {size}, {size}) (or (3, {size}, {size})), got {tuple(image.shape)}: "
                         f"the course's VAE works on {size}x{size} RGB images")
    if not image.is_floating_point():
        raise ValueError(f"image must be float in [-1, 1], got dtype {image.dtype} (data.to_float converts uint8 scenes)")
    if image.numel() and (image.min() < -1.0 - 1e-4 or image.max() > 1.0 + 1e-4):
        raise ValueError(f"image values must lie in [-1, 1], got [{image.min():.3f}, {image.max():.3f}] "
                         "(data.to_float converts uint8 scenes)")
    return image


def check_mask(mask: torch.Tensor, batch: int, size: int = 64) -> torch.Tensor:
    """``mask`` as a (batch, 1, size, size) float tensor of 0 and 1 (1: repaint), or a clear ValueError.

    Accepts (size, size), (1, size, size), (B, 1, size, size) with B = batch or 1 (shared by every image),
    bool or any numeric dtype holding only 0 and 1."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch tensor (B, 1, {size}, {size}) of 0/1 (or bool), 1 where to repaint; "
                         f"got {type(mask).__name__}")
    m = mask
    if m.dim() == 2:
        m = m[None, None]
    elif m.dim() == 3:
        if m.shape[0] != 1:
            raise ValueError(f"a 3-d mask must be (1, {size}, {size}); got {tuple(mask.shape)}. "
                             f"For a batch, pass (B, 1, {size}, {size})")
        m = m[None]
    if m.dim() != 4 or m.shape[1] != 1 or tuple(m.shape[-2:]) != (size, size):
        raise ValueError(f"mask must be (B, 1, {size}, {size}) (or ({size}, {size})), the image's size, with one "
                         f"channel; got {tuple(mask.shape)}")
    if m.shape[0] not in (1, batch):
        raise ValueError(f"got {m.shape[0]} masks for {batch} images: pass one mask per image or a single mask for all")
    if m.dtype != torch.bool:
        if m.is_complex():
            raise ValueError(f"mask must be bool or real 0/1, got dtype {m.dtype}")
        if not ((m == 0) | (m == 1)).all():
            bad = m[(m != 0) & (m != 1)].flatten()[:3].tolist()
            raise ValueError(f"mask must hold only 0 and 1 (or be bool), got values such as {bad}: binarise it "
                             "first, e.g. mask > 0.5 (a uint8 mask of 0/255: mask > 127)")
    return m.float().expand(batch, 1, size, size)


# --- Masks at latent resolution. ---------------------------------------------------------------------------

def latent_mask(mask: torch.Tensor, factor: int = 4, mode: MaskMode = "max") -> torch.Tensor:
    """A (B, 1, H, W) 0/1 pixel mask -> (B, 1, H/factor, W/factor) on the latent grid.

    "max": max pooling, a latent cell is repainted if *any* of its factor x factor pixels is (nothing
    meant to change stays pinned to the old latent). "nearest": ``F.interpolate``'s default, what
    diffusers' ``StableDiffusionInpaintPipeline.prepare_mask_latents`` does (each cell takes its top-left
    pixel). On masks drawn on the latent grid the two agree."""
    if mode == "max":
        return F.max_pool2d(mask.float(), factor)  # (B, 1, H/f, W/f)
    if mode == "nearest":
        return F.interpolate(mask.float(), size=(mask.shape[-2] // factor, mask.shape[-1] // factor))
    raise ValueError(f"unknown mask mode {mode!r}; choose 'max' or 'nearest'")


def dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow a (B, 1, H, W) 0/1 mask by ``pixels`` in every direction (a square structuring element)."""
    if pixels <= 0:
        return mask.float()
    return F.max_pool2d(mask.float(), 2 * pixels + 1, stride=1, padding=pixels)


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with the region to repaint set to 0 (mid grey in [-1, 1]), as diffusers does:
    ``init_image * (mask < 0.5)``."""
    return image * (mask < 0.5)


# --- Random training masks (SD's inpainting model was trained on random masks, a quarter fully masked). ----

@dataclass
class MaskSettings:
    full: float = 0.25  # share of fully masked images (SD's inpainting training: 25%): plain text-to-image
    rectangle: float = 0.25  # share of random rectangles
    objects: float = 0.3  # share of one object's mask from the scene, dilated: what lesson 9 repaints
    # the rest (0.2): free strokes, a few thick line segments, as a user draws with a brush
    max_dilation: int = 4  # object masks grow by 0 .. this many pixels
    stroke_segments: int = 3  # segments per free stroke
    stroke_radius: tuple = (2.0, 6.0)  # brush radius range, pixels


def stroke_masks(n: int, generator: torch.Generator, size: int = 64, segments: int = 3,
                 radius: tuple = (2.0, 6.0)) -> torch.Tensor:
    """(n, 1, size, size) bool masks of free strokes: a polyline of ``segments`` random segments drawn with a
    round brush of random radius (pixels within that distance of a segment)."""
    pts = torch.rand(n, segments + 1, 2, generator=generator) * size  # (n, S+1, 2) x, y
    r = radius[0] + torch.rand(n, generator=generator) * (radius[1] - radius[0])  # (n,)
    yx = torch.stack(torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij"), -1)
    p = yx.flip(-1).reshape(1, 1, -1, 2)  # (1, 1, size*size, 2) x, y of each pixel centre
    a, b = pts[:, :-1, None], pts[:, 1:, None]  # (n, S, 1, 2) segment ends
    ab = b - a
    u = (((p - a) * ab).sum(-1) / ab.pow(2).sum(-1).clamp_min(1e-6)).clamp(0, 1)  # (n, S, P) projection
    dist = (p - (a + u[..., None] * ab)).norm(dim=-1).amin(1)  # (n, P) distance to the nearest segment
    return (dist <= r[:, None]).reshape(n, 1, size, size)


def rectangle_masks(n: int, generator: torch.Generator, size: int = 64, min_side: int = 8) -> torch.Tensor:
    """(n, 1, size, size) bool masks, each one axis-aligned rectangle of random place and sides >= ``min_side``."""
    side = min_side + (torch.rand(n, 2, generator=generator) * (size - min_side)).long()  # (n, 2) w, h
    corner = (torch.rand(n, 2, generator=generator) * (size - side + 1)).long()  # (n, 2) x, y
    r = torch.arange(size)
    inside_x = (r[None] >= corner[:, :1]) & (r[None] < corner[:, :1] + side[:, :1])  # (n, size)
    inside_y = (r[None] >= corner[:, 1:]) & (r[None] < corner[:, 1:] + side[:, 1:])  # (n, size)
    return (inside_y[:, :, None] & inside_x[:, None, :])[:, None]  # (n, 1, size, size)


def random_masks(object_masks: torch.Tensor, n_objects: torch.Tensor, generator: torch.Generator,
                 settings: MaskSettings = MaskSettings()) -> torch.Tensor:
    """One random training mask per scene, (B, 1, 64, 64) float 0/1: fully masked, a rectangle, one of the
    scene's objects (``object_masks`` (B, K, 64, 64), ``n_objects`` (B,)) dilated by a few pixels, or free
    strokes, in the shares of ``settings``. Every draw comes from ``generator`` in a fixed order."""
    b, size = object_masks.shape[0], object_masks.shape[-1]
    kind = torch.rand(b, generator=generator)
    rect = rectangle_masks(b, generator, size)
    strokes = stroke_masks(b, generator, size, settings.stroke_segments, settings.stroke_radius)
    k = (torch.rand(b, generator=generator) * n_objects).long()  # which object
    grow = torch.randint(0, settings.max_dilation + 1, (b,), generator=generator)
    obj = object_masks[torch.arange(b), k][:, None].float()  # (B, 1, size, size)
    obj = torch.stack([dilate(obj[i:i + 1], int(grow[i]))[0] for i in range(b)])
    s = settings
    full = torch.ones_like(obj)
    edges = torch.tensor([s.full, s.full + s.rectangle, s.full + s.rectangle + s.objects])
    which = torch.bucketize(kind, edges, right=True)  # 0 full, 1 rectangle, 2 object, 3 strokes
    choices = torch.stack([full, rect.float(), obj, strokes.float()], 1)  # (B, 4, 1, size, size)
    return choices[torch.arange(b), which]


# --- The inpainting U-Net. ---------------------------------------------------------------------------------

def inpaint_unet_from_base(base: UNet, extra_channels: int = 5) -> UNet:
    """A U-Net with ``4 + extra_channels`` inputs (9: latent, mask, masked-image latent), initialised from
    ``base``: every weight copied, and ``conv_in``'s filters for the new channels set to zero, so that at
    initialisation it predicts exactly what ``base`` predicts from the first 4 channels (SD 1.5-inpainting
    was initialised from SD 1.2 this way: "5 additional input channels ... zero-initialized")."""
    import dataclasses

    cfg = dataclasses.replace(base.config, in_channels=base.config.in_channels + extra_channels)
    net = UNet(cfg)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    w = state["conv_in.weight"]  # (C, 4, 3, 3)
    state["conv_in.weight"] = torch.cat([w, w.new_zeros(w.shape[0], extra_channels, *w.shape[2:])], 1)  # (C, 9, 3, 3)
    net.load_state_dict(state)
    return net.to(device=next(base.parameters()).device, dtype=next(base.parameters()).dtype)


def inpaint_conditioning(vae, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None,
                         mode: MaskMode = "max", sample_posterior: bool = True) -> torch.Tensor:
    """The 5 extra input channels of the inpainting U-Net, (B, 5, h, w): the mask on the latent grid, then the
    scaled latent of the masked image (``vae.encode(masked_image).sample(generator) * scaling_factor``, as
    diffusers' ``_encode_vae_image`` samples the posterior; ``sample_posterior=False`` takes its mean)."""
    post = vae.encode(masked_image(image, mask))
    z = post.sample(generator) if sample_posterior else post.mean
    lat_mask = latent_mask(mask, vae.config.downsample_factor, mode)  # (B, 1, h, w)
    return torch.cat([lat_mask.to(z.dtype), z * vae.config.scaling_factor], 1)  # (B, 5, h, w)


def with_conditioning(unet: UNet, extra: torch.Tensor):
    """``unet`` as a sampler model ``(x, t, context) -> eps`` that appends ``extra`` (B, 5, h, w) to the latent:
    ``cat([x, mask, masked_image_latents])``; under classifier-free guidance x has 2B rows and extra repeats."""

    def model(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        c = extra.repeat(x.shape[0] // extra.shape[0], 1, 1, 1) if x.shape[0] != extra.shape[0] else extra
        return unet(torch.cat([x, c.to(x.dtype)], 1), t, context)  # (B, 9, h, w) in

    return model


# --- Prompts and guidance, shared by both methods. -----------------------------------------------------------

def _prompts(prompt, batch: int) -> list[str]:
    prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for {batch} images: give one prompt, or one per image")
    return prompts


def _guided(sd, unet_model, prompts: list[str], guidance_scale: float, negative_prompt: str = ""):
    if not math.isfinite(guidance_scale) or guidance_scale < 1.0:
        raise ValueError(f"guidance_scale must be >= 1 (1 means no guidance), got {guidance_scale}")
    cond = sd.encode_prompt(prompts)
    uncond = sd.encode_prompt([negative_prompt] * len(prompts)) if guidance_scale != 1.0 else None
    return guided_model(unet_model, cond, uncond, guidance_scale)


def _check_steps(num_steps) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")


# --- 1. Blending with the ordinary U-Net (+ RePaint's resampling). -------------------------------------------

def repaint_schedule(num_steps: int, resample: int = 1, jump_length: int = 1) -> list[int]:
    """The order in which RePaint visits the step grid (Lugmayr et al. 2022, section 4.2, "jumps").

    Grid index i = 0 is the noisiest timestep, i = num_steps the end (clean). Going i -> i + 1 is one DDIM
    step down; every ``jump_length`` steps, the walk jumps back up ``jump_length`` grid points (re-noising)
    and comes down again, ``resample - 1`` times, so each step is denoised ``resample`` times. resample = 1
    is plain blending. (RePaint's ``get_schedule_jump`` with jump_n_sample = resample, on the DDIM grid.)"""
    _check_steps(num_steps)
    if not isinstance(resample, int) or resample < 1:
        raise ValueError(f"resample must be a positive integer (1: no resampling), got {resample!r}")
    if not isinstance(jump_length, int) or jump_length < 1:
        raise ValueError(f"jump_length must be a positive integer, got {jump_length!r}")
    left = {k: resample - 1 for k in range(jump_length, num_steps, jump_length)}  # grid points that jump back
    seq, i = [0], 0
    while i < num_steps:
        i += 1
        seq.append(i)
        if left.get(i, 0) > 0:
            left[i] -= 1
            for _ in range(jump_length):
                i -= 1
                seq.append(i)
    return seq


@torch.no_grad()
def inpaint_blend(sd, image: torch.Tensor, mask: torch.Tensor, prompt: str | list[str], num_steps: int = 20,
                  guidance_scale: float = 5.0, generator: torch.Generator | None = None, resample: int = 1,
                  jump_length: int = 1, known_noise: KnownNoise = "fresh", mask_mode: MaskMode = "max",
                  negative_prompt: str = "", return_latents: bool = False, inpaint_unet: UNet | None = None):
    """Repaint ``mask`` (1: repaint) of ``image`` with the ordinary U-Net, blending the known region at every step.

    One DDIM step from grid point i to i + 1 (timesteps t > s), then the blend (RePaint, eq. 8):
        x_s   = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s) eps_hat            DDIM (eta = 0)
        known = sqrt(alpha_bar_s) z_image + sqrt(1 - alpha_bar_s) n                 the input, noised to s
        x_s   = m * x_s + (1 - m) * known                                          m: the latent mask
    After the last step the known region is the input's latent itself (what diffusers' legacy inpainting does),
    so it is kept exactly, up to the VAE's round trip. With ``resample`` > 1, RePaint's jumps: x_s is noised
    back up, x_t = sqrt(alpha_bar_t / alpha_bar_s) x_s + sqrt(1 - alpha_bar_t / alpha_bar_s) z (the forward
    process from s to t), and denoised again (``repaint_schedule``).

    known_noise: "fresh" draws a new n at every blend (RePaint); "fixed" reuses the starting noise, as
    diffusers' ``StableDiffusionInpaintPipeline`` does with a 4-channel U-Net. Randomness, all from
    ``generator``, in this order: the input's latent (a posterior sample), the starting noise, then each
    step's fresh noise. Returns images (B, 3, 64, 64) in [-1, 1] (and the final latents with return_latents).
    inpaint_unet: blend with a 9-channel inpainting U-Net instead of the ordinary one (it also sees the mask and
    the masked image, whose latent is the posterior mean here): the known region is then kept exactly too.
    """
    _check_steps(num_steps)
    if known_noise not in ("fresh", "fixed"):
        raise ValueError(f"known_noise must be 'fresh' or 'fixed', got {known_noise!r}")
    order = repaint_schedule(num_steps, resample, jump_length)
    image = check_image(image).to(sd.device, sd.dtype)
    b = image.shape[0]
    mask = check_mask(mask, b).to(sd.device, sd.dtype)
    prompts = _prompts(prompt, b)
    z_image = sd.vae.encode(image).sample(generator) * sd.vae.config.scaling_factor  # (B, 4, 16, 16)
    m = latent_mask(mask, sd.vae.config.downsample_factor, mask_mode)  # (B, 1, 16, 16)
    unet = sd.unet
    if inpaint_unet is not None:
        if inpaint_unet.config.in_channels != 9:
            raise ValueError(f"inpaint_unet must take 9 input channels, got {inpaint_unet.config.in_channels}")
        unet = with_conditioning(inpaint_unet, inpaint_conditioning(sd.vae, image, mask, None, mask_mode,
                                                                    sample_posterior=False))
    model = _guided(sd, unet, prompts, guidance_scale, negative_prompt)
    g_device = generator.device if generator is not None else torch.device("cpu")

    def randn() -> torch.Tensor:
        return torch.randn(z_image.shape, generator=generator, device=g_device, dtype=z_image.dtype).to(sd.device)

    noise = randn()
    ts = default_timesteps(num_steps, sd.schedule.num_train_timesteps)  # (n,) descending
    abar = sd.schedule.alphas_cumprod
    ab = torch.cat([abar[ts], abar[:1]]).tolist()  # alpha_bar at grid points 0 .. n (the end: alpha_bar_0)
    x = noise
    for cur, nxt in zip(order[:-1], order[1:]):
        if nxt > cur:  # one DDIM step down, then blend the known region in
            t = ts[cur].expand(b).to(sd.device)
            eps = model(x, t)
            x0 = (x - math.sqrt(1 - ab[cur]) * eps) / math.sqrt(ab[cur])
            x = math.sqrt(ab[nxt]) * x0 + math.sqrt(1 - ab[nxt]) * eps
            if nxt == num_steps:
                known = z_image
            else:
                n = noise if known_noise == "fixed" else randn()
                known = math.sqrt(ab[nxt]) * z_image + math.sqrt(1 - ab[nxt]) * n
            x = m * x + (1 - m) * known
        else:  # RePaint's jump back: the forward process from grid point cur up to nxt (noisier)
            a = ab[nxt] / ab[cur]
            x = math.sqrt(a) * x + math.sqrt(1 - a) * randn()
    images = sd.decode_latents(x)
    return (images, x) if return_latents else images


# --- 2. The dedicated inpainting U-Net. ------------------------------------------------------------------------

@torch.no_grad()
def inpaint_with_unet(sd, inpaint_unet: UNet, image: torch.Tensor, mask: torch.Tensor, prompt: str | list[str],
                      num_steps: int = 20, guidance_scale: float = 5.0, generator: torch.Generator | None = None,
                      mask_mode: MaskMode = "max", negative_prompt: str = "", return_latents: bool = False):
    """Repaint ``mask`` (1: repaint) of ``image`` with a 9-channel inpainting U-Net (``load_inpaint_unet``).

    As diffusers' ``StableDiffusionInpaintPipeline`` with a 9-channel U-Net at strength 1: draw x_T ~ N(0, I),
    encode the masked image (posterior sample, times the scaling factor), bring the mask to the latent grid,
    then DDIM with classifier-free guidance on eps_theta(cat([x_t, mask, masked_image_latents]), t, text).
    Randomness from ``generator`` in diffusers' order: the starting noise, then the masked image's latent.
    Nothing is blended: the model alone keeps the known region (so it is only approximately preserved).
    Returns images (B, 3, 64, 64) in [-1, 1] (and the final latents with return_latents).
    """
    _check_steps(num_steps)
    if inpaint_unet.config.in_channels != 9:
        raise ValueError(f"inpaint_unet must take 9 input channels (latent, mask, masked image latent), got "
                         f"{inpaint_unet.config.in_channels}: load it with weights.load_inpaint_unet()")
    image = check_image(image).to(sd.device, sd.dtype)
    b = image.shape[0]
    mask = check_mask(mask, b).to(sd.device, sd.dtype)
    prompts = _prompts(prompt, b)
    g_device = generator.device if generator is not None else torch.device("cpu")
    x = torch.randn(sd.latent_shape(b), generator=generator, device=g_device, dtype=torch.float32).to(sd.device, sd.dtype)
    extra = inpaint_conditioning(sd.vae, image, mask, generator, mask_mode)  # (B, 5, 16, 16)
    model = _guided(sd, with_conditioning(inpaint_unet, extra), prompts, guidance_scale, negative_prompt)
    z = sample("ddim", model, x, sd.schedule, num_steps, None, prediction_type=inpaint_unet.config.prediction_type)
    images = sd.decode_latents(z)
    return (images, z) if return_latents else images


# --- 3. Measuring an inpainting method on held-out scenes. ------------------------------------------------------

@dataclass
class EditTasks:
    """Held-out scenes, one object of each to repaint into something else (lesson 9's measurements).

    images (B, 3, 64, 64) in [-1, 1]; masks (B, 1, 64, 64) 0/1: the object's visible pixels dilated by
    ``dilation`` pixels; prompts: the new object in words (its size and position kept, its colour or its
    shape changed, in turn); wanted: the new object's shape and colour, what the repainted region should show.
    """

    images: torch.Tensor
    masks: torch.Tensor
    prompts: list
    wanted: list


def edit_tasks(scenes, n: int = 48, dilation: int = 2, seed: int = 0) -> EditTasks:
    """``n`` repainting tasks from ``scenes`` (held-out ``data.Scenes``): in each scene the largest object
    (most visible pixels) is masked, dilated by ``dilation`` pixels, and the prompt names a different colour
    (even tasks) or a different shape (odd tasks), drawn from the training concepts with ``seed``."""
    from . import data

    g = torch.Generator().manual_seed(seed)
    n = min(n, len(scenes))
    area = scenes.masks[:n].flatten(2).sum(-1)  # (n, K) visible pixels per slot
    k = area.argmax(1)  # (n,) the largest object
    masks = dilate(scenes.masks[torch.arange(n), k][:, None], dilation)  # (n, 1, 64, 64)
    prompts, wanted = [], []
    for i in range(n):
        obj = scenes.attributes(i)["objects"][int(k[i])]
        new = dict(obj)
        name, choices = ("colour", data.TRAIN_COLOURS) if i % 2 == 0 else ("shape", data.TRAIN_SHAPES)
        others = [c for c in choices if c != obj[name]]
        new[name] = others[int(torch.randint(len(others), (1,), generator=g))]
        said = {"shape": new["shape"], "colour": new["colour"], "size": new["size"], "position": new["position"]}
        prompts.append(data.template_caption({"objects": [said], "background": None}))
        wanted.append({"shape": new["shape"], "colour": new["colour"]})
    return EditTasks(scenes.images_float()[:n], masks, prompts, wanted)


def psnr_outside(result: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per image, the PSNR (dB, images in [-1, 1] taken as [0, 1]) of ``result`` against ``reference`` over the
    pixels the mask keeps (mask = 0): how well the region outside the mask is preserved. (B,)"""
    keep = (mask < 0.5).float().expand_as(result)  # (B, 3, H, W)
    se = ((result - reference) / 2).pow(2) * keep
    mse = se.sum((1, 2, 3)) / keep.sum((1, 2, 3)).clamp_min(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def boundary_band(mask: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """The 2-pixel band along the edge of the region a method may change, (B, 1, H, W) bool: the mask on the
    latent grid (max pooled, then back to pixels: what blending replaces), one pixel inside and one outside."""
    region = F.interpolate(latent_mask(mask, factor), scale_factor=factor)  # (B, 1, H, W) on 4-pixel cells
    grown = dilate(region, 1)
    shrunk = 1 - dilate(1 - region, 1)
    return (grown - shrunk) > 0.5


def gradient_magnitude(images: torch.Tensor) -> torch.Tensor:
    """|grad| of each pixel, (B, 1, H, W): forward differences of the channel-mean image (0 at the last row/col)."""
    grey = images.mean(1, keepdim=True)  # (B, 1, H, W)
    dx = F.pad(grey[..., :, 1:] - grey[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(grey[..., 1:, :] - grey[..., :-1, :], (0, 0, 0, 1))
    return (dx.pow(2) + dy.pow(2)).sqrt()


def band_gradient(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean gradient magnitude in ``boundary_band(mask)``, per image (B,). A seam (an intensity step where the
    repainted cells meet the kept ones, or an object cut off at the mask's edge) raises it; in a real scene the
    band around a dilated object mask lies on the smooth background, so its value there is the baseline."""
    band = boundary_band(mask).float()
    return (gradient_magnitude(images) * band).sum((1, 2, 3)) / band.sum((1, 2, 3)).clamp_min(1)


def region_adherence(images: torch.Tensor, tasks: EditTasks, evaluator) -> dict:
    """Does the repainted region show the prompt's object? The evaluator reads every object; the one whose pixels
    overlap the mask most is the repainted object (none overlapping: a miss). Returns the fraction whose shape
    and colour are both the prompt's (``adherence``), and per attribute."""
    pred = evaluator.predict(images.to(next(evaluator.parameters()).device))
    cells = F.max_pool2d(tasks.masks.float(), 2)[:, 0] > 0.5  # (B, 32, 32): the evaluator reads 2x2-pixel cells
    right = {"shape": [], "colour": []}
    both = []
    for b, objs in enumerate(pred["objects"]):
        overlap = [int((o["pixels"] & cells[b]).sum()) for o in objs]
        best = objs[max(range(len(objs)), key=overlap.__getitem__)] if objs and max(overlap) > 0 else None
        ok = {name: best is not None and best[name] == tasks.wanted[b][name] for name in right}
        for name in right:
            right[name].append(ok[name])
        both.append(all(ok.values()))
    n = len(both)
    return {"adherence": sum(both) / max(n, 1), "per_attribute": {k: sum(v) / max(n, 1) for k, v in right.items()},
            "confirmed": both}


@torch.no_grad()
def measure_inpainting(images: torch.Tensor, tasks: EditTasks, evaluator, round_trip: torch.Tensor) -> dict:
    """Preservation, adherence and seams of repainted ``images`` for ``tasks``.

    psnr_outside_db: PSNR over the kept pixels against the input; psnr_outside_vs_round_trip_db: the same
    against the input's VAE round trip (decode(encode(x))), the best any latent method can do;
    psnr_outside_latent_cells_db: against the input, over the pixels outside every latent cell the mask touches
    (blending repaints whole 4 x 4 cells, so the pixels between the mask and its cells' edges are repainted too);
    region_adherence: ``region_adherence``; seam_ratio: mean band gradient over that of the input scene in the
    same band (1: no more edges than the real scene has there)."""
    adh = region_adherence(images, tasks, evaluator)
    real = band_gradient(tasks.images, tasks.masks)
    out = band_gradient(images, tasks.masks)
    cells = F.interpolate(latent_mask(tasks.masks), scale_factor=4)  # (B, 1, 64, 64): every latent cell touched
    return {"psnr_outside_db": float(psnr_outside(images, tasks.images, tasks.masks).mean()),
            "psnr_outside_vs_round_trip_db": float(psnr_outside(images, round_trip, tasks.masks).mean()),
            "psnr_outside_latent_cells_db": float(psnr_outside(images, tasks.images, cells).mean()),
            "region_adherence": adh["adherence"], "region_per_attribute": adh["per_attribute"],
            "band_gradient": float(out.mean()), "band_gradient_real": float(real.mean()),
            "seam_ratio": float(out.mean() / real.mean().clamp_min(1e-8)), "n": len(tasks.prompts)}


@torch.no_grad()
def quick_inpaint_check(sd, inpaint_unet: UNet, scenes, evaluator, n: int = 32, num_steps: int = 20,
                        guidance_scale: float = 5.0, seed: int = 0) -> dict:
    """The model card's quick check of an inpainting U-Net: ``n`` held-out repainting tasks (``edit_tasks``),
    measured (``measure_inpainting``); the full comparison with blending is benchmarks/bench_inpainting.py."""
    tasks = edit_tasks(scenes, n)
    out = inpaint_with_unet(sd, inpaint_unet, tasks.images, tasks.masks, tasks.prompts, num_steps, guidance_scale,
                            torch.Generator().manual_seed(seed))
    round_trip = sd.vae.decode(sd.vae.encode(tasks.images).mean).clamp(-1, 1)
    result = measure_inpainting(out, tasks, evaluator, round_trip)
    result["settings"] = {"num_steps": num_steps, "guidance_scale": guidance_scale, "sampler": "ddim", "seed": seed,
                          "mask": "largest object, dilated 2 px"}
    result["full_benchmark"] = "benchmarks/bench_inpainting.py --update-card adds the full comparison"
    return result
