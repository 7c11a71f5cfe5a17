"""Prompt-to-prompt: edit a generated image by changing a word of its prompt. Lesson 9 (editing) teaches it.

Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention Control" (arXiv:2208.01626).
Regenerating from the same noise with "a blue circle ..." instead of "a red circle ..." often moves, resizes or
reshapes the object as well: the layout of an image is decided in the first denoising steps, by *where* each
pixel looks in the prompt, i.e. by the cross-attention probabilities M = softmax(Q K^T / sqrt(d)) (Sec. 3.1).
Prompt-to-prompt runs the source prompt P and the target prompt P* side by side from the same noise and, for
the first ``cross_replace`` fraction of the steps, gives the target the source's maps (Sec. 3.2, word swap):

    Edit(M_t, M*_t, t) = M_t   if t > tau   (the first steps)      else M*_t
    out* = Edit(...) V*        (the values V* still come from the target prompt's tokens: "blue" paints blue)

at every cross-attention layer of the U-Net; afterwards the target runs on its own. Optionally the target's
self-attention probabilities are replaced too for the first ``self_replace`` fraction of the steps (the
paper's code calls it ``self_replace_steps``), which pins the layout further.

Where the two prompts tokenise to different lengths ("red" is one token, "cyan" two), the maps are moved
along a word alignment, as the paper's ``seq_aligner.get_replacement_mapper`` does: both prompts must have the
same number of words; a token of an unchanged word takes the map of the same token in the source; the tokens
of a swapped word share the source word's attention equally. ``token_mapper`` builds that (L, L) matrix.

Classifier-free guidance: the batch the U-Net sees is [uncond (sources, targets), cond (sources, targets)].
The authors' code (and diffusers' community ``pipeline_prompt_to_prompt.py``, which copies its
``AttentionControl``) edits only the conditional half (``attn[h // 2:] = self.forward(attn[h // 2:], ...)``);
``halves="both"`` edits the unconditional half as well (its prompt is "" for both, so there the source's maps
are already the right tokens; they differ only because the two latents differ). In diffusers the hook is an
attention processor (``diffusers.models.attention_processor.AttnProcessor``) that computes
``get_attention_scores`` and hands them to the controller; here it is ``attention.AttentionStore``'s
``record``, which may return replacement probabilities (``AttentionEdit``).

Measured (benchmarks/bench_prompt_to_prompt.py: 48 held-out one- and two-object scenes, colour, shape and size
swaps, DDIM 20, guidance 5; the evaluator reads source and target): on the tiny SD prompt-to-prompt keeps the
layout better than regenerating from the same noise, but less than the paper shows on SD. Object-mask IoU between
source and target rises from 0.51 (regenerating) to 0.60 (cross_replace 1), Canny edge F1 from 0.61 to 0.70, and
with self-attention replaced for the first 80% of the steps too, to 0.68 and 0.79; the source's other attributes
read the same in 70% of checks regenerating, 73-75% with cross-attention replaced, 80-83% with self-attention as
well. The price is edit success: 79% of targets show the new value regenerating, 65-71% with cross_replace >= 0.4,
so the share of edits that both took and kept everything else stays at 35-42% in every setting (42% regenerating,
42% with cross 0.8 + self 0.4 or 0.8).
Why less than on SD: 57% of this model's cross-attention mass goes to the end and padding tokens (the conditional
half, averaged over layers, heads, pixels and 20 steps of 24 of the benchmark's source prompts; 4% to the start
token), and the text tower is causal, so the hidden states (the values V*) of every token after the swapped word,
padding included, change with it: the maps say *where* to look, but what is read there still carries the whole new
prompt. (SD 1.5 puts most of its attention on the start token, which no word changes; Chefer et al. 2023,
Attend-and-Excite, leave it out of their maps for that reason.) Checked on the benchmark's 48 edits at
cross_replace 0.8: giving the target the source's hidden states at every token the swap leaves unchanged raises
mask IoU from 0.59 to 0.69 and edge F1 from 0.69 to 0.80, but edit success falls from 69% to 56%: the later
tokens carry the new word as well as the layout change. Editing both halves of guidance instead of the
conditional one changes little (cross 0.8: mask IoU 0.58 vs 0.59, edit success 69% either way).

Shapes (tiny SD: 16 x 16 latents, attention at 8 x 8 and 4 x 4, 4 heads, 48 text tokens)::

    B       edits in the batch (pairs of prompts)       L    text tokens (context length, 48)
    heads   attention heads (4)                          HW   query pixels of a layer (64 or 16)
    cross-attention probabilities  (2 * 2B, heads, HW, L)  [uncond src, uncond tgt, cond src, cond tgt]
    self-attention probabilities   (2 * 2B, heads, HW, HW)
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Literal

import torch

from .attention import Attention, AttentionStore
from .guidance import guided_model
from .samplers import sample
from .tiny_sd import DEFAULT_GUIDANCE, TinySD

Halves = Literal["cond", "both"]
HALVES = ("cond", "both")


def word_tokens(tokenizer, prompt: str) -> list[list[int]]:
    """The token ids of each whitespace-separated word of ``prompt`` (a word may be several BPE tokens:
    "cyan" is two in the course's table)."""
    return [tokenizer.encode(w)[1:-1] for w in prompt.split()]  # drop start and end


def _check_prompts(source: str, target: str) -> None:
    for name, p in (("source_prompt", source), ("target_prompt", target)):
        if not isinstance(p, str):
            raise ValueError(f"{name} must be a string, got {type(p).__name__}")
        if not p.strip():
            raise ValueError(f"{name} is empty: prompt-to-prompt edits a described image; give both prompts words")


def token_mapper(tokenizer, source_prompt: str, target_prompt: str) -> torch.Tensor:
    """(L, L) matrix A with target_probs = source_probs @ A, over the tokenizer's context length L.

    Unchanged words map token to token; a swapped word's target tokens share its source tokens' attention
    equally (``seq_aligner.get_replacement_mapper`` in the paper's code). The start token, the end token and
    the padding follow in order. The prompts must have the same number of words (word swap): otherwise a
    ValueError names the words that differ. When every swapped word keeps its token count, A is the identity
    and the target sees exactly the source's maps.
    """
    _check_prompts(source_prompt, target_prompt)
    ws, wt = source_prompt.split(), target_prompt.split()
    if len(ws) != len(wt):
        diff = [d for d in difflib.ndiff(ws, wt) if d[0] in "+-"]
        raise ValueError(f"prompt-to-prompt's word swap needs prompts with the same number of words; "
                         f"{len(ws)} vs {len(wt)} words, differing in {' '.join(diff)!r}. Swap word for word "
                         f"(e.g. 'red' -> 'blue'); adding or removing words is the paper's refinement edit, not "
                         f"supported here")
    L = tokenizer.context_length
    toks_s, toks_t = word_tokens(tokenizer, source_prompt), word_tokens(tokenizer, target_prompt)
    mapper = torch.zeros(L, L)  # (source token, target token)
    i = j = 1  # after the start token
    mapper[0, 0] = 1.0
    for a, b in zip(toks_s, toks_t):
        if i + len(a) > L - 1 or j + len(b) > L - 1:
            break  # the prompt is cut at the context length
        if len(a) == len(b):
            for k in range(len(a)):
                mapper[i + k, j + k] = 1.0
        else:
            mapper[i:i + len(a), j:j + len(b)] = 1.0 / len(b)  # the word's attention, shared equally
        i, j = i + len(a), j + len(b)
    while i < L and j < L:  # end token, then padding, in order
        mapper[i, j] = 1.0
        i, j = i + 1, j + 1
    return mapper


class AttentionEdit(AttentionStore):
    """Replaces the target rows' attention probabilities by the source rows' for the first steps.

    Attach it to the U-Net (``with AttentionEdit(...)``) and set ``step`` before each U-Net call (``edit`` does).
    The batch holds the sources then the targets, for each half of classifier-free guidance. ``mappers``:
    (B, L, L) from ``token_mapper``. ``cross_steps`` / ``self_steps``: the number of first steps whose cross- /
    self-attention is replaced. ``capture``: keep the conditional half's cross-attention probabilities after the
    edit, per layer and step, in ``maps`` (name -> list of (2B, heads, HW, L): sources then targets).
    """

    def __init__(self, unet, mappers: torch.Tensor, cross_steps: int, self_steps: int = 0,
                 halves: Halves = "cond", capture: bool = False):
        super().__init__(unet, kind="all" if self_steps > 0 else "cross")
        if halves not in HALVES:
            raise ValueError(f"halves must be one of {HALVES}, got {halves!r}")
        self.mappers, self.cross_steps, self.self_steps = mappers, cross_steps, self_steps
        self.halves, self.capture = halves, capture
        self.step = 0

    def _pairs(self, rows: int) -> list[tuple[slice, slice]]:
        """(source rows, target rows) of each guidance half that is edited."""
        b = self.mappers.shape[0]
        if rows == 2 * b:  # guidance off: one half
            return [(slice(0, b), slice(b, 2 * b))]
        if rows != 4 * b:
            raise ValueError(f"expected a batch of {2 * b} or {4 * b} rows (sources and targets), got {rows}")
        cond = (slice(2 * b, 3 * b), slice(3 * b, 4 * b))
        return [cond] if self.halves == "cond" else [(slice(0, b), slice(b, 2 * b)), cond]

    def record(self, module: Attention, probs: torch.Tensor) -> torch.Tensor | None:
        edit_now = self.step < (self.cross_steps if module.is_cross else self.self_steps)
        out = probs
        if edit_now:
            out = probs.clone()
            for src, tgt in self._pairs(probs.shape[0]):
                if module.is_cross:  # (B, heads, HW, L) @ (B, 1, L, L): move each token's map to its target token
                    moved = probs[src] @ self.mappers[:, None].to(probs)
                    out[tgt] = moved / moved.sum(-1, keepdim=True).clamp_min(1e-12)
                else:
                    out[tgt] = probs[src]
        if self.capture and module.is_cross:
            b = self.mappers.shape[0]
            self.maps.setdefault(module.name, []).append(out[-2 * b:].detach().float().cpu())
        return out if edit_now else None


@dataclass
class EditResult:
    """What ``edit`` returns. Images (B, 3, 64, 64) in [-1, 1]; latents (B, 4, 16, 16)."""

    source: torch.Tensor
    target: torch.Tensor
    source_latents: torch.Tensor
    target_latents: torch.Tensor
    # layer name -> per step (2B, heads, HW, L): the conditional cross-attention, sources then targets
    maps: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def _fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} is a fraction of the steps and must lie in [0, 1], got {value!r}")
    return float(value)


