"""ControlNet (Zhang, Rao & Agrawala 2023): steer a frozen Stable Diffusion with an edge map. Lesson 6.

A text prompt says *what* to draw; a ControlNet says *where*. It is a trainable copy of the
U-Net's encoder half (``conv_in``, ``time_embedding``, ``down_blocks``, ``mid_block``), started
from the base weights, that also reads a control image (here an edge map). Its features come
back into the frozen U-Net through **zero convolutions**: 1x1 convs whose weight and bias start
at exactly 0, one per skip connection and one after the middle block::

    control image c (B,1,64,64) -> ConditioningEncoder -> (B,32,8,8) --+   (zero-initialised last conv)
    x_t (B,4,8,8) -> conv_in (copy) ---------------------------------- + -> down_blocks (copy) -> mid_block (copy)
                                                                  every skip s_k |               | h_mid
                                                                      Z_k(s_k) * scale     Z_mid(h_mid) * scale
                                                                             v                    v
    frozen U-Net:           skip_k + Z_k(s_k) * scale  ............  mid output + Z_mid(h_mid) * scale

In the paper's notation (eq. 2): y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2),
with F(.; Theta) the frozen block, F(.; Theta_c) its trainable copy and Z the zero convolutions.
Code names -> paper symbols:
    controlnet_cond_embedding       the tiny encoder of c (paper: E), its last conv is Z(.; Theta_z1)
    down_blocks, mid_block          F(.; Theta_c), the trainable copy
    controlnet_down_blocks, _mid    Z(.; Theta_z2), one zero conv per skip connection / after the mid block
    conditioning_scale              multiplies every residual (0: off, exactly; 1: as trained)

Why it starts as an exact no-op: every residual is Z(...) = 0 * features + 0 = 0 at
initialisation, so the U-Net computes exactly what it computed before (tests/test_controlnet.py
checks it bit for bit). Yet Z still learns: dZ/dW = features != 0, so the first gradient step
moves the zero convs off zero (lesson 6's exercise on the zero convolution works it out).

The names mirror diffusers' ``ControlNetModel`` (``controlnet_cond_embedding``,
``controlnet_down_blocks``, ``controlnet_mid_block``, ``from_unet``, ``conditioning_scale``), and
tests/test_controlnet_diffusers_parity.py proves both compute the same residuals with copied weights.
Several controls combine by summing their residuals, each with its own scale (``MultiControlNet``,
diffusers' ``MultiControlNetModel``), and each can act on a window of the sampling steps only
(``Control.start``/``end``, diffusers' ``control_guidance_start``/``end``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .unet import MidBlock, UNet, UNetConfig, down_blocks, embed_time, run_down_blocks, skip_channels, time_embedding_mlp

ENCODER_PARTS = ("time_embedding", "conv_in", "down_blocks", "mid_block")  # what ControlNet copies from the U-Net


@dataclass
class ControlNetConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)  # the base U-Net's config: the copy has its encoder layout
    conditioning_channels: int = 1  # channels of the control image: 1 for an edge map (diffusers: 3, RGB)
    conditioning_block_channels: tuple = (8, 16, 32)  # control encoder widths at 64, 32, 16 px: factor 4, the VAE's (diffusers: (16, 32, 96, 256), factor 8)

    def __post_init__(self):
        if isinstance(self.unet, dict):  # a model card stores the nested config as a dict
            self.unet = UNetConfig(**self.unet)
        if not isinstance(self.unet, UNetConfig):
            raise ValueError(f"unet must be a UNetConfig, got {type(self.unet).__name__}")
        self.conditioning_block_channels = tuple(self.conditioning_block_channels)
        if len(self.conditioning_block_channels) < 1 or min(self.conditioning_block_channels) < 1:
            raise ValueError(f"conditioning_block_channels needs at least one positive width, "
                             f"got {self.conditioning_block_channels}")
        if self.conditioning_channels < 1:
            raise ValueError(f"conditioning_channels must be >= 1, got {self.conditioning_channels}")

    @property
    def downsample_factor(self) -> int:
        """Control image side / latent side: one stride-2 conv per step between widths (4 for 64 px -> 16 latents)."""
        return 2 ** (len(self.conditioning_block_channels) - 1)


def zero_conv(channels: int) -> nn.Conv2d:
    """A 1x1 convolution whose weight and bias are exactly zero: its output is 0 for any input."""
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ConditioningEncoder(nn.Module):
    """The control image (B, C, 64, 64) -> features (B, block_channels[0] of the U-Net, 64 / f, 64 / f).

    conv-SiLU, then per width: conv-SiLU and a stride-2 conv-SiLU, then a zero-initialised conv
    (diffusers: ``ControlNetConditioningEmbedding``, with the same parameter names).
    """

    def __init__(self, in_channels: int, block_channels: Sequence[int], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for cin, cout in zip(block_channels[:-1], block_channels[1:]):
            self.blocks.append(nn.Conv2d(cin, cin, 3, padding=1))
            self.blocks.append(nn.Conv2d(cin, cout, 3, padding=1, stride=2))  # halves the side
        self.conv_out = nn.Conv2d(block_channels[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # zero at the start too: the copy first sees the plain latents
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self.conv_in(cond))
        for conv in self.blocks:
            h = nn.functional.silu(conv(h))
        return self.conv_out(h)  # (B, out_channels, H / f, W / f)


class ControlNet(nn.Module):
    """Residuals for the frozen U-Net from a control image. Build one with ``ControlNet.from_unet(unet)``.

    ``ControlNet(config)`` alone builds a randomly initialised copy (what ``load_controlnet`` fills
    with trained weights); ``from_unet`` starts the copy from a trained U-Net, as training must.
    """

    def __init__(self, config: ControlNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or ControlNetConfig()
        u = cfg.unet
        ch = u.block_channels
        # The trainable copy: UNet's encoder half, built by the same functions of unet.py and so with the
        # same parameter names (from_unet overwrites them with copies). The order of construction is the
        # order of random initialisation: keep it, or retrained weights change.
        self.time_embedding = time_embedding_mlp(u)
        self.conv_in = nn.Conv2d(u.in_channels, ch[0], 3, padding=1)
        self.controlnet_cond_embedding = ConditioningEncoder(cfg.conditioning_channels,
                                                             cfg.conditioning_block_channels, ch[0])
        self.down_blocks = down_blocks(u)
        self.mid_block = MidBlock(ch[-1], u)
        # The zero convolutions: one per skip connection of the U-Net, one after the middle block.
        self.controlnet_down_blocks = nn.ModuleList(zero_conv(c) for c in skip_channels(u))
        self.controlnet_mid_block = zero_conv(ch[-1])

    @classmethod
    def from_unet(cls, unet: UNet, conditioning_channels: int = 1,
                  conditioning_block_channels: Sequence[int] | None = None) -> "ControlNet":
        """A ControlNet whose encoder copy starts as an exact copy of ``unet``'s (zero convs at 0).

        The copy gets its own tensors (``copy.deepcopy``), on the U-Net's device and dtype, and is
        trainable even if the U-Net is frozen. The U-Net itself is not touched.
        """
        if not isinstance(unet, UNet):
            raise ValueError(f"from_unet needs the course's UNet, got {type(unet).__name__}")
        if conditioning_block_channels is None:
            conditioning_block_channels = ControlNetConfig.conditioning_block_channels
        config = ControlNetConfig(unet=dataclasses.replace(unet.config), conditioning_channels=conditioning_channels,
                                  conditioning_block_channels=tuple(conditioning_block_channels))
        net = cls(config)
        for name in ENCODER_PARTS:
            setattr(net, name, copy.deepcopy(getattr(unet, name)))  # same weights, separate tensors
        p = next(unet.parameters())
        return net.to(device=p.device, dtype=p.dtype).requires_grad_(True).train(unet.training)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: float = 1.0) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The residuals for ``unet(sample, timestep, encoder_hidden_states, down, mid)``.

        sample (B, 4, h, w) noisy latents; timestep scalar or (B,); encoder_hidden_states (B, L, D);
        controlnet_cond (B, conditioning_channels, h * f, w * f) control image, f = ``downsample_factor`` (4; an edge map:
        float, 0 or 1). Returns (down_residuals: one (B, C_k, h_k, w_k) per skip connection, in
        the order the U-Net makes them; mid_residual (B, C_last, h', w') at the middle block's
        resolution), all times ``conditioning_scale``.
        """
        cfg, u = self.config, self.config.unet
        if sample.dim() != 4 or sample.shape[1] != u.in_channels:
            raise ValueError(f"sample must be (B, {u.in_channels}, h, w) latents, got {tuple(sample.shape)}")
        b, _, h, w = sample.shape
        f = cfg.downsample_factor
        want = (b, cfg.conditioning_channels, h * f, w * f)
        if not isinstance(controlnet_cond, torch.Tensor) or tuple(controlnet_cond.shape) != want:
            got = tuple(controlnet_cond.shape) if isinstance(controlnet_cond, torch.Tensor) else type(controlnet_cond).__name__
            raise ValueError(f"controlnet_cond must have shape {want} (one {h * f}x{w * f} control image per latent), "
                             f"got {got}; edges.to_control(edge_map) makes one from a (B, 1, H, W) edge map")
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != b:
            raise ValueError(f"encoder_hidden_states must be (B={b}, L, {u.context_dim}), got "
                             f"{tuple(encoder_hidden_states.shape)}")
        context = encoder_hidden_states.to(sample.dtype)
        temb = embed_time(self.time_embedding, timestep, b, sample)  # (B, time_embed_dim), as in the U-Net

        x = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond.to(sample.dtype))  # (B, C0, h, w)
        x, skips = run_down_blocks(self.down_blocks, x, temb, context)  # the U-Net's down path, on the copy
        x = self.mid_block(x, temb, context)  # (B, C_last, h', w'): the lowest resolution
        down = [zc(s) * conditioning_scale for zc, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x) * conditioning_scale
        return down, mid


