"""Looking inside a ControlNet: parameters by part, gradients by part, edge maps and their overlap. Lesson 6.

Lesson 6 (notebooks/06_controlnet.ipynb) counts what a ControlNet copies from the U-Net and what it
adds, follows which parts receive a gradient during the first training steps, and shows a control
edge map next to the edges of a generated image. The part names are the module names that the
course's ``controlnet.ControlNet`` shares with diffusers' ``ControlNetModel`` and
``UNet2DConditionModel``, so the same functions read the tiny models and SD 1.5's (built on the meta
device, see ``lineage``).

Edge maps are (B, 1, H, W) bool tensors (``edges.py``); images are (B, 3, H, W), float in [-1, 1]
or uint8. Nothing here changes its inputs.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from ..edges import dilate
from .plotting import to_uint8, wrap

# Top-level module names -> the part of the model they belong to (diffusers' names, shared by the course's models).
CONTROLNET_PARTS = {
    "trainable copy": ("time_embedding", "conv_in", "down_blocks", "mid_block"),
    "conditioning encoder": ("controlnet_cond_embedding",),
    "zero convolutions": ("controlnet_down_blocks", "controlnet_mid_block"),
}
UNET_PARTS = {
    "encoder half (copied)": ("time_embedding", "conv_in", "down_blocks", "mid_block"),
    "decoder half": ("up_blocks", "conv_norm_out", "conv_out"),
}
# Finer groups for following gradients: the two kinds of zero convolution apart from what they guard.
GRADIENT_PARTS = {
    "output zero convs": ("controlnet_down_blocks", "controlnet_mid_block"),
    "trainable copy": ("time_embedding", "conv_in", "down_blocks", "mid_block"),
    "input zero conv": ("controlnet_cond_embedding.conv_out",),
    "conditioning encoder (rest)": ("controlnet_cond_embedding.conv_in", "controlnet_cond_embedding.blocks"),
}


def _part_of(name: str, parts: dict[str, tuple[str, ...]]) -> str | None:
    for part, prefixes in parts.items():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return part
    return None


def count_parts(model: nn.Module, parts: dict[str, tuple[str, ...]] = CONTROLNET_PARTS) -> dict[str, int]:
    """Parameters of ``model`` by part: {part: count}, plus "other" for anything no part names.

    Works on the meta device (only shapes are read), so SD 1.5's ControlNet counts without memory.
    """
    out = {part: 0 for part in parts}
    for name, p in model.named_parameters():
        part = _part_of(name, parts) or "other"
        out[part] = out.get(part, 0) + p.numel()
    if out.get("other") == 0:
        del out["other"]
    return out


def gradient_norms(model: nn.Module, parts: dict[str, tuple[str, ...]] = GRADIENT_PARTS) -> dict[str, float]:
    """The L2 norm of the gradients of each part's parameters after ``loss.backward()`` (0 where there is none)."""
    sq = {part: 0.0 for part in parts}
    for name, p in model.named_parameters():
        part = _part_of(name, parts)
        if part is not None and p.grad is not None:
            sq[part] += float(p.grad.detach().double().pow(2).sum())
    return {part: s ** 0.5 for part, s in sq.items()}


def weight_norms(model: nn.Module, parts: dict[str, tuple[str, ...]] = GRADIENT_PARTS) -> dict[str, float]:
    """The L2 norm of each part's parameters (the zero convolutions' start at exactly 0)."""
    sq = {part: 0.0 for part in parts}
    for name, p in model.named_parameters():
        part = _part_of(name, parts)
        if part is not None:
            sq[part] += float(p.detach().double().pow(2).sum())
    return {part: s ** 0.5 for part, s in sq.items()}


def object_at(objects: list[dict], region: torch.Tensor, min_cover: float = 0.5) -> tuple[dict | None, float]:
    """The evaluator's object that covers most of ``region``, and how much of it it covers.

    objects: one image's objects as ``Evaluator.predict(images)["objects"][i]`` gives them (each with
    ``pixels``, a (32, 32) bool grid of 2 x 2-pixel cells). region: (64, 64) bool, the filled shape an
    edge map outlines (``edges.shape_mask`` and friends). Returns (object or None, cover): the object is
    None when no object covers at least ``min_cover`` of the region's pixels.
    """
    from ..evaluator import upsample_masks

    area = int(region.sum())
    if area == 0:
        raise ValueError("region is empty: give the filled shape the edge map outlines, (64, 64) bool")
    best, cover = None, 0.0
    for obj in objects:
        pixels = upsample_masks(obj["pixels"][None])[0]  # (64, 64)
        c = int((pixels & region.bool()).sum()) / area
        if c > cover:
            best, cover = obj, c
    return (best if cover >= min_cover else None), cover