@torch.no_grad()
def edit(sd: TinySD, source_prompt: str | list[str], target_prompt: str | list[str], noise: torch.Tensor,
         num_steps: int = 20, guidance_scale: float = DEFAULT_GUIDANCE, cross_replace: float = 0.8,
         self_replace: float = 0.0, halves: Halves = "cond", capture: bool = False) -> EditResult:
    """Prompt-to-prompt word swap (Hertz et al. 2022, Sec. 3.2): source and target from the same ``noise``.

    source_prompt, target_prompt: one prompt each, or lists of B (B edits in one batch); the same number of
    words in each pair (``token_mapper``). noise: the starting latents (B, 4, 16, 16), shared by each source and
    its target. cross_replace: the fraction of the DDIM steps (the first int(cross_replace * num_steps)) in
    which the target's cross-attention probabilities are the source's (0: plain generation of the target from
    the same noise; 1: every step). self_replace: the same for self-attention (the paper's
    ``self_replace_steps``; 0 by default). halves: "cond" edits the conditional half of guidance only, as the
    paper's code and diffusers' community pipeline do; "both" edits the unconditional half too.
    capture: keep the conditional cross-attention maps (``EditResult.maps``).
    """
    src = [source_prompt] if isinstance(source_prompt, str) else list(source_prompt)
    tgt = [target_prompt] if isinstance(target_prompt, str) else list(target_prompt)
    if not src or len(src) != len(tgt):
        raise ValueError(f"give one target prompt per source prompt, got {len(src)} and {len(tgt)}")
    cross = _fraction("cross_replace", cross_replace)
    self_frac = _fraction("self_replace", self_replace)
    if halves not in HALVES:
        raise ValueError(f"halves must be one of {HALVES}, got {halves!r}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if guidance_scale < 1:
        raise ValueError(f"guidance_scale must be >= 1 (1 means no guidance), got {guidance_scale}")
    b = len(src)
    shape = sd.latent_shape(b)
    if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != shape:
        raise ValueError(f"noise must be a tensor of shape {shape} (one starting latent per edit), got "
                         f"{tuple(getattr(noise, 'shape', ()))}")
    mappers = torch.stack([token_mapper(sd.tokenizer, s, t) for s, t in zip(src, tgt)])  # (B, L, L)
    cond = sd.encode_prompt(src + tgt)  # (2B, L, D): sources then targets
    uncond = sd.encode_prompt([""] * 2 * b) if guidance_scale != 1 else None
    x = torch.cat([noise, noise]).to(sd.device, sd.dtype)  # (2B, 4, 16, 16)
    controller = AttentionEdit(sd.unet, mappers.to(sd.device, sd.dtype), int(cross * num_steps),
                               int(self_frac * num_steps), halves, capture)
    calls = [0]

    def unet(x_in, t, c):  # one call per DDIM step: tell the controller which step it is
        controller.step = calls[0]
        calls[0] += 1
        return sd.unet(x_in, t, c)

    model = guided_model(unet, cond, uncond, guidance_scale)
    with controller:
        z = sample("ddim", model, x, sd.schedule, num_steps, None, prediction_type=sd.unet.config.prediction_type)
    images = sd.decode_latents(z)
    return EditResult(images[:b], images[b:], z[:b], z[b:], controller.maps)
