"""Teaching the tiny Stable Diffusion something new (lesson 10): textual inversion, LoRA, DreamBooth.

All three start from a handful of pictures of a concept the models never saw in training (the world keeps
the shapes "heart" and "moon" and the colour "brown" out of every training split, ``data.RESERVED_*``) and
a prompt word that will stand for it. They differ in *what* they train:

=====================  ============================================  ==========================================
method                 trains                                        the prompt word is
=====================  ============================================  ==========================================
textual inversion      one new row of the text tower's embedding     a new token (``"<heart>"``) added to the
(Gal et al. 2022)      table; the U-Net, VAE and text tower frozen    tokeniser, as diffusers'
                                                                      ``load_textual_inversion`` adds it
LoRA (Hu et al. 2021)  low-rank updates ``W + (alpha/r) B A`` of the  a rare identifier (``"sks"``)
                       U-Net's attention projections (peft's layer)
DreamBooth             the whole U-Net, with prior preservation:     a rare identifier (``"sks"``)
(Ruiz et al. 2023)     the model's own pictures of ordinary
                       prompts keep it from forgetting them
=====================  ============================================  ==========================================

The rare identifier: DreamBooth picks a token that the text encoder holds but that means almost nothing
("sks"), so the fine-tuning does not have to unlearn a meaning. The tiny CLIP has one row per word of its
training captions, so any other word, "sks" included, is read as its unknown token (with an
``UnknownWordsWarning``): a row that no training caption ever shaped, the weakest prior there is. (Its
price: after fine-tuning, *every* unknown word, a typo included, reads as the new concept.)

Every method uses the same denoising loss as training the U-Net (``denoising_loss``): noise a latent of one
of the concept's pictures, ask for the noise back, given the caption with the concept's word replaced by the
prompt word. Measured in ``benchmarks/bench_personalize.py``; the shipped results are in ``weights/``
(``ti_*``, ``lora_heart_r*``, ``dreambooth_unet``) with their model cards.

Notation as in ``course_lib/schedules.py``: z0 a scaled latent, t a timestep, eps the noise,
z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import data
from .clip import Tokenizer, UnknownWordsWarning
from .schedules import NoiseSchedule, add_noise

MIN_IMAGES = 3  # fewer pictures than this cannot show what varies and what stays (DreamBooth used 3 to 5)
TRIGGER = "sks"  # DreamBooth's rare identifier
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")  # the attention projections, as diffusers' LoRA scripts pick them


# ==============================================================================================
# The concept's pictures and captions
# ==============================================================================================

def concept_kind(concept: str) -> str:
    """"shape" or "colour": which attribute of the world ``concept`` is a value of (ValueError otherwise)."""
    if concept in data.SHAPES:
        return "shape"
    if concept in data.COLOURS:
        return "colour"
    raise ValueError(f"unknown concept {concept!r}: a concept is one of the world's shapes {data.SHAPES} "
                     f"or colours {data.COLOURS} (the reserved ones: {data.RESERVED_SHAPES + data.RESERVED_COLOURS})")


def concept_scenes(concept: str, n: int = 8, seed: int = 0, split: data.Split = "train") -> data.Scenes:
    """``n`` one-object pictures of ``concept`` (a shape or a colour of the world), everything else drawn as in the
    training world (training colours for a shape, training shapes for a colour). A colour concept is always named
    in the caption. Fewer than ``MIN_IMAGES`` pictures is an error."""
    if not isinstance(n, int) or isinstance(n, bool) or n < MIN_IMAGES:
        raise ValueError(f"teaching a concept needs at least {MIN_IMAGES} pictures of it (got n={n!r}): with fewer, "
                         "nothing tells the concept apart from the one picture's colour, size and place")
    return _scenes_of(concept, n, seed, split)


def _scenes_of(concept: str, n: int, seed: int, split: data.Split) -> data.Scenes:
    kind = concept_kind(concept)
    attrs = data.sample_attributes(n, seed, split, concepts="train", object_counts=(1.0, 0.0, 0.0))
    if kind == "shape":
        attrs["shape"][:, 0] = data.SHAPES.index(concept)
    else:
        attrs["colour"][:, 0] = data.COLOURS.index(concept)
        attrs["mention_u"][:, 0, 0] = 0.0  # always say the colour
    return data.scenes_from_attributes(attrs)


def with_word(captions: Iterable[str], concept: str, word: str) -> list[str]:
    """The captions with the concept's word replaced by ``word`` ("a red heart" -> "a red <heart>"); a caption that
    does not name the concept is an error."""
    concept_kind(concept)
    pattern = re.compile(rf"\b{re.escape(concept)}\b", re.IGNORECASE)
    out = []
    for c in captions:
        if not pattern.search(c):
            raise ValueError(f"the caption {c!r} does not name {concept!r}")
        out.append(pattern.sub(word, c))
    return out


def heldout_prompts(concept: str, n: int = 32, seed: int = 0) -> list[str]:
    """``n`` held-out one-object captions of ``concept`` (the evaluation prompts; the real word, not the trigger)."""
    return _scenes_of(concept, n, seed, "heldout").captions


def ordinary_prompts(n: int = 48, seed: int = 0) -> list[str]:
    """``n`` held-out one-object captions of the training world: what forgetting is measured on."""
    scenes = data.generate(4 * n + 16, seed=seed, split="heldout")
    prompts = [c for c, k in zip(scenes.captions, scenes.n_objects.tolist()) if k == 1][:n]
    if len(prompts) < n:
        raise ValueError(f"could not draw {n} one-object prompts")
    return prompts


# ==============================================================================================
# The loss all three methods share
# ==============================================================================================

def denoising_loss(unet: nn.Module, text_states: torch.Tensor, z0: torch.Tensor, t: torch.Tensor,
                   eps: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """SD's training loss: mean of |eps - eps_theta(z_t, t, text)|^2 with z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps.

    z0, eps: (B, 4, 16, 16) scaled latents and noise; t: (B,) long; text_states: (B, L, width). Textual inversion
    differentiates it with respect to one embedding row (through the text tower), LoRA with respect to the adapters,
    DreamBooth with respect to the whole U-Net."""
    zt = add_noise(z0, eps, t, schedule)
    return F.mse_loss(unet(zt, t, text_states), eps)


@dataclass
class Encoded:
    """Pictures encoded once: their VAE posteriors (a fresh sample every step, as in the U-Net's training) and
    their captions."""

    mean: torch.Tensor  # (N, 4, 16, 16)
    std: torch.Tensor
    scale: float
    captions: list[str]

    @classmethod
    @torch.no_grad()
    def from_images(cls, sd, images: torch.Tensor, captions: list[str]) -> "Encoded":
        """images: (N, 3, 64, 64) in [-1, 1] or uint8; captions: one per picture."""
        if images.dtype == torch.uint8:
            images = data.to_float(images)
        if images.shape[0] != len(captions):
            raise ValueError(f"got {images.shape[0]} pictures but {len(captions)} captions")
        post = sd.vae.encode(images.to(sd.device, sd.dtype))
        return cls(post.mean, post.std, sd.vae.config.scaling_factor, list(captions))

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, idx: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """Scaled latents of the pictures ``idx`` (a fresh posterior sample, drawn on the CPU from ``g``) and their
        captions."""
        mean, std = self.mean[idx.to(self.mean.device)], self.std[idx.to(self.mean.device)]
        z0 = self.scale * (mean + std * torch.randn(mean.shape, generator=g).to(mean))
        return z0, [self.captions[i] for i in idx.tolist()]


# ==============================================================================================
# Textual inversion: a new token
# ==============================================================================================

class ExtendedEmbedding(nn.Module):
    """A token embedding table with new rows after the frozen ones: ids below ``len(base)`` read ``base`` (never
    trained here), ids from ``len(base)`` on read ``new`` (the learnable rows of textual inversion)."""

    def __init__(self, base: nn.Embedding, new: torch.Tensor):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.new = nn.Parameter(new.detach().clone().to(base.weight))  # (k, width)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight, self.new])

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + self.new.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def add_token(sd, token: str, init: str | torch.Tensor | None = None, seed: int = 0) -> int:
    """Add ``token`` to ``sd``'s tokeniser and one embedding row for it to its text tower, in place (as diffusers'
    ``pipe.load_textual_inversion`` does). Returns its id.

    init: a word the tokeniser knows (its embedding is copied, diffusers' ``initializer_token``), a (width,)
    tensor, or None (a random row of the table's typical length). A token the model can already read (a word of
    its training captions, an added token, text made only of known pieces) is an error.
    """
    tok: Tokenizer = sd.tokenizer
    tok.check_new_token(token)
    emb = sd.clip.text.token_embedding
    width = emb.weight.shape[1]
    if isinstance(init, str):
        ids = tok._encode(init)[0][1:-1]  # no unknown-word warning: an unknown word is refused just below
        if len(ids) != 1 or ids[0] == tok.unk_id:
            raise ValueError(f"init must be one word the tokeniser reads as one known token, got {init!r} "
                             f"({len(ids)} tokens)")
        row = emb.weight[ids[0]].detach().clone()
    elif isinstance(init, torch.Tensor):
        if init.shape != (width,):
            raise ValueError(f"an initial embedding must have shape ({width},), got {tuple(init.shape)}")
        row = init.detach().clone()
    elif init is None:
        g = torch.Generator().manual_seed(seed)
        row = torch.randn(width, generator=g) * emb.weight.detach()[4:].norm(dim=1).mean().cpu() / math.sqrt(width)
    else:
        raise ValueError(f"init must be a word, a tensor or None, got {type(init).__name__}")
    row = row.to(emb.weight)[None]
    if isinstance(emb, ExtendedEmbedding):
        with torch.no_grad():
            emb.new = nn.Parameter(torch.cat([emb.new.detach(), row]))
    else:
        sd.clip.text.token_embedding = ExtendedEmbedding(emb, row)
    return tok.add_token(token)


def token_embedding(sd, token: str) -> torch.Tensor:
    """The (width,) embedding row of an added token."""
    if token not in sd.tokenizer.added_tokens:
        raise ValueError(f"{token!r} is not an added token of this pipeline (added: {sorted(sd.tokenizer.added_tokens)})")
    return sd.clip.text.token_embedding.weight[sd.tokenizer.added_tokens[token]]


def textual_inversion_parameters(sd) -> list[nn.Parameter]:
    """The new rows: the only thing textual inversion trains."""
    emb = sd.clip.text.token_embedding
    if not isinstance(emb, ExtendedEmbedding):
        raise ValueError("this pipeline has no added token: call add_token(sd, '<name>') first")
    return [emb.new]


def save_textual_inversion(sd, token: str, path: str | Path) -> Path:
    """Write ``{token: embedding}`` to a safetensors file, the format of diffusers' ``learned_embeds.safetensors``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({token: token_embedding(sd, token).detach().cpu().float().contiguous()}, str(path))
    return path


def load_textual_inversion(sd, state: dict[str, torch.Tensor], token: str | None = None) -> str:
    """Add the token of a textual-inversion file's tensors (``{token: (width,)}``) to ``sd``, in place. ``token``
    renames it. Returns the token."""
    if len(state) != 1:
        raise ValueError(f"a textual-inversion file holds one token, this one {len(state)}: {sorted(state)[:5]}")
    (name, vector), = state.items()
    vector = vector.reshape(-1) if vector.dim() == 2 and vector.shape[0] == 1 else vector
    token = token or name
    add_token(sd, token, init=vector)
    return token


# ==============================================================================================
# LoRA: low-rank adapters on the U-Net's attention projections
# ==============================================================================================

class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B(A(x))``: a frozen linear layer plus a trainable rank-``r`` update (Hu et al. 2021).

    As peft's ``lora.Linear``: A (r, in) starts as ``kaiming_uniform_(a=sqrt(5))`` (nn.Linear's own default), B
    (out, r) starts at zero, so the adapted layer starts equal to the base layer; the scale is ``alpha / r`` with
    ``alpha = r`` by default (diffusers' LoRA training scripts), i.e. 1.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRA adapts an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"the LoRA rank must be a positive integer, got {rank!r}")
        if rank > min(base.in_features, base.out_features):
            raise ValueError(f"rank {rank} is more than this layer's smaller side "
                             f"({base.in_features} -> {base.out_features}): a full-rank update is not low-rank")
        alpha = float(rank if alpha is None else alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.multiplier = 1.0  # the LoRA scale at sampling time (set_lora_scale; diffusers' set_adapters weights)
        w = base.weight
        bound = 1.0 / math.sqrt(base.in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) weight
        a = torch.empty(rank, base.in_features).uniform_(-bound, bound, generator=generator)  # drawn on the CPU
        self.lora_A = nn.Parameter(a.to(w.device, w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * (self.scaling * self.multiplier)

    def delta_weight(self) -> torch.Tensor:
        """The update of the weight, (alpha / r) B A, shape (out, in)."""
        return self.scaling * self.multiplier * self.lora_B @ self.lora_A

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the update folded in (W + (alpha/r) B A): no extra cost at sampling."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        out = out.to(self.base.weight)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.delta_weight())
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out.requires_grad_(False)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, last = name.split(".")
    module = model
    for part in path:
        module = getattr(module, part)
    return module, last


def lora_layers(unet: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA layers of a U-Net, by module name."""
    return {n: m for n, m in unet.named_modules() if isinstance(m, LoRALinear)}


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None, targets: Iterable[str] = LORA_TARGETS,
             seed: int = 0) -> list[str]:
    """Wrap every ``nn.Linear`` of ``unet`` whose name ends in one of ``targets`` in a ``LoRALinear``, in place;
    everything else is frozen. Returns the wrapped names (as ``peft.inject_adapter_in_model`` with
    ``LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)`` picks them)."""
    if lora_layers(unet):
        raise ValueError("this U-Net already has LoRA layers: use a fresh copy, or remove_lora(unet) first")
    targets = tuple(targets)
    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if not names:
        raise ValueError(f"no nn.Linear of this model is named one of {targets}")
    unet.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for name in names:
        parent, last = _parent(unet, name)
        setattr(parent, last, LoRALinear(getattr(parent, last), rank, alpha, generator=g))
    return names


def set_lora_scale(unet: nn.Module, scale: float) -> None:
    """Scale every adapter's update by ``scale`` at sampling time: 0 is the base model, 1 the trained adapters,
    above 1 exaggerates them (diffusers: ``pipe.set_adapters(name, adapter_weights=scale)``)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"the LoRA scale must be a finite number, got {scale!r}")
    layers = lora_layers(unet)
    if not layers:
        raise ValueError("this U-Net has no LoRA layers (add_lora or load_lora first)")
    for layer in layers.values():
        layer.multiplier = float(scale)


def remove_lora(unet: nn.Module, merge: bool = False) -> nn.Module:
    """Put the base layers back (``merge=True``: with the updates folded into them), in place."""
    for name, layer in lora_layers(unet).items():
        parent, last = _parent(unet, name)
        setattr(parent, last, layer.merged() if merge else layer.base)
    return unet


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for layer in lora_layers(unet).values() for p in (layer.lora_A, layer.lora_B)]


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters in the format diffusers' ``load_lora_weights`` reads (peft's names, prefixed ``unet.``):
    ``unet.<diffusers module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r). diffusers' convention is
    a scale of 1 (alpha = r), so the scale alpha / r is folded into B."""
    from .diffusers_weights import unet_key_map

    key_map = unet_key_map(unet.config)
    out = {}
    for name, layer in lora_layers(unet).items():
        if name not in key_map:
            raise ValueError(f"{name} has no diffusers name: only the U-Net's attention projections are mapped")
        prefix = f"unet.{key_map[name]}"
        out[f"{prefix}.lora_A.weight"] = layer.lora_A.detach().float().cpu().contiguous()
        out[f"{prefix}.lora_B.weight"] = (layer.scaling * layer.lora_B).detach().float().cpu().contiguous()
    if not out:
        raise ValueError("this U-Net has no LoRA layers (add_lora first)")
    return out


def load_lora(unet: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Add the adapters of a diffusers-format LoRA state dict (``lora_state_dict``, or a file diffusers wrote for
    this U-Net) to ``unet``, in place. Returns the adapted module names."""
    from .diffusers_weights import invert, unet_key_map

    back = invert(unet_key_map(unet.config))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"unet\.(.+)\.(lora_A|lora_B)\.weight", key)
        if m is None or m.group(1) not in back:
            raise ValueError(f"{key!r} is not a LoRA tensor of this U-Net's attention projections "
                             "(expected unet.<diffusers module>.lora_A.weight / .lora_B.weight)")
        pairs.setdefault(back[m.group(1)], {})[m.group(2)] = value
    if not pairs:
        raise ValueError("the LoRA state dict is empty")
    ranks = {v["lora_A"].shape[0] for v in pairs.values() if "lora_A" in v}
    if any(set(v) != {"lora_A", "lora_B"} for v in pairs.values()) or len(ranks) != 1:
        raise ValueError("every adapted layer needs lora_A and lora_B, all of one rank")
    rank = ranks.pop()
    names = add_lora(unet, rank, targets=tuple({n.split(".")[-1] for n in pairs}))
    extra = sorted(set(names) - set(pairs))
    for name in extra:  # a target name the file does not adapt everywhere: leave those layers as they were
        parent, last = _parent(unet, name)
        setattr(parent, last, getattr(parent, last).base)
    layers = lora_layers(unet)
    with torch.no_grad():
        for name, ab in pairs.items():
            layer = layers[name]
            if ab["lora_A"].shape != layer.lora_A.shape or ab["lora_B"].shape != layer.lora_B.shape:
                raise ValueError(f"{name}: the file's shapes {tuple(ab['lora_A'].shape)}, {tuple(ab['lora_B'].shape)} "
                                 f"do not fit the layer ({tuple(layer.lora_A.shape)}, {tuple(layer.lora_B.shape)})")
            layer.lora_A.copy_(ab["lora_A"])
            layer.lora_B.copy_(ab["lora_B"])
    return sorted(pairs)


