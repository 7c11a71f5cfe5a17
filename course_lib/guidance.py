"""Classifier-free guidance, negative prompts and guidance rescale, as small named units.

Lesson 4 ("classifier-free guidance") teaches them; tests/test_guidance.py proves them equal to
StableDiffusionPipeline's guidance step, to diffusers' `rescale_noise_cfg` and to ComfyUI's
`RescaleCFG` node (guidance rescale done in v-space for an epsilon model).

Notation (code name -> paper symbol):
    pred_uncond   eps(x_t)      the prediction without the prompt (empty or negative prompt)
    pred_cond     eps(x_t, c)   the prediction with the prompt c
    scale         w             guidance scale in SD's convention: w = 1 is no guidance;
                                Ho & Salimans 2022 (eq. 6) write (1 + w') eps(x, c) - w' eps(x),
                                i.e. w = 1 + w'
    phi           guidance_rescale (Lin et al. 2023, Sec. 3.4)
    x_t           x_t           the noisy sample the predictions were made at
    alpha_bar     alpha_bar_t   the schedule's signal fraction at t: x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps
    v             v             sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022, Sec. 4)

The guided model works for epsilon- and v-prediction alike: guidance mixes model outputs.
Schedule symbols (alpha_bar, sigma, SNR) follow the notation block in course_lib/schedules.py.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from .samplers import Model  # the samplers' model signature: model(x, t, cond) -> prediction
from .schedules import NoiseSchedule, alpha_bar_at

RescaleSpace = Literal["prediction", "v"]
RESCALE_SPACES: tuple[str, ...] = ("prediction", "v")


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
    It rescales whatever the model predicts, as diffusers' `rescale_noise_cfg` does (eps for SD 1.5): Lin et
    al. define it on v, and for an epsilon model `rescale_cfg_in_v_space` does it there.
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


def _alpha_bar_like(alpha_bar: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """alpha_bar as a float or broadcastable (B, 1, ..., 1) tensor, checked to lie in (0, 1]."""
    if isinstance(alpha_bar, torch.Tensor) and alpha_bar.ndim > 0 and not (
            alpha_bar.ndim == 1 and alpha_bar.shape[0] == like.shape[0]
            or alpha_bar.ndim == like.ndim and alpha_bar.shape[0] in (1, like.shape[0])
            and all(n == 1 for n in alpha_bar.shape[1:])):
        raise ValueError(f"alpha_bar must be a number, a (B,) = ({like.shape[0]},) tensor with one value per sample "
                         f"or shaped (B, 1, ..., 1), got shape {tuple(alpha_bar.shape)}")
    ab = _per_sample(alpha_bar, like)
    low = ab.min().item() if isinstance(ab, torch.Tensor) else ab
    high = ab.max().item() if isinstance(ab, torch.Tensor) else ab
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(
            f"alpha_bar must lie in (0, 1], got values from {low} to {high}; at alpha_bar = 0 (zero terminal SNR) "
            "an epsilon prediction says nothing about x0 and has no v: use a v-prediction model there"
        )
    return ab


def eps_to_v(eps: torch.Tensor, x_t: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """An epsilon prediction at x_t as the v it implies: v = (eps - sqrt(1 - alpha_bar) x_t) / sqrt(alpha_bar).

    This is v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 with x0 = (x_t - sqrt(1 - alpha_bar) eps) /
    sqrt(alpha_bar) put in. alpha_bar: a float, a (B,) tensor (one per sample) or a tensor of shape (B, 1, ..., 1).
    """
    if eps.shape != x_t.shape:
        raise ValueError(f"eps and x_t must have the same shape, got {tuple(eps.shape)} and {tuple(x_t.shape)}")
    ab = _alpha_bar_like(alpha_bar, x_t)
    return (eps - (1 - ab) ** 0.5 * x_t) / ab**0.5


def v_to_eps(v: torch.Tensor, x_t: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """The inverse of `eps_to_v`: eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t (the samplers' Denoiser
    turns a v-prediction model's output into eps the same way)."""
    if v.shape != x_t.shape:
        raise ValueError(f"v and x_t must have the same shape, got {tuple(v.shape)} and {tuple(x_t.shape)}")
    ab = _alpha_bar_like(alpha_bar, x_t)
    return ab**0.5 * v + (1 - ab) ** 0.5 * x_t


def rescale_cfg_in_v_space(guided: torch.Tensor, pred_cond: torch.Tensor, x_t: torch.Tensor,
                           alpha_bar: float | torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale for an EPSILON-prediction model, done in v-space where Lin et al. (2023) define it.

    guided, pred_cond: the guided and the conditional epsilon predictions at x_t (B, ...); alpha_bar at each
    sample's timestep (a float, a (B,) tensor or (B, 1, ..., 1)). Both predictions become v (`eps_to_v`), the
    guided v gets the conditional v's standard deviation per sample and is mixed with phi (`rescale_noise_cfg`),
    and the result goes back to epsilon. Guiding in v gives the same v as converting the guided eps (the map is
    affine, the same for both branches, and the guidance weights sum to 1), so only the rescale differs.

    Why it matters: at high noise an eps prediction is mostly x_t itself (eps ~ x_t when alpha_bar ~ 0), so its
    standard deviation is about 1 whatever the image, and rescaling it (diffusers' `guidance_rescale` on SD 1.5)
    hardly changes anything; v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 is then mostly -x0, so its
    standard deviation measures the spread of the image the model is heading for, which is what high scales
    inflate. ComfyUI's `RescaleCFG` node does this conversion for every model ("rescale cfg has to be done on
    v-pred model output"), in k-diffusion's variables; tests/test_guidance.py checks the two agree.
    For a v-prediction model, call `rescale_noise_cfg` on its output directly.
    """
    if not (guided.shape == pred_cond.shape == x_t.shape):
        raise ValueError(f"guided, pred_cond and x_t must have the same shape, got {tuple(guided.shape)}, "
                         f"{tuple(pred_cond.shape)} and {tuple(x_t.shape)}")
    v_guided, v_cond = eps_to_v(guided, x_t, alpha_bar), eps_to_v(pred_cond, x_t, alpha_bar)
    return v_to_eps(rescale_noise_cfg(v_guided, v_cond, guidance_rescale), x_t, alpha_bar)


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
    *,
    rescale_space: RescaleSpace = "prediction",
    schedule: NoiseSchedule | None = None,
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
    rescale_space: where guidance_rescale acts. "prediction" rescales the model's output itself, as
            diffusers does; "v" is for an epsilon-prediction model: it rescales in v-space
            (`rescale_cfg_in_v_space`, ComfyUI's RescaleCFG) and needs the model's `schedule` to know
            alpha_bar at each call's t. (For a v-prediction model, "prediction" already is v-space.)
    The returned callable has the sampler signature; its own `cond` argument must be None
    (the conditioning is bound here).
    """
    if not isinstance(cond, torch.Tensor):
        raise ValueError(f"cond must be a tensor (e.g. text embeddings), got {type(cond).__name__}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    if rescale_space not in RESCALE_SPACES:
        raise ValueError(f"unknown rescale_space {rescale_space!r}; choose one of {RESCALE_SPACES}")
    if rescale_space == "v" and not isinstance(schedule, NoiseSchedule):
        raise ValueError('rescale_space="v" needs the noise schedule (schedule=sd.schedule) to convert eps to v')
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
        if guidance_rescale > 0 and rescale_space == "v":
            alpha_bar = alpha_bar_at(schedule, t).to(x.dtype)  # (B,) at each sample's timestep
            pred = rescale_cfg_in_v_space(pred, pred_cond, x, alpha_bar, guidance_rescale)
        elif guidance_rescale > 0:
            pred = rescale_noise_cfg(pred, pred_cond, guidance_rescale)
        return pred

    return guided
