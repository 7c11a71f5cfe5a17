"""The conditional U-Net that denoises latents. Lessons 2 (cross-attention) and 7 (the pipeline) use it.

Given a noisy latent x_t, its timestep t and the text encoder's per-token hidden states, it
predicts the noise eps that was added (epsilon prediction, as SD 1.x does):

    eps_theta(x_t, t, text)          x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps  (Ho et al. 2020, eq. 4)

The layout follows SD's ``UNet2DConditionModel`` at toy size (diffusers names in brackets)::

    t -> sinusoidal embedding -> MLP ................................ [time_proj, time_embedding]
    x_t (B,4,16,16) -> conv_in (B,32,16,16)
      down_blocks[0]: ResBlock x 1, downsample                -> (B,32,8,8)     [DownBlock2D]
      down_blocks[1]: (ResBlock + Transformer) x 1, downsample -> (B,64,4,4)    [CrossAttnDownBlock2D]
      down_blocks[2]: (ResBlock + Transformer) x 1             -> (B,64,4,4)    [CrossAttnDownBlock2D]
      mid_block:      ResBlock, Transformer, ResBlock                            [UNetMidBlock2DCrossAttn]
      up_blocks[0]:   (ResBlock + Transformer) x 2, upsample   -> (B,64,8,8)    [CrossAttnUpBlock2D]
      up_blocks[1]:   (ResBlock + Transformer) x 2, upsample   -> (B,64,16,16)  [CrossAttnUpBlock2D]
      up_blocks[2]:   ResBlock x 2                             -> (B,32,16,16)  [UpBlock2D]
    -> GroupNorm, SiLU, conv_out -> eps (B,4,16,16)
    (SD 1.5 has 4 resolutions, 2 layers per down block, 3 per up block, and 860M parameters; this
    one has 3, 1 and 2, and about 1.7M: small enough to train on a laptop CPU. SD 1.5 attends at its three
    finest resolutions and in the middle; this one at its two coarsest and in the middle, see ``attention``.)

Every down-block layer pushes its output onto a stack of skip connections; every up-block
ResBlock pops one and concatenates it. A ``Transformer`` block is self-attention over the
pixels, then cross-attention from pixels (queries) to words (keys/values), then a feed-forward.

ControlNet (lesson 6) hooks in exactly as in diffusers: a trainable copy of ``conv_in``,
``time_embedding``, ``down_blocks`` and ``mid_block`` produces one residual per skip connection
(``down_block_additional_residuals``, channels given by ``skip_channels()``) plus one for the mid
block output (``mid_block_additional_residual``); ``forward`` adds them before the up path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention


@dataclass
class UNetConfig:
    in_channels: int = 4  # latent channels of the VAE
    out_channels: int = 4  # predicts noise of the same shape
    block_channels: tuple = (32, 64, 64)  # channels per resolution (16x16, 8x8, 4x4); SD 1.5: (320, 640, 1280, 1280)
    layers_per_block: int = 1  # ResBlock+Transformer pairs per down block (SD 1.5: 2)
    # Self+cross attention at each resolution (SD 1.5: all but the lowest). None (the default): every level but
    # the first when there are three or more, so none at 16x16 in the course's U-Net: attention over 256
    # positions would double its step time on a CPU; the 8x8 and 4x4 levels and the middle attend.
    attention: tuple | None = None
    heads: int = 4  # attention heads (SD 1.5: 8)
    context_dim: int = 128  # width of the text hidden states (= CLIPConfig.width; SD 1.5: 768)
    time_embed_dim: int = 128  # timestep embedding width (SD: 4 * block_channels[0])
    norm_groups: int = 8  # GroupNorm groups (SD: 32)
    ff_mult: int = 4  # feed-forward expansion in the transformer blocks, as in SD
    # What the network was trained to output: the noise ("epsilon"), v ("v_prediction"), or the velocity of a
    # rectified flow, noise - x0, called with timestep = 1000 * sigma ("flow_prediction", lesson 11's flow_unet).
    prediction_type: Literal["epsilon", "v_prediction", "flow_prediction"] = "epsilon"

    def __post_init__(self):
        self.block_channels = tuple(self.block_channels)
        n = len(self.block_channels)
        if self.attention is None:
            self.attention = (False,) + (True,) * (n - 1) if n >= 3 else (True,) * n
        self.attention = tuple(self.attention)
        if len(self.attention) != len(self.block_channels):
            raise ValueError(f"attention needs one flag per resolution: {len(self.block_channels)} "
                             f"flags for block_channels={self.block_channels}, got {self.attention}")
        for c in self.block_channels:
            if c % self.norm_groups or c % self.heads:
                raise ValueError(f"block channels must divide by norm_groups ({self.norm_groups}) and heads "
                                 f"({self.heads}); got {c}")
        if self.prediction_type not in ("epsilon", "v_prediction", "flow_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'flow_prediction', "
                             f"got {self.prediction_type!r}")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim): [cos(t w_i), sin(t w_i)], w_i = max_period^(-i/half).

    The same as the transformer's positional encoding, with t as the position (diffusers:
    ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)``, SD's setting).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected timestep embedding, GroupNorm-SiLU-conv, plus a skip."""

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C, 1, 1): the same shift at every pixel
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class GEGLU(nn.Module):
    """Feed-forward with a gated GELU, as in SD's transformer blocks: (x W) * gelu(x V)."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class Transformer(nn.Module):
    """SD's spatial transformer: norm, project in, [self-attn, cross-attn, feed-forward], project out, residual."""

    def __init__(self, channels: int, context_dim: int, heads: int, groups: int, ff_mult: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.proj_in = nn.Linear(channels, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.attn1 = Attention(channels, None, heads, channels // heads)  # self-attention: pixels <-> pixels
        self.norm2 = nn.LayerNorm(channels)
        self.attn2 = Attention(channels, context_dim, heads, channels // heads)  # cross-attention: pixels -> words
        self.norm3 = nn.LayerNorm(channels)
        self.ff = GEGLU(channels, ff_mult)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        seq = seq + self.attn1(self.norm1(seq))
        seq = seq + self.attn2(self.norm2(seq), context)
        seq = seq + self.ff(self.norm3(seq))
        return x + self.proj_out(seq).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)


class DownBlock(nn.Module):
    """``layers_per_block`` x (ResBlock [+ Transformer]), then an optional stride-2 downsample."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, attn: bool, downsample: bool):
        super().__init__()
        g = cfg.norm_groups
        self.resnets = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, cfg.time_embed_dim, g)
                                     for i in range(cfg.layers_per_block))
        self.attentions = nn.ModuleList(Transformer(cout, cfg.context_dim, cfg.heads, g, cfg.ff_mult)
                                        for _ in range(cfg.layers_per_block)) if attn else None
        self.downsampler = nn.Conv2d(cout, cout, 3, stride=2, padding=1) if downsample else None

    def forward(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsampler is not None:
            x = self.downsampler(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    def __init__(self, c: int, cfg: UNetConfig):
        super().__init__()
        g = cfg.norm_groups
        self.resnet1 = ResBlock(c, c, cfg.time_embed_dim, g)
        self.attention = Transformer(c, cfg.context_dim, cfg.heads, g, cfg.ff_mult)
        self.resnet2 = ResBlock(c, c, cfg.time_embed_dim, g)

    def forward(self, x, temb, context):
        return self.resnet2(self.attention(self.resnet1(x, temb), context), temb)


class UpBlock(nn.Module):
    """``layers_per_block + 1`` x (concat a skip, ResBlock [+ Transformer]), then an optional 2x upsample."""

    def __init__(self, cin: int, cout: int, skip_channels: list[int], cfg: UNetConfig, attn: bool, upsample: bool):
        super().__init__()
        g = cfg.norm_groups
        self.resnets = nn.ModuleList(ResBlock((cin if i == 0 else cout) + s, cout, cfg.time_embed_dim, g)
                                     for i, s in enumerate(skip_channels))
        self.attentions = nn.ModuleList(Transformer(cout, cfg.context_dim, cfg.heads, g, cfg.ff_mult)
                                        for _ in skip_channels) if attn else None
        self.upsampler = nn.Conv2d(cout, cout, 3, padding=1) if upsample else None

    def forward(self, x, skips: list[torch.Tensor], temb, context):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)  # (B, C + C_skip, H, W) -> (B, C, H, W)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsampler is not None:
            x = self.upsampler(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


# --- The encoder half, shared with ControlNet (course_lib/controlnet.py builds its trainable copy from these). ---

def time_embedding_mlp(cfg: UNetConfig) -> nn.Sequential:
    """The MLP that turns the sinusoidal embedding (width block_channels[0]) into ``time_embed_dim``
    (diffusers: ``TimestepEmbedding``, linear_1 - SiLU - linear_2)."""
    return nn.Sequential(nn.Linear(cfg.block_channels[0], cfg.time_embed_dim), nn.SiLU(),
                         nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim))


def embed_time(time_embedding: nn.Module, timestep: torch.Tensor | float | int, batch: int,
               like: torch.Tensor) -> torch.Tensor:
    """Timesteps (scalar or (B,)) -> (B, time_embed_dim) through ``time_embedding``, in ``like``'s dtype and device."""
    t = torch.as_tensor(timestep, device=like.device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or shape ({batch},), got {tuple(t.shape)}")
    width = time_embedding[0].in_features  # = block_channels[0]
    return time_embedding(timestep_embedding(t, width).to(like.dtype))  # (B, time_embed_dim)


def down_blocks(cfg: UNetConfig) -> nn.ModuleList:
    """One ``DownBlock`` per resolution; every one but the last halves the side."""
    ch, blocks, cin = cfg.block_channels, nn.ModuleList(), cfg.block_channels[0]
    for i, c in enumerate(ch):
        blocks.append(DownBlock(cin, c, cfg, cfg.attention[i], downsample=i < len(ch) - 1))
        cin = c
    return blocks


def run_down_blocks(blocks: nn.ModuleList, x: torch.Tensor, temb: torch.Tensor,
                    context: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The down path from ``conv_in``'s output: (lowest-resolution features, every skip connection, conv_in's first)."""
    skips = [x]
    for block in blocks:
        x, s = block(x, temb, context)
        skips += s
    return x, skips


def skip_channels(config: UNetConfig) -> list[int]:
    """Channels of every skip connection for ``config``, in the order the down path produces them (conv_in first)."""
    ch, n = config.block_channels, config.layers_per_block
    out = [ch[0]]
    for i, c in enumerate(ch):
        out += [c] * n + ([c] if i < len(ch) - 1 else [])
    return out


class UNet(nn.Module):
    """eps_theta(x_t, t, text hidden states). Call as ``unet(x_t, t, context)``: the samplers' model signature."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or UNetConfig()
        ch = cfg.block_channels
        self.time_embedding = time_embedding_mlp(cfg)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = down_blocks(cfg)
        self.mid_block = MidBlock(ch[-1], cfg)
        skips = self.skip_channels()
        cin = ch[-1]
        self.up_blocks = nn.ModuleList()
        for i, c in enumerate(reversed(ch)):
            level = len(ch) - 1 - i
            mine = [skips.pop() for _ in range(cfg.layers_per_block + 1)]
            self.up_blocks.append(UpBlock(cin, c, mine, cfg, cfg.attention[level], upsample=level > 0))
            cin = c
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def skip_channels(self) -> list[int]:
        """Channels of every skip connection, in the order the down path produces them
        (conv_in first). A ControlNet returns one residual of each of these widths."""
        return skip_channels(self.config)

    def skip_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """(channels, height, width) of every skip connection for a (B, 4, height, width) latent."""
        ch, n = self.config.block_channels, self.config.layers_per_block
        out, h, w = [(ch[0], height, width)], height, width
        for i, c in enumerate(ch):
            out += [(c, h, w)] * n
            if i < len(ch) - 1:
                h, w = (h + 1) // 2, (w + 1) // 2
                out.append((c, h, w))
        return out

    def embed_time(self, timestep: torch.Tensor | float | int, batch: int, like: torch.Tensor) -> torch.Tensor:
        """Timesteps (scalar or (B,)) -> (B, time_embed_dim) in ``like``'s dtype and device."""
        return embed_time(self.time_embedding, timestep, batch, like)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                down_block_additional_residuals: list[torch.Tensor] | tuple | None = None,
                mid_block_additional_residual: torch.Tensor | None = None) -> torch.Tensor:
        """sample (B, 4, h, w) noisy latents; timestep scalar or (B,); encoder_hidden_states (B, L, context_dim).

        Optional ControlNet residuals are added to the skip connections and the mid block output.
        Returns the model output (B, 4, h, w): the predicted noise for ``prediction_type="epsilon"``.
        """
        cfg = self.config
        if sample.dim() != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, {cfg.in_channels}, h, w) latents, got {tuple(sample.shape)}")
        f = 2 ** (len(cfg.block_channels) - 1)
        if sample.shape[-1] % f or sample.shape[-2] % f:
            raise ValueError(f"latent height and width must be multiples of {f}, got {tuple(sample.shape[-2:])}")
        if encoder_hidden_states is None or encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[-1] != cfg.context_dim:
            got = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(f"encoder_hidden_states must be the text encoder's (B, L, {cfg.context_dim}) hidden "
                             f"states (encode \"\" for an unconditional pass), got {got}")
        b = sample.shape[0]
        if encoder_hidden_states.shape[0] != b:
            raise ValueError(f"batch mismatch: {b} latents but {encoder_hidden_states.shape[0]} prompts' hidden states")
        context = encoder_hidden_states.to(sample.dtype)
        temb = self.embed_time(timestep, b, sample)

        x, skips = run_down_blocks(self.down_blocks, self.conv_in(sample), temb, context)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"expected {len(skips)} down-block residuals (one per skip connection), "
                                 f"got {len(down_block_additional_residuals)}")
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]  # new list: no in-place edits
        x = self.mid_block(x, temb, context)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        for block in self.up_blocks:
            x = block(x, skips, temb, context)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