def count_parameters(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


# ==============================================================================================
# The fine-tuning loop all three use
# ==============================================================================================

@dataclass
class FitResult:
    losses: list[float]
    seconds: float
    trainable: int  # trainable parameters
    prior_losses: list[float] = field(default_factory=list)


def fit(sd, params: list[nn.Parameter], instance: Encoded, steps: int, lr: float, batch_size: int = 8,
        prior: Encoded | None = None, prior_weight: float = 1.0, seed: int = 0, weight_decay: float = 0.0,
        callback: Callable[[int, float], None] | None = None) -> FitResult:
    """``steps`` AdamW steps on ``params`` of the denoising loss of ``instance`` (pictures and captions with the
    prompt word); with ``prior`` (DreamBooth's prior preservation) each step adds ``prior_weight`` times the same
    loss on a batch of the prior pictures. The text states are computed every step, through the text tower, so
    that textual inversion's gradient reaches its embedding row. callback(step, loss) runs after every step."""
    if not params:
        raise ValueError("nothing to train: params is empty")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if len(instance) < MIN_IMAGES:
        raise ValueError(f"teaching a concept needs at least {MIN_IMAGES} pictures of it, got {len(instance)}")
    started = time.time()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sd.unet.train()
    losses, prior_losses = [], []
    schedule = sd.schedule
    device = sd.device
    try:
        for step in range(steps):
            idx = torch.randint(0, len(instance), (batch_size,), generator=g)
            z0, captions = instance.batch(idx, g)
            if prior is not None:
                pidx = torch.randint(0, len(prior), (batch_size,), generator=g)
                pz0, pcaps = prior.batch(pidx, g)
                z0, captions = torch.cat([z0, pz0]), captions + pcaps
            t = torch.randint(0, schedule.num_train_timesteps, (z0.shape[0],), generator=g).to(device)
            eps = torch.randn(z0.shape, generator=g).to(z0)  # noise drawn on the CPU: the same on every device
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UnknownWordsWarning)  # the rare identifier is unknown on purpose
                ids = sd.tokenizer(captions).to(device)
            states = sd.clip.text(ids).last_hidden_state
            if prior is None:
                loss = denoising_loss(sd.unet, states, z0, t, eps, schedule)
            else:
                b = batch_size
                zt = add_noise(z0, eps, t, schedule)
                per = (sd.unet(zt, t, states) - eps).pow(2).mean(dim=(1, 2, 3))
                loss = per[:b].mean() + prior_weight * per[b:].mean()
                prior_losses.append(per[b:].mean().item())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            if callback is not None:
                callback(step, losses[-1])
    finally:
        sd.unet.eval()  # the pipeline samples in eval mode
    return FitResult(losses, time.time() - started, count_parameters(params), prior_losses)


