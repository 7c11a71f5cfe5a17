"""Classifier-free guidance, negative prompts and guidance rescale, as small named units.

Lesson 4 ("classifier-free guidance") teaches them; tests/test_guidance.py proves them equal to
StableDiffusionPipeline's guidance step and to diffusers' `rescale_noise_cfg`.

Notation (code name -> paper symbol):
    pred_uncond   eps(x_t)      the prediction without the prompt (empty or negative prompt)
    pred_cond     eps(x_t, c)   the prediction with the prompt c
    scale         w             guidance scale in SD's convention: w = 1 is no guidance;
                                Ho & Salimans 2022 (eq. 6) write (1 + w') eps(x, c) - w' eps(x),
                                i.e. w = 1 + w'
    phi           guidance_rescale (Lin et al. 2023, Sec. 3.4)

The guided model works for epsilon- and v-prediction alike: guidance mixes model outputs.
Schedule symbols (alpha_bar, sigma, SNR) follow the notation block in course_lib/schedules.py.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .samplers import Model  # the samplers' model signature: model(x, t, cond) -> prediction



def _per_sample(scale: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A float stays a float; a (B,) tensor of per-sample scales becomes (B, 1, ..., 1) to broadcast
    (a tensor already of that shape passes through)."""
    if not isinstance(scale, torch.Tensor):
        return float(scale)
    if scale.ndim == 0:
        return float(scale)
    if scale.ndim == like.ndim and scale.shape[0] in (1, like.shape[0]):
        return scale.to(like.device, like.dtype)  # already shaped to broadcast, e.g. (B, 1, 1, 1)
    if scale.ndim != 1 or scale.shape[0] != like.shape[0]:
        raise ValueError(f"a tensor guidance scale must have shape (B,) = ({like.shape[0]},), one scale per "
                         f"sample, got {tuple(scale.shape)}")
    return scale.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


def classifier_free_guidance(pred_uncond: torch.Tensor, pred_cond: torch.Tensor,
                             scale: float | torch.Tensor) -> torch.Tensor:
    """pred_uncond + scale * (pred_cond - pred_uncond): step from the unconditional prediction
    along the direction the prompt adds, `scale` times as far (Ho & Salimans 2022, eq. 6).

    scale 0 is the unconditional model, 1 the conditional one, > 1 extrapolates past it.
    scale may also be a (B,) tensor, one scale per sample: a whole guidance sweep in one batch.
    """
    if pred_uncond.shape != pred_cond.shape:
        raise ValueError(
            f"pred_uncond and pred_cond must have the same shape, got {tuple(pred_uncond.shape)} "
            f"and {tuple(pred_cond.shape)}"
        )
    return pred_uncond + _per_sample(scale, pred_cond) * (pred_cond - pred_uncond)


def rescale_noise_cfg(guided: torch.Tensor, pred_cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, Sec. 3.4): undo the variance that large scales add.

    Per sample, the guided prediction is scaled to the standard deviation of the conditional
    one, then mixed back with the unscaled guided prediction:
        rescaled = guided * std(pred_cond) / std(guided)
        out      = phi * rescaled + (1 - phi) * guided
    phi = guidance_rescale in [0, 1]; the paper suggests 0.7 (with zero-terminal-SNR betas,
    v-prediction and "trailing" timesteps). phi = 0 returns `guided` unchanged.
    """
    if guided.shape != pred_cond.shape:
        raise ValueError(
            f"guided and pred_cond must have the same shape, got {tuple(guided.shape)} and {tuple(pred_cond.shape)}"
        )
    if guided.ndim < 2:
        raise ValueError(f"expected batched predictions of shape (B, ...), got {tuple(guided.shape)}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    dims = list(range(1, guided.ndim))  # every dim but the batch
    std_cond = pred_cond.std(dim=dims, keepdim=True)  # (B, 1, ...)
    std_guided = guided.std(dim=dims, keepdim=True)  # (B, 1, ...)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def _batch_to(emb: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Repeat a batch-1 embedding to `batch` rows; any other mismatch is an error."""
    if emb.shape[0] == batch:
        return emb
    if emb.shape[0] == 1:
        return emb.expand(batch, *emb.shape[1:])
    raise ValueError(f"{name} has batch size {emb.shape[0]} but x has {batch}; give 1 or {batch} rows")


def guided_model(
    model: Model,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float | torch.Tensor,
    guidance_rescale: float = 0.0,
) -> Model:
    """Wrap `model` so that every call returns the classifier-free-guided prediction.

    cond:   the prompt's conditioning, e.g. text embeddings (B, L, D) (or batch 1, repeated)
    uncond: the empty prompt's embedding, or the negative prompt's: guidance then steers away
            from it. Same shape as cond.
    Each call runs ONE batched forward pass on cat([x, x]) with cat([uncond, cond]), as
    StableDiffusionPipeline does, then guides (and rescales if guidance_rescale > 0). With
    guidance_scale == 1 the guided prediction is the conditional one, so the unconditional
    half is skipped and uncond may be None. guidance_scale may be a (B,) tensor: one scale per
    sample (x must then have B rows).
    The returned callable has the sampler signature; its own `cond` argument must be None
    (the conditioning is bound here).
    """
    if not isinstance(cond, torch.Tensor):
        raise ValueError(f"cond must be a tensor (e.g. text embeddings), got {type(cond).__name__}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    if isinstance(guidance_scale, torch.Tensor):
        if guidance_scale.ndim > 1 or guidance_scale.numel() == 0 or not guidance_scale.is_floating_point():
            raise ValueError("a tensor guidance_scale must be a float scalar or a 1-D (B,) float tensor, got "
                             f"shape {tuple(guidance_scale.shape)} dtype {guidance_scale.dtype}")
        if not torch.isfinite(guidance_scale).all():
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale.tolist()}")
        skip_uncond = bool((guidance_scale == 1.0).all())
    else:
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        skip_uncond = guidance_scale == 1.0
    if not skip_uncond:
        if uncond is None:
            raise ValueError("uncond (the empty or negative prompt's embedding) is needed when guidance_scale != 1")
        if uncond.shape[1:] != cond.shape[1:] or uncond.dtype != cond.dtype:
            raise ValueError(
                f"uncond must match cond in shape after the batch dim and in dtype, got {tuple(uncond.shape)} "
                f"{uncond.dtype} vs {tuple(cond.shape)} {cond.dtype}"
            )

    both: dict[int, torch.Tensor] = {}

    def guided(x: torch.Tensor, t: torch.Tensor, unused_cond: Any = None) -> torch.Tensor:
        if unused_cond is not None:
            raise ValueError("this guided model already holds its conditioning; call the sampler with cond=None")
        B = x.shape[0]
        c = _batch_to(cond, B, "cond")
        if skip_uncond:
            return model(x, t, c)
        if B not in both:  # cat([uncond, cond]) once per batch size, not at every step
            both[B] = torch.cat([_batch_to(uncond, B, "uncond"), c])  # (2B, L, D)
        out = model(torch.cat([x, x]), torch.cat([t, t]), both[B])  # (2B, ...)
        pred_uncond, pred_cond = out.chunk(2)  # (B, ...) each
        pred = classifier_free_guidance(pred_uncond, pred_cond, guidance_scale)
        if guidance_rescale > 0:
            pred = rescale_noise_cfg(pred, pred_cond, guidance_rescale)
        return pred

    return guided
