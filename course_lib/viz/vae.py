"""Helpers that lesson 1 (latent diffusion and the VAE) uses to look inside a VAE and its latents.

- ``trace_shapes``: run a model once and record the output shape of chosen sub-modules, to read
  an architecture stage by stage;
- ``compression_table``: how many numbers an image and its latent hold, at several resolutions;
- ``latent_to_rgb``: the best linear map from the 4 latent channels to colour, which shows that a
  latent is still a (coarse) picture;
- ``snr_db_with_data_std``: the signal-to-noise ratio of the forward process when the clean data
  does not have unit variance, which is why Stable Diffusion scales its latents;
- ``show_latent_channels``: one image per latent channel, with a shared colour scale.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from ..schedules import snr_db
from .plotting import to_uint8, wrap

FLOAT32_BYTES = 4
MIB = 2**20


@torch.no_grad()
def trace_shapes(model: nn.Module, run, modules: dict[str, nn.Module]) -> list[tuple[str, tuple, int]]:
    """Call ``run()`` once and record, for each named module, its output shape and parameter count.

    ``run`` is a function of no arguments that calls the model (e.g. ``lambda: vae.encode(x)``);
    ``modules`` maps a label to a sub-module of ``model``. Rows come back in the order the modules
    ran: (label, output shape, parameters of that module). Works on the meta device too.
    """
    rows: list[tuple[str, tuple, int]] = []
    label_of = {id(m): name for name, m in modules.items()}

    def hook(module, _inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        rows.append((label_of[id(module)], tuple(out.shape), sum(p.numel() for p in module.parameters())))

    handles = [m.register_forward_hook(hook) for m in modules.values()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return rows


def print_shapes(rows: list[tuple[str, tuple, int]], title: str) -> None:
    """Print ``trace_shapes`` rows as a table: stage, output shape, numbers per image, parameters."""
    print(title)
    width = max(len(name) for name, _, _ in rows) + 2
    print(f"  {'stage':<{width}}{'output shape':<20}{'numbers per image':>18}{'parameters':>12}")
    for name, shape, params in rows:
        print(f"  {name:<{width}}{str(shape):<20}{math.prod(shape[1:]):>18,}{params:>12,}")


# Like course_lib/checks/vae.py's reference on purpose: a checker's reference is written independently of what it checks.
def compression_table(resolutions, latent_channels: int = 4, factor: int = 8) -> list[dict]:
    """Per square resolution: numbers in the image (H*W*3) and the latent ((H/f)*(W/f)*C), their ratio,
    float32 MiB of each and the MiB saved, and the entries of one self-attention score matrix over all
    positions (pixels vs latent positions), which is quadratic in the number of positions."""
    rows = []
    for r in resolutions:
        if r % factor:
            raise ValueError(f"resolution {r} is not a multiple of the VAE's factor {factor}")
        pixels, latents = r * r * 3, (r // factor) ** 2 * latent_channels
        rows.append({
            "resolution": r,
            "pixel_numbers": pixels,
            "latent_numbers": latents,
            "ratio": pixels / latents,
            "pixel_mib": pixels * FLOAT32_BYTES / MIB,
            "latent_mib": latents * FLOAT32_BYTES / MIB,
            "saved_mib": (pixels - latents) * FLOAT32_BYTES / MIB,
            "pixel_attention_entries": (r * r) ** 2,
            "latent_attention_entries": ((r // factor) ** 2) ** 2,
        })
    return rows


def latent_to_rgb(latents: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Least-squares fit of colour from latent channels, pixel by pixel at the latent's resolution.

    latents (N, C, h, w); images (N, 3, H, W) float in [-1, 1]. The images are average-pooled to
    h x w, then rgb = [z, 1] @ W is solved for W (C+1, 3). Returns (W, R^2 of the fit).
    """
    n, c, h, w = latents.shape
    small = F.adaptive_avg_pool2d(images.float(), (h, w))  # (N, 3, h, w)
    z = latents.float().permute(0, 2, 3, 1).reshape(-1, c)  # (N*h*w, C)
    target = small.permute(0, 2, 3, 1).reshape(-1, 3)  # (N*h*w, 3)
    design = torch.cat([z, torch.ones(z.shape[0], 1)], dim=1)  # (N*h*w, C+1)
    weights = torch.linalg.lstsq(design, target).solution  # (C+1, 3)
    residual = (design @ weights - target).pow(2).sum()
    total = (target - target.mean(0)).pow(2).sum()
    return weights, float(1 - residual / total)


def apply_latent_to_rgb(latents: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Apply a ``latent_to_rgb`` map: (N, C, h, w) latents -> (N, 3, h, w) colours in [-1, 1]."""
    z = latents.float().permute(0, 2, 3, 1)  # (N, h, w, C)
    rgb = z @ weights[:-1] + weights[-1]  # (N, h, w, 3)
    return rgb.permute(0, 3, 1, 2).clamp(-1, 1)


def snr_db_with_data_std(alphas_cumprod: torch.Tensor, data_std: float) -> torch.Tensor:
    """SNR of x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps when x0 has standard deviation ``data_std``, in dB.

    The schedule's SNR, alpha_bar / (1 - alpha_bar), assumes unit-variance data; data with std s has s^2 times
    that signal power, i.e. 20 log10(s) dB more at every step.
    """
    return snr_db(alphas_cumprod.double()) + 20 * math.log10(data_std)  # 10 log10(s^2) = 20 log10(s)


def show_latent_channels(latents: torch.Tensor, images: torch.Tensor, titles: list[str] | None = None,
                         title: str = "Latent channels"):
    """One row per image: the image, then each latent channel as a heat map (one colour scale for all)."""
    n, c = latents.shape[:2]
    lim = float(latents.abs().max())
    fig, axes = plt.subplots(n, c + 1, figsize=(1.7 * (c + 1) + 0.6, 2.1 * n), squeeze=False)
    pictures = to_uint8(images)
    for i in range(n):
        axes[i, 0].imshow(pictures[i])
        axes[i, 0].set_title(wrap(titles[i], 28) if titles else f"image {i}", fontsize=6)
        for ch in range(c):
            im = axes[i, ch + 1].imshow(latents[i, ch].cpu(), cmap="RdBu_r", vmin=-lim, vmax=lim)
            if i == 0:
                axes[i, ch + 1].set_title(f"channel {ch}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[:, 1:].ravel().tolist(), shrink=0.8, label="latent value")
    fig.suptitle(title)
    return fig

