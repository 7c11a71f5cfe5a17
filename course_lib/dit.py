"""A tiny Diffusion Transformer (DiT) with adaLN-Zero conditioning, the denoiser family of SD 3.

Lesson 8 (``notebooks/08_sd_lineage.ipynb``) trains one on the course's shapes with rectified flow
(``course_lib.flow``) and compares it with SD 3's MMDiT.

Peebles & Xie (2023), "Scalable Diffusion Models with Transformers", replace the U-Net with a plain
transformer over patches of the latent. Their best way to feed in the timestep (and class) is
**adaLN-Zero**: a small MLP maps the conditioning vector c to a shift, a scale and a gate for each of
the two sub-layers, and that MLP starts at zero, so every block starts as the identity function::

    shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c))          # zero-initialised
    x = x + gate1 * Attention(LayerNorm(x) * (1 + scale1) + shift1)
    x = x + gate2 * MLP(LayerNorm(x) * (1 + scale2) + shift2)

SD 3's MMDiT keeps this block and adds a second stream of weights for the text tokens, with one
attention over the concatenation of image and text tokens (diffusers' ``JointTransformerBlock``, whose
``norm1`` is an ``AdaLayerNormZero``).

Shapes: B batch, N tokens (patches), D model width, p patch side, C channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class DiTConfig:
    image_size: int = 16  # side of the (latent) image the model sees
    in_channels: int = 3  # 4 for SD 1/2/XL latents, 16 for SD 3's
    patch_size: int = 2  # side of a square patch; N = (image_size / patch_size) ** 2 tokens
    dim: int = 96  # D, the width of every token
    depth: int = 4  # number of DiT blocks
    heads: int = 4  # attention heads; D must be divisible by heads
    mlp_ratio: float = 4.0  # hidden width of each MLP is mlp_ratio * D
    num_classes: int = 0  # > 0 adds a class embedding (plus one "null" class for classifier-free guidance)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) normalised elsewhere, shift and scale (B, D) from the conditioning."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """One transformer block whose LayerNorms are modulated by the conditioning vector c (adaLN-Zero)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # adaLN supplies scale and shift
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)  # the "Zero": gates start at 0, the block is the identity
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) tokens, c (B, D) conditioning -> (B, N, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from each token to its patch's pixels; zero-initialised."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        for layer in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*C)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """(B,) timesteps (here sigma * 1000) -> (B, dim) sinusoidal features, as in DiT and diffusers."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)  # (half,)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def sincos_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding for a grid x grid of patches: (grid*grid, dim)."""
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for a 2-D sin-cos embedding, got {dim}")
    coords = torch.arange(grid, dtype=torch.float32)
    freqs = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))  # (dim/4,)
    ang = coords[:, None] * freqs[None]  # (grid, dim/4)
    one_axis = torch.cat([ang.sin(), ang.cos()], dim=1)  # (grid, dim/2)
    rows = one_axis[:, None].expand(grid, grid, dim // 2)  # (grid, grid, dim/2): depends on the row
    cols = one_axis[None, :].expand(grid, grid, dim // 2)  # depends on the column
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim)


class TinyDiT(nn.Module):
    """Patchify -> add positions -> DiT blocks conditioned on (timestep [+ class]) -> unpatchify.

    ``forward(x, sigma, labels=None)`` takes images (B, C, H, W) and noise levels sigma (B,) in [0, 1]
    and returns a tensor shaped like x: the velocity, for rectified flow.
    """

    def __init__(self, config: DiTConfig | None = None):
        super().__init__()
        c = config if config is not None else DiTConfig()
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size ({c.image_size}) must be a multiple of patch_size ({c.patch_size})")
        self.config = c
        self.grid = c.image_size // c.patch_size
        self.patch_embed = nn.Conv2d(c.in_channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid, c.dim), persistent=False)  # (N, D), fixed
        self.t_embed = nn.Sequential(nn.Linear(c.dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.y_embed = nn.Embedding(c.num_classes + 1, c.dim) if c.num_classes > 0 else None  # last row: "no class"
        self.blocks = nn.ModuleList([DiTBlock(c.dim, c.heads, c.mlp_ratio) for _ in range(c.depth)])
        self.final = FinalLayer(c.dim, c.patch_size, c.in_channels)

    def condition(self, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        c = self.t_embed(timestep_embedding(sigma * 1000, self.config.dim))  # (B, D)
        if self.y_embed is not None:
            if labels is None:  # unconditional: the null class
                labels = torch.full((sigma.shape[0],), self.config.num_classes, device=sigma.device, dtype=torch.long)
            c = c + self.y_embed(labels)
        return c

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        b, ch, h, w = x.shape
        p, g = self.config.patch_size, self.grid
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        c = self.condition(sigma.to(x), labels)  # (B, D)
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.final(tokens, c)  # (B, N, p*p*C)
        out = out.reshape(b, g, g, p, p, ch).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return out.reshape(b, ch, h, w)