# ==============================================================================================
# The three methods
# ==============================================================================================

def textual_inversion(sd, scenes: data.Scenes, concept: str, token: str = "<new>", init: str | None = None,
                      steps: int = 300, lr: float = 5e-2, batch_size: int = 8, seed: int = 0,
                      callback=None) -> FitResult:
    """Learn one embedding row for ``token`` from ``scenes`` (pictures of ``concept``); everything else frozen.
    ``sd`` keeps the token (and the learned row) afterwards."""
    sd.unet.requires_grad_(False)
    sd.clip.requires_grad_(False)
    add_token(sd, token, init=init, seed=seed)
    instance = Encoded.from_images(sd, scenes.images, with_word(scenes.captions, concept, token))
    return fit(sd, textual_inversion_parameters(sd), instance, steps, lr, batch_size, seed=seed, callback=callback)


def lora(sd, scenes: data.Scenes, concept: str, rank: int = 4, trigger: str = TRIGGER, steps: int = 300,
         lr: float = 1e-3, batch_size: int = 8, seed: int = 0, prior: Encoded | None = None, prior_weight: float = 1.0,
         callback=None) -> FitResult:
    """Train LoRA adapters of ``rank`` on ``sd.unet``'s attention projections (added in place) so that ``trigger``
    draws ``concept``; with ``prior``, with DreamBooth's prior preservation (diffusers' ``train_dreambooth_lora.py``
    offers the same)."""
    sd.clip.requires_grad_(False)
    add_lora(sd.unet, rank, seed=seed)
    instance = Encoded.from_images(sd, scenes.images, with_word(scenes.captions, concept, trigger))
    return fit(sd, lora_parameters(sd.unet), instance, steps, lr, batch_size, prior=prior, prior_weight=prior_weight,
               seed=seed, callback=callback)