def sum_residuals(residuals: Sequence[tuple[list[torch.Tensor], torch.Tensor]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Combine several controls: add their down residuals skip by skip, and their mid residuals."""
    if not residuals:
        raise ValueError("sum_residuals needs at least one (down, mid) pair")
    down, mid = list(residuals[0][0]), residuals[0][1]
    for d, m in residuals[1:]:
        if len(d) != len(down):
            raise ValueError(f"controls disagree on the number of skip connections: {len(down)} vs {len(d)}")
        down = [a + b for a, b in zip(down, d)]
        mid = mid + m
    return down, mid


class MultiControlNet(nn.Module):
    """Several ControlNets at once (diffusers: ``MultiControlNetModel``): residuals summed, each with its own scale.

    ``MultiControlNet([edges_net, edges_net])`` is fine too: one ControlNet used with two control
    images (say, a scene's outline and a photo's Canny edges), each weighted on its own.
    """

    def __init__(self, controlnets: Sequence[ControlNet]):
        super().__init__()
        if len(controlnets) == 0:
            raise ValueError("MultiControlNet needs at least one ControlNet")
        first = controlnets[0].config.unet
        for k, net in enumerate(controlnets):
            if net.config.unet != first:
                raise ValueError(f"ControlNet {k} was built for a different U-Net config than ControlNet 0")
        self.nets = nn.ModuleList(controlnets)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                controlnet_cond: Sequence[torch.Tensor], conditioning_scale: Sequence[float]
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        if len(controlnet_cond) != len(self.nets) or len(conditioning_scale) != len(self.nets):
            raise ValueError(f"give one control image and one scale per ControlNet ({len(self.nets)}), got "
                             f"{len(controlnet_cond)} images and {len(conditioning_scale)} scales")
        return sum_residuals([net(sample, timestep, encoder_hidden_states, c, s)
                              for net, c, s in zip(self.nets, controlnet_cond, conditioning_scale)])


# --- Generation with control. ---------------------------------------------------------------------

@dataclass
class Control:
    """One control unit, as a ControlNet UI shows it: a ControlNet, its image, a weight and a step window."""

    controlnet: ControlNet
    image: torch.Tensor  # (B or 1, C, 64, 64) control image, e.g. edges.to_control(scenes.edges[:B])
    scale: float = 1.0  # conditioning scale ("control weight"): 0 is exactly the base model, 1 as trained
    start: float = 0.0  # fraction of the sampling steps before which this control is off ("guidance start")
    end: float = 1.0  # fraction of the steps after which it is off again ("guidance end")

    def __post_init__(self):
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"need 0 <= start < end <= 1 (fractions of the sampling steps), got start={self.start}, "
                             f"end={self.end}")
        if not isinstance(self.image, torch.Tensor) or self.image.dim() != 4:
            raise ValueError("image must be a (B, C, H, W) control image tensor; edges.to_control(edge_map) makes one")

    def active_at(self, step: int, num_steps: int) -> bool:
        """Does this control act at step ``step`` of ``num_steps``? (diffusers' ``controlnet_keep`` rule)"""
        return step / num_steps >= self.start and (step + 1) / num_steps <= self.end


def _repeat_to(image: torch.Tensor, batch: int) -> torch.Tensor:
    """A control batch of 1 or B images -> ``batch`` rows (B, 2B with classifier-free guidance)."""
    n = image.shape[0]
    if n == batch:
        return image
    if n == 1:
        return image.expand(batch, *image.shape[1:])
    if batch == 2 * n:
        return torch.cat([image, image])  # classifier-free guidance: the [uncond, cond] halves see the same controls
    raise ValueError(f"got {n} control images for a batch of {batch} latents; give 1 or one per prompt")


class ControlledUNet(nn.Module):
    """The frozen U-Net plus its controls, called like the U-Net: ``model(sample, timestep, text_states)``.

    Samplers, classifier-free guidance and ``TinySD.generate`` need no change: wherever a U-Net goes,
    this goes. Each call runs the active ControlNets on the same (sample, timestep, text) batch the
    U-Net sees, so with guidance both the unconditional and the conditional half get the control
    residuals, as in diffusers' ``StableDiffusionControlNetPipeline``. A control that is off at a
    step (scale 0 or outside its start/end window) is skipped: diffusers runs it and multiplies by
    0, which gives the same numbers.
    timesteps: the timesteps the sampler will visit (noisiest first); needed only to place the
    start/end windows, by looking each call's timestep up in it.
    """

    def __init__(self, unet: UNet, controls: Sequence[Control], timesteps: torch.Tensor | None = None):
        super().__init__()
        for k, c in enumerate(controls):
            if not isinstance(c, Control):
                raise ValueError(f"controls[{k}] must be a Control, got {type(c).__name__}")
            if c.controlnet.config.unet != unet.config:
                raise ValueError(f"controls[{k}]'s ControlNet was made for another U-Net config; build it with "
                                 "ControlNet.from_unet(unet) or load the one trained for this U-Net")
            windowed = c.start > 0.0 or c.end < 1.0
            if windowed and timesteps is None:
                raise ValueError("a control with start/end other than 0/1 needs the sampler's timesteps")
        self.unet = unet
        self.controlnets = nn.ModuleList(c.controlnet for c in controls)  # registered: device and dtype follow
        self.controls = list(controls)
        self.timesteps = None if timesteps is None else torch.as_tensor(timesteps).detach().cpu().double()

    @property
    def config(self) -> UNetConfig:
        return self.unet.config

    def step_of(self, timestep: torch.Tensor) -> int:
        """Index of ``timestep`` in the sampler's timesteps (the nearest one)."""
        t = float(torch.as_tensor(timestep).flatten()[0])
        return int((self.timesteps - t).abs().argmin())

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        b = sample.shape[0]
        step = self.step_of(timestep) if self.timesteps is not None else 0
        n = len(self.timesteps) if self.timesteps is not None else 1
        residuals = []
        for c in self.controls:
            if c.scale == 0.0 or not c.active_at(step, n):
                continue
            image = _repeat_to(c.image.to(sample.device, sample.dtype), b)
            residuals.append(c.controlnet(sample, timestep, encoder_hidden_states, image, c.scale))
        if not residuals:
            return self.unet(sample, timestep, encoder_hidden_states)
        down, mid = sum_residuals(residuals)
        return self.unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid)


def _per_control(value, n: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"got {len(values)} values of {name} for {n} controls; give one, or one per control")
    return values


@torch.no_grad()
def generate_with_control(pipe, prompts: str | list[str], control_images: torch.Tensor | Sequence[torch.Tensor],
                          controlnet: ControlNet | Sequence[ControlNet], conditioning_scale: float | Sequence[float] = 1.0,
                          control_guidance_start: float | Sequence[float] = 0.0,
                          control_guidance_end: float | Sequence[float] = 1.0, num_steps: int = 20,
                          **generate_kwargs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``pipe.generate`` with ControlNet control: images (B, 3, 64, 64) in [-1, 1].

    pipe: a ``TinySD`` (``load_tiny_sd()``). control_images: (B or 1, 1, 64, 64) control images
    (``edges.to_control(edge_map)``), or a list of them, one per ControlNet when ``controlnet``
    is a list (several controls: residuals summed). conditioning_scale, control_guidance_start,
    control_guidance_end: one value for all controls or one per control (see ``Control``).
    Everything else (guidance_scale, negative_prompt, sampler, generator, latents, callback, ...)
    goes to ``TinySD.generate`` unchanged; the same seed with scale 0 gives the base model's image.
    """
    from .samplers import default_timesteps

    nets = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
    images = list(control_images) if isinstance(control_images, (list, tuple)) else [control_images]
    if len(images) != len(nets):
        raise ValueError(f"got {len(nets)} ControlNets but {len(images)} control images; give one image per ControlNet")
    scales = _per_control(conditioning_scale, len(nets), "conditioning_scale")
    starts = _per_control(control_guidance_start, len(nets), "control_guidance_start")
    ends = _per_control(control_guidance_end, len(nets), "control_guidance_end")
    controls = [Control(net, image, s, a, e) for net, image, s, a, e in zip(nets, images, scales, starts, ends)]
    n_prompts = 1 if isinstance(prompts, str) else len(prompts)
    for k, c in enumerate(controls):
        if c.image.shape[0] not in (1, n_prompts):
            raise ValueError(f"got {c.image.shape[0]} control images (control {k}) for {n_prompts} prompts; "
                             "give 1 (shared by every prompt) or one per prompt")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    timesteps = default_timesteps(num_steps, pipe.schedule.num_train_timesteps)  # what the sampler will visit
    controlled = ControlledUNet(pipe.unet, controls, timesteps)
    return dataclasses.replace(pipe, unet=controlled).generate(prompts, num_steps=num_steps, **generate_kwargs)


# --- Weights. -------------------------------------------------------------------------------------

def load_controlnet(weights_dir: str | Path | None = None, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None, check_base: bool = True) -> ControlNet:
    """The course's trained edge ControlNet (``weights/controlnet.*``; safetensors, nothing unpickled).

    check_base: refuse a ControlNet trained on another U-Net than the ``unet.*`` beside it (its
    residuals would be meaningless to a retrained U-Net); retrain it with
    ``python -m course_lib.controlnet_train``.
    """
    from .weights import WeightsError, load_model, read_card

    net = load_model("controlnet", ControlNetConfig, ControlNet, weights_dir, device, dtype)
    base_sha = net.card.get("base_unet_sha256")
    if check_base and base_sha is not None:
        try:
            unet_sha = read_card("unet", weights_dir).get("sha256")
        except FileNotFoundError:
            unet_sha = None
        if unet_sha is not None and unet_sha != base_sha:
            raise WeightsError("weights/controlnet.safetensors was trained on a different U-Net than "
                               "weights/unet.safetensors (their model cards' checksums differ). Retrain it with "
                               "`python -m course_lib.controlnet_train`, or pass check_base=False to load it anyway.")
    return net
