"""Measuring classifier-free guidance on the tiny SD: many scales in one batch, colour statistics, colours read.

Lesson 4 ("classifier-free guidance") uses these to turn "guidance makes prompts work" and "high
scales oversaturate" into curves. The guidance itself is ``course_lib.guidance``; this module only
batches it and measures what comes out. Prompt adherence (with its binding scores) is
``course_lib.evaluator.prompt_adherence``, the diversity of one prompt's images ``course_lib.fid.diversity``.

Notation (code name -> paper symbol):
    scales        w        one guidance scale per sample, SD's convention (w = 1: no guidance)
    eps_u, eps_c  eps(x_t), eps(x_t, c)   unconditional (or negative-prompt) and conditional predictions
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data import BACKGROUND_RGB, COLOUR_RGB, STRIPE_DARK
from ..evaluator import match_prompt, parse_captions
from ..guidance import guided_model
from ..samplers import Model, sample


@torch.no_grad()
def scale_sweep(sd, prompts: Sequence[str], scales: Sequence[float], noise: torch.Tensor, num_steps: int = 20,
                negative_prompt: str | Sequence[str] | None = None, guidance_rescale: float = 0.0,
                sampler: str = "ddim", return_pred_std: bool = False):
    """Final scaled latents for every (scale, prompt) pair, every scale from the same noise.

    sd: a TinySD; noise: (P, 4, h, w), one starting latent per prompt, reused at every scale;
    negative_prompt: what guidance steers away from ("" by default), one string or one per prompt.
    Returns latents (S, P, 4, h, w). Scales above 1 run as ONE sampling loop over S' * P samples
    (one U-Net pass of batch 2 S' P per step); scale 1 runs the conditional branch alone, as
    ``guided_model`` does. With return_pred_std=True it also returns the standard deviation of
    each sample's guided prediction at every step, (S, num_steps, P).
    """
    P = len(prompts)
    if noise.shape[0] != P:
        raise ValueError(f"need one starting latent per prompt: {P} prompts, noise of shape {tuple(noise.shape)}")
    negative = [""] * P if negative_prompt is None else (
        [negative_prompt] * P if isinstance(negative_prompt, str) else list(negative_prompt))
    if len(negative) != P:
        raise ValueError(f"got {P} prompts but {len(negative)} negative prompts")
    cond = sd.encode_prompt(list(prompts))  # (P, L, D)
    uncond = sd.encode_prompt(negative)  # (P, L, D)
    x = noise.to(sd.device, sd.dtype)
    kw = dict(prediction_type=sd.unet.config.prediction_type)
    latents, stds = {}, {}
    if 1.0 in scales:
        log: list[torch.Tensor] = []
        model = _recorded(guided_model(sd.unet, cond, None, 1.0), log)
        latents[1.0] = sample(sampler, model, x, sd.schedule, num_steps, None, **kw)
        stds[1.0] = torch.stack(log)  # (steps, P)
    guided = [s for s in scales if s != 1.0]
    if guided:
        S = len(guided)
        w = torch.tensor(guided, dtype=torch.float32).repeat_interleave(P)  # (S*P,): scale of each sample
        log = []
        # one scale per sample: guided_model broadcasts the (S*P,) scales as (S*P, 1, 1, 1)
        model = _recorded(guided_model(sd.unet, cond.repeat(S, 1, 1), uncond.repeat(S, 1, 1), w, guidance_rescale), log)
        z = sample(sampler, model, x.repeat(S, 1, 1, 1), sd.schedule, num_steps, None, **kw)  # (S*P, 4, h, w)
        s_all = torch.stack(log)  # (steps, S*P)
        for k, s in enumerate(guided):
            latents[s] = z[k * P:(k + 1) * P]
            stds[s] = s_all[:, k * P:(k + 1) * P]
    out = torch.stack([latents[s] for s in scales])  # (S, P, 4, h, w)
    if return_pred_std:
        return out, torch.stack([stds[s] for s in scales])  # (S, steps, P)
    return out


def _recorded(model: Model, log: list) -> Model:
    """Wrap `model` so that every call appends the per-sample std of its output to `log`."""

    def wrapped(x, t, cond=None):
        pred = model(x, t, cond)
        log.append(pred.flatten(1).float().std(dim=1).cpu())  # (B,)
        return pred

    return wrapped


@torch.no_grad()
def decode_unclamped(sd, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> the VAE decoder's raw output (B, 3, 64, 64), before TinySD clamps it to [-1, 1]."""
    return sd.vae.decode(latents.to(sd.device, sd.dtype) / sd.vae.config.scaling_factor)


# Every colour a real scene is drawn with: each colour name's centre, the darker stripe of it, and the backgrounds.
# Shades, stripes and background gradients vary around these by up to about 55 RGB units.
PALETTE_RGB = (list(COLOUR_RGB.values()) + [tuple(STRIPE_DARK * c for c in rgb) for rgb in COLOUR_RGB.values()]
               + list(BACKGROUND_RGB.values()))


def colour_stats(raw: torch.Tensor, tolerance: float = 60.0) -> dict[str, float]:
    """Colour statistics of a batch of decoded images, the course's measures of "oversaturated" and "artifacts".

    raw: (B, 3, H, W) decoder output (nominally in [-1, 1], not yet clamped). Returns means over the batch:
      saturation    mean HSV saturation (max - min) / max of the coloured pixels (saturation > 0.25: the objects)
      off_palette   fraction of pixels farther than `tolerance` (RGB distance, 0-255 units) from every colour
                    the world draws with (``PALETTE_RGB``): tints, halos, mottled backgrounds. Real scenes: under 0.01%.
      out_of_range  fraction of the decoder's output values beyond [-1, 1], colours it overshoots (then clipped)
    """
    rgb = (raw.float().clamp(-1, 1) + 1) / 2  # (B, 3, H, W) in [0, 1]
    mx, mn = rgb.max(dim=1).values, rgb.min(dim=1).values  # (B, H, W)
    sat = (mx - mn) / mx.clamp(min=1e-6)
    coloured = sat > 0.25
    palette = torch.tensor(PALETTE_RGB, dtype=torch.float32, device=rgb.device) / 255  # (K, 3)
    dist = (rgb.permute(0, 2, 3, 1)[..., None, :] - palette).norm(dim=-1).min(dim=-1).values  # (B, H, W)
    return {
        "saturation": sat[coloured].mean().item() if coloured.any() else 0.0,
        "off_palette": (dist > tolerance / 255).float().mean().item(),
        "out_of_range": (raw.abs() > 1).float().mean().item(),
    }


@torch.no_grad()
def colours_read(evaluator, images: torch.Tensor, prompts: Sequence[str]) -> list[str | None]:
    """The colour the evaluator reads on the object that answers each prompt's first object (None where it
    finds no object). Objects are paired with the prompt's as ``prompt_adherence`` pairs them
    (``evaluator.match_prompt``), so "a large circle in the centre" is answered by the image's circle even when
    the prompt leaves its colour unsaid: what lesson 4 counts to see where a negative prompt sends the colours."""
    wanted = parse_captions(list(prompts))
    if images.shape[0] != len(wanted):
        raise ValueError(f"got {images.shape[0]} images but {len(wanted)} prompts")
    out = []
    for want, read in zip(wanted, evaluator.read_attributes(images.float())):
        pick, _ = match_prompt(want["objects"][:1], read["objects"])
        out.append(read["objects"][pick[0]]["colour"] if pick[0] is not None else None)
    return out


def colour_pixel_fraction(images: torch.Tensor, colour: str, tolerance: float = 60.0) -> torch.Tensor:
    """Per image, the fraction of pixels within `tolerance` (RGB distance, 0-255 units) of a colour name's centre.

    images: (B, 3, H, W) in [-1, 1]; colour: a key of ``data.COLOUR_RGB``. Returns (B,). A check on
    colours that does not go through the evaluator.
    """
    if colour not in COLOUR_RGB:
        raise ValueError(f"unknown colour {colour!r}; the world knows {tuple(COLOUR_RGB)}")
    rgb = (images.float().clamp(-1, 1) + 1) * 127.5  # (B, 3, H, W) in [0, 255]
    target = torch.tensor(COLOUR_RGB[colour], dtype=torch.float32, device=rgb.device).view(1, 3, 1, 1)
    return ((rgb - target).norm(dim=1) < tolerance).float().mean(dim=(1, 2))  # (B,)