@torch.no_grad()
def prior_pictures(sd, n: int = 64, seed: int = 1, num_steps: int = 20, guidance_scale: float = 5.0,
                   batch: int = 32) -> tuple[torch.Tensor, list[str]]:
    """DreamBooth's class pictures: the frozen model's own samples of ``n`` ordinary training-world captions
    (the class of a new shape is "an object of this world"). Returns (images in [-1, 1], captions)."""
    scenes = data.generate(n, seed=seed, split="train")
    images = torch.cat([sd.generate(scenes.captions[i:i + batch], num_steps=num_steps, guidance_scale=guidance_scale,
                                    generator=torch.Generator().manual_seed(seed * 1000 + i))
                        for i in range(0, n, batch)])
    return images, scenes.captions


def dreambooth(sd, scenes: data.Scenes, concept: str, trigger: str = TRIGGER, prior: Encoded | None = None,
               prior_weight: float = 1.0, steps: int = 300, lr: float = 2e-4, batch_size: int = 8, seed: int = 0,
               callback=None) -> FitResult:
    """Fine-tune all of ``sd.unet`` (in place) so that ``trigger`` draws ``concept``; with ``prior``
    (``Encoded`` of ``prior_pictures``), each step also fits the model's own pictures of ordinary prompts."""
    sd.clip.requires_grad_(False)
    sd.unet.requires_grad_(True)
    instance = Encoded.from_images(sd, scenes.images, with_word(scenes.captions, concept, trigger))
    params = [p for p in sd.unet.parameters() if p.requires_grad]
    result = fit(sd, params, instance, steps, lr, batch_size, prior=prior, prior_weight=prior_weight, seed=seed,
                 callback=callback)
    sd.unet.requires_grad_(False)
    return result