# --- Pictures. ---------------------------------------------------------------------------------

def edge_picture(edges: torch.Tensor) -> np.ndarray:
    """One (1, H, W) or (H, W) edge map -> an (H, W, 3) float picture: black lines on white."""
    e = edges.detach().cpu().reshape(edges.shape[-2:]).bool().numpy()
    return np.repeat((~e)[..., None], 3, axis=2).astype(np.float32)


OVERLAY_COLOURS = {"found": (0.1, 0.65, 0.2), "missed": (0.9, 0.15, 0.1), "extra": (0.15, 0.35, 0.95)}


def edge_overlay(generated: torch.Tensor, control: torch.Tensor, tolerance: int = 1) -> np.ndarray:
    """Where a generated image's edges meet the control's: an (H, W, 3) picture on white.

    green: a control edge pixel with a generated edge within ``tolerance`` px (it counts for recall);
    red: a control edge pixel with none (missed); blue: a generated edge pixel with no control edge
    within ``tolerance`` px (it counts against precision). Same rule as ``edges.edge_f1``.
    generated, control: (1, H, W) or (1, 1, H, W) bool edge maps.
    """
    g = generated.detach().cpu().reshape(1, 1, *generated.shape[-2:]).bool()
    c = control.detach().cpu().reshape(1, 1, *control.shape[-2:]).bool()
    found = (c & dilate(g, tolerance))[0, 0].numpy()
    missed = (c & ~dilate(g, tolerance))[0, 0].numpy()
    extra = (g & ~dilate(c, tolerance))[0, 0].numpy()
    out = np.ones((*found.shape, 3), dtype=np.float32)
    for mask, name in ((extra, "extra"), (found, "found"), (missed, "missed")):
        out[mask] = OVERLAY_COLOURS[name]
    return out


def _picture(item) -> tuple[np.ndarray, str | None]:
    """An image tensor (3, H, W), an edge map (1, H, W) bool, or a numpy picture -> (array for imshow, cmap)."""
    if isinstance(item, np.ndarray):
        return item, ("gray" if item.ndim == 2 else None)
    if item.dim() == 3 and item.shape[0] == 1:
        return edge_picture(item), None
    return to_uint8(item), None


def image_rows(rows: dict[str, Sequence], titles: dict[str, Sequence[str]] | None = None, title: str = "",
               scale: float = 1.55, title_width: int = 22, fontsize: int = 7) -> plt.Figure:
    """A grid with one labelled row per entry of ``rows``: {row label: images}.

    Each row is a (B, 3, H, W) image tensor, a (B, 1, H, W) edge map (drawn black on white) or a
    list of numpy pictures; rows may differ in length. titles: {row label: one title per picture}.
    """
    titles = titles or {}
    cols = max(len(v) for v in rows.values())
    has_titles = bool(titles)
    fig, axes = plt.subplots(len(rows), cols, squeeze=False,
                             figsize=(scale * cols + 0.9, scale * (1.35 if has_titles else 1.0) * len(rows) + 0.5))
    for r, (label, items) in enumerate(rows.items()):
        for j in range(cols):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(items):
                ax.axis("off")
                continue
            pic, cmap = _picture(items[j])
            ax.imshow(pic, cmap=cmap, interpolation="nearest")
            if label in titles:
                ax.set_title(wrap(titles[label][j], title_width), fontsize=fontsize)
        axes[r, 0].set_ylabel(wrap(label, 16), fontsize=fontsize + 1)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def parameter_bars(models: dict[str, dict[str, int]], title: str) -> plt.Figure:
    """Horizontal bars of parameter counts by part, one panel per model, in % of the panel's first bar.

    models: {panel title: {bar label: parameters}}; the first bar of each panel is the 100% reference.
    """
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 0.55 * max(map(len, models.values())) + 1.3),
                             squeeze=False)
    for ax, (name, parts) in zip(axes[0], models.items()):
        labels, values = list(parts), np.array(list(parts.values()), dtype=float)
        ref = values[0]
        y = np.arange(len(labels))[::-1]
        ax.barh(y, 100 * values / ref, color=["0.55"] + ["C0"] * (len(values) - 1))
        for yi, v in zip(y, values):
            ax.text(100 * v / ref + 1.5, yi, f"{v / 1e6:.3g}M ({100 * v / ref:.1f}%)", va="center", fontsize=8)
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_xlim(0, 135)
        ax.set_xlabel(f"% of the {labels[0]}")
        ax.set_title(name, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
