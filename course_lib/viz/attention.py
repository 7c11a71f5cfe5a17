"""Helpers that lesson 2 (cross-attention) uses to turn recorded attention into maps per word.

While the tiny Stable Diffusion samples, ``attention.AttentionStore`` records every cross-attention
layer's probabilities, one tensor (B, heads, HW, tokens) per layer and sampler step. This module:

- ``token_maps``: averages them over heads and layers (each layer's map resized to one grid), one
  map per (step, prompt, token);
- ``token_labels`` / ``word_kind``: names every token position of a prompt (CLIP's BPE tokens) and sorts
  them into shape, colour, size, position, fill, background, other words, and the special tokens;
- ``object_mask`` and ``mass_inside``: find the drawn objects in a generated image (everything that
  differs from the background) and measure how much of a token's attention falls on them;
- ``overlay``: draw an attention map over the image it produced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..clip import EOS, PAD, Tokenizer, clip_bpe
from ..data import (BACKGROUND_WORDS, COLOURS, FILL_WORDS, POSITION_WORDS, SHAPES, SIZE_WORDS,
                    caption_vocabulary, normalise)
from .plotting import to_uint8

KINDS = ("shape", "colour", "size", "position", "fill", "background", "other word", "start", "end", "padding")


def _word_kinds() -> dict[str, str]:
    """Every caption word and its kind; then the pieces of words that CLIP's BPE splits ("hex" + "agon" of
    "hexagon", "stri" + "py" of "stripy"), unless the piece is itself a caption word ("an" of "cyan")."""
    groups = {"shape": SHAPES, "colour": COLOURS,
              "size": [w for forms in SIZE_WORDS.values() for f in forms for w in normalise(f)],
              "position": [w for forms in POSITION_WORDS.values() for f in forms for w in normalise(f)],
              "fill": [w for forms in FILL_WORDS.values() for w in forms],
              "background": [w for forms in BACKGROUND_WORDS.values() for w in forms] + ["background", "backdrop"]}
    kinds = {}
    for kind, words in groups.items():
        for w in words:
            kinds.setdefault(w, kind)  # "medium" is a size, "white" a background colour
    bpe, vocabulary = clip_bpe(), set(caption_vocabulary())
    for word, kind in list(kinds.items()):
        pieces = [bpe.decoder[i].removesuffix("</w>") for i in bpe.encode(word)]
        if len(pieces) > 1:
            for piece in pieces:
                if piece not in vocabulary:
                    kinds.setdefault(piece, kind)
    return kinds


WORD_KINDS = _word_kinds()


def token_maps(maps: dict[str, list[torch.Tensor]], batch: int, guided: bool = True, size: int = 8) -> torch.Tensor:
    """Attention per token from an ``AttentionStore``'s ``maps``: (steps, batch, tokens, size, size).

    Each layer's probabilities (B', heads, h*w, tokens) are averaged over heads, laid out as h x w maps
    and resized to size x size (bilinear), then averaged over layers. With classifier-free guidance
    (``guided=True``) every call holds [unconditional, conditional] halves; the conditional half is kept.
    At every pixel the weights over the tokens sum to 1 (a softmax over tokens), so the maps of all
    tokens add up to a map of ones.
    """
    per_layer = []
    for calls in maps.values():
        steps = []
        for probs in calls:
            rows = 2 * batch if guided else batch
            if probs.shape[0] != rows:
                raise ValueError(f"expected {rows} rows per call ({batch} prompts{', x2 for guidance' if guided else ''}), "
                                 f"got {probs.shape[0]}")
            p = probs[batch:] if guided else probs  # (B, heads, HW, L)
            p = p.mean(dim=1)  # (B, HW, L)
            side = int(round(p.shape[1] ** 0.5))
            grid = p.transpose(1, 2).reshape(batch, p.shape[2], side, side)  # (B, L, h, w)
            if side != size:
                grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
            steps.append(grid)
        per_layer.append(torch.stack(steps))  # (steps, B, L, size, size)
    if not per_layer:
        raise ValueError("no attention maps recorded: run the model inside `with AttentionStore(...)`")
    return torch.stack(per_layer).mean(dim=0)


def token_labels(tokenizer: Tokenizer, prompt: str) -> list[str]:
    """One label per token position: the start token, the BPE tokens (the word-end mark ``</w>`` left out),
    the end token, then padding."""
    ids = tokenizer([prompt])[0].tolist()
    return [tokenizer.vocab[i].removesuffix("</w>") for i in ids]


def word_kind(token: str) -> str:
    """Which kind of word a token (a label of ``token_labels``) is: one of ``KINDS``. A colour word is a
    background's when it is one of the background words (white, grey, gray, black)."""
    if token in WORD_KINDS:
        return WORD_KINDS[token]
    if token == EOS:
        return "end"
    if token == PAD:
        return "padding"
    if token.startswith("<|"):
        return "start"
    return "other word"


def object_mask(images: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """Pixels that differ from the background: (B, H, W) bool.

    The background colour of each image is the median of its border pixels; a pixel belongs to an
    object when one of its channels differs from it by more than ``threshold`` (images in [-1, 1]). The
    world's backgrounds change by at most 0.2 across one image (their gradient), well under the threshold.
    """
    x = images.float()
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)  # (B, 3, 4W)
    background = border.median(dim=2).values  # (B, 3)
    return (x - background[:, :, None, None]).abs().amax(dim=1) > threshold


def mass_inside(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of each token's attention that falls inside ``mask``: maps (B, L, h, w), mask (B, H, W) -> (B, L).

    The maps are resized to the mask's size (bilinear) and normalised to sum to 1 over the pixels.
    Compare with the mask's area share, ``mask.float().mean((1, 2))``: what a uniform map would score.
    """
    up = F.interpolate(maps.float(), size=mask.shape[-2:], mode="bilinear", align_corners=False).clamp_min(0)
    up = up / up.sum(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    return (up * mask[:, None].float()).sum(dim=(2, 3))


def overlay(ax, image: torch.Tensor, heat: torch.Tensor, title: str = "", vmax: float | None = None,
            vmin: float | None = 0.0, alpha: float = 0.6):
    """Show ``image`` (3, H, W) in [-1, 1] in grey with ``heat`` (h, w) on top, resized to H x W.

    The colour scale runs from ``vmin`` to ``vmax``; ``None`` takes the map's own minimum or maximum."""
    h, w = image.shape[-2:]
    up = F.interpolate(heat[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    grey = to_uint8(image).mean(axis=-1)
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
    im = ax.imshow(up.cpu(), cmap="inferno", alpha=alpha, vmin=float(up.min()) if vmin is None else vmin,
                   vmax=float(up.max()) if vmax is None else vmax)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return im