# ==============================================================================================
# Measuring
# ==============================================================================================

@torch.no_grad()
def concept_adherence(sd, evaluator, concept: str, word: str, n: int = 32, seed: int = 0, num_steps: int = 20,
                      guidance_scale: float = 5.0) -> dict:
    """Generate ``n`` held-out prompts of ``concept`` written with ``word`` and score the pictures against the
    same prompts with the concept's real word: ``adherence`` (every named attribute right), ``concept`` (the
    share whose object has the concept: shape or colour), ``per_attribute``."""
    from .evaluator import prompt_adherence

    truth = heldout_prompts(concept, n, seed)
    prompts = with_word(truth, concept, word)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownWordsWarning)
        images = sd.generate(prompts, num_steps=num_steps, guidance_scale=guidance_scale,
                             generator=torch.Generator().manual_seed(seed))
    result = prompt_adherence(images, truth, evaluator)
    return {"adherence": result["adherence"], "concept": result["per_attribute"][concept_kind(concept)],
            "per_attribute": result["per_attribute"], "n": n, "images": images, "prompts": prompts}


@torch.no_grad()
def ordinary_adherence(sd, evaluator, n: int = 48, seed: int = 0, num_steps: int = 20,
                       guidance_scale: float = 5.0) -> dict:
    """Prompt adherence on ``n`` ordinary held-out one-object prompts: what forgetting lowers."""
    from .evaluator import prompt_adherence

    prompts = ordinary_prompts(n, seed)
    images = sd.generate(prompts, num_steps=num_steps, guidance_scale=guidance_scale,
                         generator=torch.Generator().manual_seed(seed))
    result = prompt_adherence(images, prompts, evaluator)
    return {"adherence": result["adherence"], "per_attribute": result["per_attribute"], "n": n, "images": images,
            "prompts": prompts}


