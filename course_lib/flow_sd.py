"""The tiny Stable Diffusion trained as SD 3 is: a rectified flow (lesson 11).

``flow_unet`` is the course's U-Net (same size, same VAE latents, same frozen text tower) trained with
the rectified-flow objective instead of DDPM's noise prediction (``train.train_unet`` with
``FlowUNetTraining``)::

    z_sigma = (1 - sigma) z0 + sigma eps        sigma ~ logit-normal (SD 3's eq. 19, m = 0, s = 1)
    loss    = | v_theta(z_sigma, 1000 sigma, text) - (eps - z0) |^2

``FlowSD`` samples it with Euler steps on the flow ODE dz/dsigma = v, from sigma = 1 (noise) to 0, on the
sigma schedule of diffusers' ``FlowMatchEulerDiscreteScheduler`` (``flow.flow_sigmas``, with SD 3's shift),
under classifier-free guidance on the velocity: v = v_u + w (v_c - v_u). Guidance works on a velocity as on a
noise prediction: since E[eps | z] = z + (1 - sigma) v and the score is -E[eps | z] / sigma, the velocity is an
affine function of the score, so mixing two velocities mixes two scores, what classifier-free guidance does
in SD 1.x.

Everything else (text encoding, the VAE, the prompt format) is ``TinySD``'s: the two models differ only in
what their U-Net learned to predict and how a sampler walks from noise to data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .flow import euler_step, flow_sigmas, uniform_sigmas
from .guidance import guided_model
from .tiny_sd import DEFAULT_GUIDANCE, TinySD
from .weights import load_clip, load_flow_unet, load_vae

NUM_TRAIN_TIMESTEPS = 1000  # the U-Net is called with timestep = sigma * 1000, as SD 3's transformer
DEFAULT_SHIFT = 1.0  # SD 3 uses 3.0 at 1024x1024; the course's 16x16 latents need no shift (lesson 11 measures it)


class FlowSD(TinySD):
    """``TinySD`` with a flow-matching U-Net: Euler on the flow ODE instead of a DDPM sampler."""

    sampler_name = "flow_euler"  # how the model cards name its sampler

    def generate(self, prompts: str | list[str], num_steps: int = 20, guidance_scale: float = DEFAULT_GUIDANCE,
                 negative_prompt: str | list[str] | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, shift: float = DEFAULT_SHIFT, schedule: str = "diffusers",
                 callback: Callable | None = None, return_latents: bool = False,
                 return_trajectory: bool = False, **unsupported):
        """Images (B, 3, 64, 64) in [-1, 1] for ``prompts``: ``num_steps`` Euler steps (one guided U-Net pass each).

        schedule: "diffusers" (``flow.flow_sigmas``: what ``FlowMatchEulerDiscreteScheduler`` does, its last
        step only from 1/1000 to 0) or "uniform" (``flow.uniform_sigmas``: n equal steps, better at 1-4 steps).
        shift: SD 3's timestep shift (1: none). callback(i, sigma, z, v) runs after every step.
        return_latents: also return the final latents; return_trajectory: instead, every latent of the
        path, (num_steps + 1, B, 4, 16, 16), for measuring how straight it is.
        """
        if unsupported:
            raise ValueError(f"FlowSD.generate does not take {sorted(unsupported)} (the DDPM samplers' options): "
                             f"it always integrates the flow ODE with Euler steps")
        if self.unet.config.prediction_type != "flow_prediction":
            raise ValueError(f"FlowSD needs a flow-matching U-Net (prediction_type 'flow_prediction'), this one "
                             f"predicts {self.unet.config.prediction_type!r}: use TinySD")
        if schedule not in ("diffusers", "uniform"):
            raise ValueError(f"schedule must be 'diffusers' or 'uniform', got {schedule!r}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("give at least one prompt")
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        w = float(guidance_scale)
        if not w >= 1.0 or w != w or w == float("inf"):
            raise ValueError(f"guidance_scale must be >= 1 (1 means no guidance), got {guidance_scale}")
        b = len(prompts)
        cond, uncond = self.prompt_states(prompts, negative_prompt, guided=w != 1.0)
        latents = self.starting_latents(b, latents, generator)
        model = guided_model(self.unet, cond, uncond, w)
        sigmas = (flow_sigmas(num_steps, shift, NUM_TRAIN_TIMESTEPS) if schedule == "diffusers"
                  else uniform_sigmas(num_steps, shift))
        z = latents.to(self.device, torch.float32)
        path = [z]
        with torch.no_grad():
            for i in range(num_steps):
                sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
                t = torch.full((b,), sigma * NUM_TRAIN_TIMESTEPS, device=self.device)
                v = model(z.to(self.dtype), t, None).float()
                z = euler_step(z, v, sigma, sigma_next)
                path.append(z)
                if callback is not None:
                    callback(i, sigma, z, v)
        images = self.decode_latents(z.to(self.dtype))
        if return_trajectory:
            return images, torch.stack(path)
        return (images, z) if return_latents else images


def load_flow_sd(device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 weights_dir: str | Path | None = None) -> FlowSD:
    """The shipped VAE and CLIP with the flow-matching U-Net ``weights/flow_unet.safetensors``."""
    return FlowSD.from_models(load_vae(weights_dir, device, dtype), load_clip(weights_dir, device, dtype),
                              load_flow_unet(weights_dir, device, dtype))
