"""Small helpers to look at images and curves. Every figure gets a title and labelled axes.

Images in the course are float tensors in [-1, 1] with shape (B, 3, H, W) (the VAE's range) or
uint8 tensors in [0, 255]; these helpers accept both and never modify their input.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) or (C, H, W) tensor, float in [-1, 1] or uint8 -> uint8 array (B, H, W, C) or (H, W, C)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(images).__name__}")
    if images.dim() not in (3, 4):
        raise ValueError(f"expected images shaped (C, H, W) or (B, C, H, W), got shape {tuple(images.shape)}")
    x = images.detach().cpu()
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile a batch (B, C, H, W) into one uint8 image (rows x cols), ``nrow`` images per row."""
    arr = to_uint8(images)
    if arr.ndim == 3:
        arr = arr[None]
    b, h, w, c = arr.shape
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    cols = min(nrow, b)
    rows = -(-b // cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = arr[i]
    return grid


def show_images(images: torch.Tensor, titles: Sequence[str] | None = None, nrow: int = 8, title: str | None = None,
                scale: float = 1.6, title_fontsize: int = 7):
    """Show a batch of images in a grid of subplots, each with an optional title. Returns the figure."""
    arr = to_uint8(images)
    if arr.ndim == 3:
        arr = arr[None]
    n = arr.shape[0]
    if titles is not None and len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} images")
    cols = min(nrow, n)
    rows = -(-n // cols)
    row_height = scale * (1.45 if titles is not None else 1.0)  # room for titles of up to four lines
    fig, axes = plt.subplots(rows, cols, figsize=(scale * cols, row_height * rows + (0.4 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(arr[i], cmap="gray" if arr.shape[-1] == 1 else None, interpolation="nearest")
            if titles is not None:
                ax.set_title(wrap(titles[i], 22), fontsize=title_fontsize)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def wrap(text: str, width: int) -> str:
    """Break ``text`` into lines of at most ``width`` characters at spaces (for subplot titles)."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines)


def plot_curves(x, curves: dict, title: str, xlabel: str, ylabel: str, ax=None, logx: bool = False, **kwargs):
    """Plot several named curves against ``x`` on one labelled axis. Returns the axis."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for name, y in curves.items():
        ax.plot(x, np.asarray(y), label=name, **kwargs)
    if logx:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    return ax