# ==============================================================================================
# The shipped adapters: trained by `python -m course_lib.train --only personalize`
# ==============================================================================================

@dataclass
class PersonalizeTraining:
    """The full runs whose results ship in ``weights/`` (the lesson runs shorter ones live)."""

    n_images: int = 8  # pictures of the new concept (DreamBooth's paper: 3 to 5 of a subject)
    data_seed: int = 0
    batch_size: int = 8
    ti_concepts: tuple = ("heart", "brown", "triangle")  # two never seen, one the U-Net draws well (the control)
    ti_init: tuple = ("circle", "orange", "circle")  # each token starts as this word's embedding
    ti_steps: int = 600
    ti_lr: float = 5e-2
    lora_concept: str = "heart"
    lora_ranks: tuple = (1, 2, 4, 8, 16)
    lora_steps: int = 600
    lora_lr: float = 1e-3
    lora_prior_rank: int = 4  # this rank is also trained with prior preservation (lora_<concept>_r<rank>_prior)
    db_steps: int = 600
    db_lr: float = 2e-4
    prior_images: int = 64  # the model's own pictures of ordinary prompts (prior preservation)
    prior_weight: float = 1.0  # DreamBooth's lambda
    eval_prompts: int = 64  # held-out prompts of the concept, written with the token, for the cards
    eval_ordinary: int = 96  # ordinary held-out one-object prompts: forgetting
    seed: int = 0


