"""The KL autoencoder ("VAE") of latent diffusion. Lesson 1 (latent diffusion and the VAE) explains it.

Stable Diffusion never denoises pixels. A VAE squeezes a 512x512x3 image into a 64x64x4 latent
(side / 8, 48x fewer numbers); the U-Net denoises latents; the decoder paints the result back.
This one does the same to the course's scenes: 64x64x3 -> 16x16x4, factor 4, 12x fewer numbers. Why 4 and
not SD's 8: the factor is chosen for the size of the details that must survive, not copied. SD's 8 keeps a
512-pixel image's objects many latent pixels wide; on 64-pixel scenes it would leave an 8x8 latent in which
a small star is one and a half latent pixels, and the decoder gives back a blob (measured: a factor-8 VAE
of this size lets the evaluator read the shape from 13% of reconstructed stars, factor 4 from 85%).
Rombach et al. 2022 compare factors 1 to 32 and use 4 and 8 ("LDM-4", "LDM-8") for their models.

The encoder outputs a diagonal Gaussian per latent element (mean and log-variance); training
samples from it with the reparameterisation trick  z = mean + std * eps  (Kingma & Welling 2014)
and adds a small KL penalty towards N(0, I). The penalty is kept tiny, as in SD (weight 1e-6):
it only stops the latent space from drifting to huge values, it does not make the latents
standard normal. That is why latents are multiplied by a **scaling factor** before diffusion:
SD's 0.18215 was 1 / std of latents over a sample of training images, computed once after the
VAE was trained. ``compute_scaling_factor`` does exactly that for this VAE.

Layout: a miniature of SD's ``AutoencoderKL`` (diffusers' ``Encoder``/``Decoder``), module for module,
so ``course_lib.diffusers_weights.vae_to_diffusers`` runs the same weights in diffusers with the same
outputs. n = ``layers_per_block``, m = ``len(block_channels)`` levels::

    encoder: conv_in -> [ResBlock x n, Downsample] x (m - 1), ResBlock x n       64x64 -> 32 -> 16
             -> mid: ResBlock, self-attention, ResBlock
             -> GroupNorm, SiLU, conv_out -> quant_conv (1x1) -> (mean, logvar)
    decoder: post_quant_conv (1x1) -> conv_in -> mid: ResBlock, self-attention, ResBlock
             -> [ResBlock x (n + 1), Upsample] x (m - 1), ResBlock x (n + 1)     16x16 -> 32 -> 64
             -> GroupNorm, SiLU, conv_out

Widths change in the first ResBlock of a level (its 1x1 skip conv matches the widths); Downsample and
Upsample keep the width. Downsample pads (0, 1, 0, 1), then a stride-2 3x3 conv without padding (the
original LDM code's choice); Upsample is nearest-neighbour 2x, then a 3x3 conv. Every GroupNorm uses
eps=1e-6, as SD's VAE does. SD 1.5: block_channels (128, 256, 512, 512), n = 2, 32 groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention

GROUP_NORM_EPS = 1e-6  # diffusers' Encoder/Decoder build every GroupNorm with this (PyTorch's default: 1e-5)


@dataclass
class VAEConfig:
    in_channels: int = 3  # RGB
    latent_channels: int = 4  # as in SD 1.x/2.x (SD 3 moved to 16)
    block_channels: tuple = (16, 32, 64)  # channels at 64x64, 32x32, 16x16 (factor 4); SD 1.5: (128, 256, 512, 512), factor 8
    layers_per_block: int = 1  # encoder ResBlocks per resolution; the decoder has one more (SD: 2, so 3)
    norm_groups: int = 8  # GroupNorm groups (SD: 32)
    mid_attention: bool = True  # one self-attention layer at the latent resolution, as in SD's VAE
    init_logvar: float = -6.0  # initial log-variance of the posterior: start nearly deterministic (std 0.05)
    scaling_factor: float = 1.0  # 1 / std of training latents; set by compute_scaling_factor after training

    def __post_init__(self):
        self.block_channels = tuple(self.block_channels)  # JSON gives lists back
        if isinstance(self.layers_per_block, bool) or not isinstance(self.layers_per_block, int) \
                or self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be one int >= 1, the ResBlocks at every resolution (as in "
                             f"diffusers' AutoencoderKL), got {self.layers_per_block!r}; a VAE card with one entry per "
                             "resolution was written for an older layout: retrain it with "
                             "`python -m course_lib.train --only vae`")
        if len(self.block_channels) < 2:
            raise ValueError(f"block_channels needs at least 2 resolutions, got {self.block_channels}")
        for c in self.block_channels:
            if c % self.norm_groups:
                raise ValueError(f"every entry of block_channels must divide by norm_groups={self.norm_groups}; got {c}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_channels) - 1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a skip connection (1x1 conv when channels change).

    diffusers: ``ResnetBlock2D`` without a time embedding (its 1x1 skip is ``conv_shortcut``)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=GROUP_NORM_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=GROUP_NORM_EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection (SD's VAE mid block).

    diffusers: the ``Attention`` of ``UNetMidBlock2D``, with its own ``group_norm`` and biased Q/K/V."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)
        self.attn = Attention(channels, heads=1, dim_head=channels, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        out = self.attn(seq).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + out


class Downsample(nn.Module):
    """Halve the side: pad one zero row and column at the bottom and right, then a stride-2 3x3 conv.

    diffusers: ``Downsample2D(padding=0)`` as the VAE's ``Encoder`` builds it. Output pixel i reads input
    pixels 2i..2i+2 (a conv with padding 1 on every side would read 2i-1..2i+1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double the side: nearest-neighbour 2x, then a 3x3 conv (no checkerboard, unlike a transposed conv).

    diffusers: ``Upsample2D(use_conv=True)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


def mid_block(channels: int, groups: int, attention: bool) -> nn.Sequential:
    """ResBlock, self-attention, ResBlock at the lowest resolution (diffusers: ``UNetMidBlock2D``)."""
    return nn.Sequential(ResBlock(channels, channels, groups),
                         AttnBlock(channels, groups) if attention else nn.Identity(),
                         ResBlock(channels, channels, groups))


class Encoder(nn.Module):
    """Image -> posterior moments (mean and log-variance). diffusers: ``Encoder``, then ``quant_conv``."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_channels, cfg.norm_groups, cfg.layers_per_block
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()  # diffusers: down_blocks, each a DownEncoderBlock2D
        cin = ch[0]
        for i, c in enumerate(ch):
            layers = [ResBlock(cin if j == 0 else c, c, g) for j in range(n)]  # the first one changes the width
            if i < len(ch) - 1:
                layers.append(Downsample(c))
            self.down.append(nn.Sequential(*layers))
            cin = c
        self.mid = mid_block(cin, g, cfg.mid_attention)
        self.norm_out = nn.GroupNorm(g, cin, eps=GROUP_NORM_EPS)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance
        # SD's AutoencoderKL keeps this 1x1 conv on the moments outside its Encoder, as ``quant_conv``
        # (a name left from the VQ autoencoders it grew from); here the encoder ends with it.
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        # With SD's tiny KL weight, nothing pulls the posterior wide, and sampling noise as large as the
        # latents themselves only slows early training down: start the log-variance low.
        with torch.no_grad():
            self.quant_conv.bias[cfg.latent_channels:] = cfg.init_logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down:
            h = block(h)
        h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))  # (B, 2*latent, H/8, W/8)
        return self.quant_conv(h)  # (B, 2*latent, H/8, W/8)


class Decoder(nn.Module):
    """Latent -> image. diffusers: ``post_quant_conv``, then ``Decoder``."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_channels[::-1], cfg.norm_groups, cfg.layers_per_block
        # a 1x1 conv on z; SD's AutoencoderKL keeps it outside its Decoder, as ``post_quant_conv``
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid = mid_block(ch[0], g, cfg.mid_attention)
        self.up = nn.ModuleList()  # diffusers: up_blocks, each an UpDecoderBlock2D
        cin = ch[0]
        for i, c in enumerate(ch):
            # n + 1 ResBlocks; the first narrows to this level's width (Upsample before it kept the width)
            layers = [ResBlock(cin if j == 0 else c, c, g) for j in range(n + 1)]
            if i < len(ch) - 1:
                layers.append(Upsample(c))
            self.up.append(nn.Sequential(*layers))
            cin = c
        self.norm_out = nn.GroupNorm(g, cin, eps=GROUP_NORM_EPS)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for block in self.up:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


class LatentDistribution:
    """A diagonal Gaussian over latents: what the encoder outputs (SD: ``DiagonalGaussianDistribution``)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, latent, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)  # as in SD: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, the reparameterisation trick; eps drawn from ``generator``."""
        where = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=where, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)  # a CPU generator gives the same noise on any device

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per image, summed over latent elements. Shape (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class VAE(nn.Module):
    """64x64x3 images in [-1, 1] <-> 16x16x4 latents (with the default config). Build with ``VAE(VAEConfig())``; load trained weights
    with ``course_lib.weights.load_vae`` (or ``tiny_sd.load_tiny_sd``)."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config or VAEConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def encode(self, x: torch.Tensor) -> LatentDistribution:
        """x: (B, 3, H, W) in [-1, 1] -> the posterior q(z|x) over (B, 4, H/8, W/8) latents."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        f = self.config.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {tuple(x.shape[-2:])}")
        return LatentDistribution(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, 4, h, w) unscaled latents -> images (B, 3, 8h, 8w), roughly in [-1, 1]."""
        if z.dim() != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected latents (B, {self.config.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Encode, sample a latent, decode. Returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


@torch.no_grad()
def compute_scaling_factor(vae: VAE, images: torch.Tensor, batch_size: int = 256,
                           generator: torch.Generator | None = None) -> float:
    """1 / std of sampled latents over ``images`` (float, [-1, 1]): how SD's 0.18215 was found.

    Multiplying latents by this factor gives them unit variance, which is what the diffusion
    schedule assumes of its clean data x0.
    """
    zs = [vae.encode(images[i:i + batch_size]).sample(generator) for i in range(0, images.shape[0], batch_size)]
    return float(1.0 / torch.cat(zs).float().std())


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, for images in [-1, 1] (peak-to-peak 2). Shape (B,)."""
    mse = (x.float().clamp(-1, 1) - y.float().clamp(-1, 1)).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))
