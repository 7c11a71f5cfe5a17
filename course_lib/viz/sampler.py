"""Running the course's samplers on the tiny SD with full control of the timesteps, for lesson 5.

``TinySD.generate`` takes a step count and always uses SD's "leading" spacing; lesson 5 ("DDIM and
modern samplers") compares spacings and samplers from the same starting noise, so it calls the
samplers through ``sample_latents`` here. The samplers themselves are ``course_lib.samplers``;
names (alpha_bar, sigma, ...) follow the notation block in ``course_lib/schedules.py``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..guidance import guided_model
from ..samplers import SAMPLERS, sample
from ..schedules import Spacing, make_timesteps


def sampler_timesteps(name: str, num_steps: int, spacing: Spacing = "trailing",
                      num_train_timesteps: int = 1000) -> torch.Tensor:
    """The timesteps `name` visits for `num_steps` steps of `spacing`, as the course runs them.

    "trailing" starts every sampler at the last training timestep (999), which is what makes
    1- and 2-step sampling work at all; DPM-Solver++ takes diffusers' "one more point, drop the
    last" spacing (``count_final_step``) for "leading" and "linspace".
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    count_final = name == "dpmpp_2m" and spacing != "trailing"
    return make_timesteps(num_steps, num_train_timesteps, spacing, 1, count_final_step=count_final)


@torch.no_grad()
def sample_latents(sd, prompts: Sequence[str], noise: torch.Tensor, sampler: str = "ddim",
                   timesteps: torch.Tensor | int = 20, guidance_scale: float = 5.0,
                   generator: torch.Generator | None = None, callback: Callable | None = None,
                   **sampler_kwargs) -> torch.Tensor:
    """Final scaled latents (B, 4, h, w) for `prompts`, from `noise` (B, 4, h, w), with any timesteps.

    The same steps as ``TinySD.generate`` (classifier-free guidance against the empty prompt, one
    batched U-Net pass per step), but `timesteps` may be any decreasing tensor (e.g. from
    ``sampler_timesteps``); an int N means SD's N "leading" steps. `generator` feeds the noise that
    stochastic samplers (DDPM, DDIM with eta > 0, Euler ancestral) add; pass a fresh one per run
    to compare runs on equal terms.
    """
    prompts = list(prompts)
    if noise.shape[0] != len(prompts):
        raise ValueError(f"need one starting latent per prompt: {len(prompts)} prompts, noise {tuple(noise.shape)}")
    cond = sd.encode_prompt(prompts)
    uncond = sd.encode_prompt([""] * len(prompts)) if guidance_scale != 1.0 else None
    model = guided_model(sd.unet, cond, uncond, guidance_scale)
    x = noise.to(sd.device, sd.dtype)
    return sample(sampler, model, x, sd.schedule, timesteps, None, prediction_type=sd.unet.config.prediction_type,
                  generator=generator, callback=callback, **sampler_kwargs)