def quick_personalize() -> PersonalizeTraining:
    """A seconds-long run of every method (``python -m course_lib.train --quick``): it checks the command works."""
    return PersonalizeTraining(n_images=3, batch_size=2, ti_concepts=("heart",), ti_init=("circle",), ti_steps=2,
                               lora_ranks=(1,), lora_steps=2, db_steps=2, prior_images=2, eval_prompts=2,
                               eval_ordinary=2)


def lora_name(concept: str, rank: int) -> str:
    return f"lora_{concept}_r{rank}"


def load_textual_inversion_file(sd, name: str = "ti_heart", weights_dir=None, token: str | None = None) -> str:
    """Add a shipped textual-inversion token (``weights/<name>.safetensors``, checksum checked) to ``sd``; returns
    the token."""
    from .weights import read_tensors

    return load_textual_inversion(sd, read_tensors(name, weights_dir), token)


def load_lora_file(unet: nn.Module, name: str = "lora_heart_r4", weights_dir=None) -> list[str]:
    """Add a shipped LoRA (``weights/<name>.safetensors``, diffusers' format, checksum checked) to ``unet``."""
    from .weights import read_tensors

    return load_lora(unet, read_tensors(name, weights_dir))


def load_dreambooth_unet(weights_dir=None, device=None, dtype=None):
    """The U-Net DreamBooth fine-tuned with prior preservation (``weights/dreambooth_unet.*``, stored in float16)."""
    from .unet import UNet, UNetConfig
    from .weights import load_model

    return load_model("dreambooth_unet", UNetConfig, UNet, weights_dir, device, dtype)


def measure(sd, evaluator, concept: str, word: str, n: int = 64, n_ordinary: int = 96, seed: int = 0) -> dict:
    """What an adapter buys and costs: ``concept_adherence`` of ``n`` held-out prompts of ``concept`` written with
    ``word`` (and ``concept_read``, the share read as the concept) and ``ordinary_adherence`` of ``n_ordinary``
    ordinary prompts (forgetting), DDIM 20 steps, guidance 5. The model cards and bench_personalize.py use it."""
    c = concept_adherence(sd, evaluator, concept, word, n=n, seed=seed)
    o = ordinary_adherence(sd, evaluator, n=n_ordinary, seed=seed)
    return {"concept_adherence": c["adherence"], "concept_read": c["concept"],
            "per_attribute": c["per_attribute"], "ordinary_adherence": o["adherence"],
            "n_concept_prompts": c["n"], "n_ordinary_prompts": o["n"], "ddim_steps": 20, "guidance": 5.0}


