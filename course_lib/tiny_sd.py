"""The course's tiny Stable Diffusion: prompt in, 64x64 image out, in seconds on a laptop CPU.

Lesson 7 (the complete pipeline) walks through ``TinySD.generate`` step by step next to
diffusers' ``StableDiffusionPipeline.__call__``; they do the same things in the same order:

1. tokenise the prompt and the negative prompt ("" by default) and run the frozen text tower:
   per-token hidden states (B, 48, 128)                               [encode_prompt]
2. draw the starting latents x_T ~ N(0, I), shape (B, 4, 16, 16), from an explicit generator
3. wrap the U-Net with classifier-free guidance: one batched pass over [uncond, cond]
   per step, eps = eps_u + w (eps_c - eps_u)                          [guidance.guided_model]
4. run a sampler (DDIM by default, 20 steps of SD's "leading" spacing)     [samplers]
5. undo the latent scaling (z / scaling_factor) and decode with the VAE: images in [-1, 1]

Schedule symbols follow the notation block in ``course_lib/schedules.py``.

Every model here was trained by ``python -m course_lib.train`` (see the JSON model cards in
``weights/``). ``load_tiny_sd`` is the only place that reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from .clip import CLIP, Tokenizer
from .guidance import guided_model
from .samplers import SAMPLERS, sample
from .schedules import SPACINGS, NoiseSchedule, Spacing, make_timesteps, sd_schedule
from .unet import UNet
from .vae import VAE
from .weights import load_clip, load_unet, load_vae

# The pipeline's default scale. The model cards' quick checks (64 held-out one-object prompts, DDIM 20) and
# benchmarks/bench_tiny_sd.py's sweep put the course's U-Net's best one-object adherence at 5 or a little above,
# well above 3 and 1; SD 1.5's pipeline default is 7.5.
DEFAULT_GUIDANCE = 5.0


@dataclass
class TinySD:
    """Everything a prompt needs to become an image. Build it with ``load_tiny_sd()``."""

    vae: VAE
    clip: CLIP  # only the text tower (``clip.text``) is used for generation, as in SD
    unet: UNet
    tokenizer: Tokenizer
    schedule: NoiseSchedule

    @classmethod
    def from_models(cls, vae: VAE, clip: CLIP, unet: UNet) -> "TinySD":
        """The pipeline around models already in memory (the training scripts' freshly trained ones),
        with CLIP's tokeniser and SD's noise schedule."""
        return cls(vae=vae, clip=clip, unet=unet, tokenizer=Tokenizer.from_config(clip.config), schedule=sd_schedule())

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def text_encoder(self):
        return self.clip.text

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts -> the text tower's per-token hidden states (B, context_length, width)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = self.tokenizer(prompts).to(self.device)  # (B, L)
        return self.clip.text(ids).last_hidden_state.to(self.dtype)  # (B, L, width)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (what the U-Net works on) -> images in [-1, 1]."""
        return self.vae.decode(latents / self.vae.config.scaling_factor).clamp(-1, 1)

    @torch.no_grad()
    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        """The shape of ``batch`` starting latents: (batch, 4, 16, 16) for the course's factor-4 VAE."""
        side = 64 // self.vae.config.downsample_factor
        return (batch, self.vae.config.latent_channels, side, side)

    def prompt_states(self, prompts: list[str], negative_prompt: str | list[str] | None, guided: bool):
        """(cond, uncond): the text states of the prompts and of the negative prompts ("" by default), the latter
        None when ``guided`` is False (no unconditional pass is needed)."""
        b = len(prompts)
        negative = [""] * b if negative_prompt is None else (
            [negative_prompt] * b if isinstance(negative_prompt, str) else list(negative_prompt))
        if len(negative) != b:
            raise ValueError(f"got {b} prompts but {len(negative)} negative prompts")
        return self.encode_prompt(prompts), (self.encode_prompt(negative) if guided else None)

    def starting_latents(self, batch: int, latents: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        """``latents`` checked against the latent shape, or fresh N(0, I) float32 noise from ``generator``."""
        shape = self.latent_shape(batch)
        if latents is None:
            g_device = generator.device if generator is not None else torch.device("cpu")
            return torch.randn(shape, generator=generator, device=g_device, dtype=torch.float32)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents

    def generate(self, prompts: str | list[str], num_steps: int = 20, guidance_scale: float | list[float] | torch.Tensor = DEFAULT_GUIDANCE,
                 negative_prompt: str | list[str] | None = None, sampler: str = "ddim",
                 generator: torch.Generator | None = None, callback: Callable | None = None,
                 return_latents: bool = False, latents: torch.Tensor | None = None, guidance_rescale: float = 0.0,
                 spacing: Spacing | None = None, rescale_space: str = "prediction",
                 **sampler_kwargs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, 64, 64) in [-1, 1] for ``prompts``.

        guidance_scale: 1 turns guidance off (one U-Net pass per step); above 1 follows the prompt
        more closely; a list or (B,) tensor gives each prompt its own scale. negative_prompt: what guidance steers away from (default "", the
        unconditional prompt). sampler: a key of ``samplers.SAMPLERS``. generator: the source of
        the starting noise (and of the noise stochastic samplers add). latents: start from these
        (B, 4, 16, 16) instead of drawing noise. callback(i, t, x, x0_pred) runs after every step.
        return_latents=True also returns the final scaled latents. spacing: which timesteps the
        num_steps steps visit ("leading", "trailing" or "linspace", see ``schedules.make_timesteps``);
        None keeps the sampler's own default, SD 1.x's "leading". With 1 or 2 steps "leading" starts
        at t = 1 or 501 and cannot remove all the noise: use "trailing" for very few steps.
        guidance_rescale, rescale_space: Lin et al.'s guidance rescale (0: off). "prediction" rescales the
        U-Net's output as diffusers does (the noise, for this epsilon model); "v" rescales in v-space, where the
        paper defines it (ComfyUI's RescaleCFG), which is what removes this model's over-saturation at high
        scales (lesson 4, section 5).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("give at least one prompt")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        if spacing is not None and spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS} (or None)")
        scales = torch.as_tensor(guidance_scale, dtype=torch.float32)
        if scales.ndim > 1 or (scales.ndim == 1 and len(scales) != len(prompts)):
            raise ValueError(f"guidance_scale must be a number or one per prompt ({len(prompts)}), got shape "
                             f"{tuple(scales.shape)}")
        if not torch.isfinite(scales).all() or (scales < 1.0).any():
            raise ValueError(f"guidance_scale must be >= 1 (1 means no guidance), got {guidance_scale}")
        cond, uncond = self.prompt_states(prompts, negative_prompt, guided=bool((scales != 1.0).any()))
        x = self.starting_latents(len(prompts), latents, generator).to(self.device, self.dtype)
        scale = float(scales) if scales.ndim == 0 else scales.to(self.device)
        model = guided_model(self.unet, cond, uncond, scale, guidance_rescale, rescale_space=rescale_space,
                             schedule=self.schedule)
        steps = num_steps if spacing is None else make_timesteps(
            num_steps, self.schedule.num_train_timesteps, spacing, steps_offset=1)
        z = sample(sampler, model, x, self.schedule, steps, None,
                   prediction_type=self.unet.config.prediction_type, generator=generator, callback=callback,
                   **sampler_kwargs)
        images = self.decode_latents(z)
        return (images, z) if return_latents else images


def load_tiny_sd(device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 weights_dir: str | Path | None = None) -> TinySD:
    """Load the shipped VAE, CLIP and U-Net (safetensors + JSON cards; nothing is unpickled)."""
    vae = load_vae(weights_dir, device, dtype)
    clip = load_clip(weights_dir, device, dtype)
    unet = load_unet(weights_dir, device, dtype)
    if unet.config.context_dim != clip.config.width:
        raise ValueError(f"the U-Net expects text states of width {unet.config.context_dim} but the text tower "
                         f"gives {clip.config.width}: the weight files come from different training runs")
    return TinySD.from_models(vae, clip, unet)