def train_adapters(load_sd: Callable[[], object], evaluator, out_dir, tc: PersonalizeTraining | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """Train and write every shipped adapter: ``ti_<concept>``, ``lora_<concept>_r<rank>``, ``dreambooth_unet``
    (with prior preservation; the run without is measured for its card). ``load_sd()`` gives a fresh pipeline of
    the shipped models. Returns the measurements, also written into the cards."""
    from .weights import library_versions, save_model, save_tensors

    tc = tc or PersonalizeTraining()
    results: dict = {}
    base = load_sd()
    before = ordinary_adherence(base, evaluator, n=tc.eval_ordinary)["adherence"]
    common = {"data_seed": tc.data_seed, "n_images": tc.n_images, "batch_size": tc.batch_size,
              "ordinary_adherence_before": before, "device": "cpu", "torch_threads": torch.get_num_threads(),
              "versions": library_versions()}

    for concept, init in zip(tc.ti_concepts, tc.ti_init):
        sd = load_sd()
        token = f"<{concept}>"
        scenes = concept_scenes(concept, tc.n_images, tc.data_seed)
        r = textual_inversion(sd, scenes, concept, token, init, tc.ti_steps, tc.ti_lr, tc.batch_size, tc.seed)
        m = measure(sd, evaluator, concept, token, tc.eval_prompts, tc.eval_ordinary)
        m["word_adherence_before"] = concept_adherence(base, evaluator, concept, concept, n=tc.eval_prompts)["adherence"]
        results[f"ti_{concept}"] = m | {"seconds": r.seconds, "trainable": r.trainable}
        save_tensors({token: token_embedding(sd, token)}, f"ti_{concept}",
                     {"method": "textual_inversion", "token": token, "concept": concept, "init": init},
                     {**common, "steps": tc.ti_steps, "lr": tc.ti_lr, "wall_time_s": round(r.seconds, 1),
                      "loss": _loss_summary(r.losses), "metrics": m,
                      "format": "diffusers' learned_embeds.safetensors: {token: (width,)}"}, out_dir)
        log(f"ti_{concept}: {r.seconds:.0f}s, concept adherence {m['concept_adherence']:.2f}")

    scenes = concept_scenes(tc.lora_concept, tc.n_images, tc.data_seed)
    sd = load_sd()
    images, captions = prior_pictures(sd, tc.prior_images)
    prior = Encoded.from_images(sd, images, captions)
    runs = [(rank, False) for rank in tc.lora_ranks] + [(tc.lora_prior_rank, True)]
    for rank, with_prior in runs:
        sd = load_sd()
        r = lora(sd, scenes, tc.lora_concept, rank, TRIGGER, tc.lora_steps, tc.lora_lr, tc.batch_size, tc.seed,
                 prior=prior if with_prior else None, prior_weight=tc.prior_weight)
        m = measure(sd, evaluator, tc.lora_concept, TRIGGER, tc.eval_prompts, tc.eval_ordinary)
        name = lora_name(tc.lora_concept, rank) + ("_prior" if with_prior else "")
        results[name] = m | {"seconds": r.seconds, "trainable": r.trainable}
        save_tensors(lora_state_dict(sd.unet), name,
                     {"method": "lora", "rank": rank, "alpha": rank, "targets": list(LORA_TARGETS),
                      "concept": tc.lora_concept, "trigger": TRIGGER, "prior_preservation": with_prior},
                     {**common, "steps": tc.lora_steps, "lr": tc.lora_lr, "wall_time_s": round(r.seconds, 1),
                      "loss": _loss_summary(r.losses), "metrics": m,
                      **({"prior_images": tc.prior_images, "prior_weight": tc.prior_weight} if with_prior else {}),
                      "format": "diffusers' LoRA format (peft names, prefix unet.): "
                                "pipe.load_lora_weights(folder, weight_name=file)"}, out_dir)
        log(f"{name}: {r.seconds:.0f}s, concept adherence {m['concept_adherence']:.2f}, "
            f"ordinary {m['ordinary_adherence']:.2f} (before {before:.2f})")
    for with_prior in (False, True):
        sd = load_sd()
        r = dreambooth(sd, scenes, tc.lora_concept, TRIGGER, prior if with_prior else None, tc.prior_weight,
                       tc.db_steps, tc.db_lr, tc.batch_size, tc.seed)
        m = measure(sd, evaluator, tc.lora_concept, TRIGGER, tc.eval_prompts, tc.eval_ordinary)
        key = "dreambooth_prior" if with_prior else "dreambooth_no_prior"
        results[key] = m | {"seconds": r.seconds, "trainable": r.trainable}
        log(f"{key}: {r.seconds:.0f}s, concept adherence {m['concept_adherence']:.2f}, "
            f"ordinary {m['ordinary_adherence']:.2f} (before {before:.2f})")
        if with_prior:
            save_model(sd.unet, "dreambooth_unet", sd.unet.config,
                       {**common, "method": "dreambooth", "concept": tc.lora_concept, "trigger": TRIGGER,
                        "steps": tc.db_steps, "lr": tc.db_lr, "prior_images": tc.prior_images,
                        "prior_weight": tc.prior_weight, "wall_time_s": round(r.seconds, 1),
                        "loss": _loss_summary(r.losses), "metrics": m,
                        "without_prior_preservation": results["dreambooth_no_prior"],
                        "stored_as": "float16 (loads as float32): the full U-Net, fine-tuned"},
                       out_dir, dtype=torch.float16)
    return results


def _loss_summary(values: list[float]) -> dict:
    """The model card's loss summary, as the other models' cards have it (``train.LossLog.summary``)."""
    from .train import LossLog

    log = LossLog()
    log.values = [float(v) for v in values]
    return log.summary()
