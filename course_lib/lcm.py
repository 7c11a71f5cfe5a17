"""Sampling in 1 to 4 steps: latent consistency distillation (LCM; Luo et al. 2023, "Latent consistency models").

A diffusion model needs tens of steps because each step follows the probability-flow ODE only a little way.
A *consistency model* f(z_t, t) instead maps any point of an ODE trajectory straight to the trajectory's
start, its clean latent; one evaluation is then a whole sampler. LCM learns f by distilling a trained latent
diffusion model (the teacher, the course's ``unet``), with classifier-free guidance folded in:

    f(z, t) = c_skip(t) z + c_out(t) x0_theta(z, t)     x0_theta: the student U-Net's clean-latent estimate

    c_skip(t) = s^2 / ((10 t)^2 + s^2),  c_out(t) = 10 t / sqrt((10 t)^2 + s^2),  s = 0.5
    (f(z, 0) = z, the boundary condition; for t >= 20 c_skip < 1e-4, so f is almost exactly x0_theta)

One distillation step (the paper's Algorithm 1; diffusers' ``train_lcm_distill_sd_wds.py``):

    t_{n+k} from the 50 DDIM timesteps 999, 979, ..., 19; t_n = t_{n+k} - 20 (the skipping step k = 20)
    z_{t_{n+k}} = sqrt(ab) z0 + sqrt(1 - ab) eps                                  (a training latent, noised)
    teacher, guided:  x0 = x0_c + w (x0_c - x0_u),  eps = eps_c + w (eps_c - eps_u)  (LCM's w = scale - 1)
    one DDIM step of the teacher's ODE:  z_{t_n} = sqrt(ab_n) x0 + sqrt(1 - ab_n) eps
    loss = huber( f_student(z_{t_{n+k}}, t_{n+k}),  f_target(z_{t_n}, t_n) )     (target: EMA of the student)

Sampling (diffusers' ``LCMScheduler``; ``lcm_sample`` gives the same latents, tests/test_lcm.py): at each of
the chosen timesteps, denoise with f, then, unless it is the last step, noise the result back to the next
timestep with *fresh* noise. One step is a single f evaluation from pure noise.

Guidance is distilled in: the student is called once per step with the prompt only (no unconditional pass),
so a 4-step LCM costs 4 network evaluations against 2 x 20 = 40 for the teacher at 20 guided steps.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import data
from .schedules import NoiseSchedule, add_noise, sd_schedule
from .tiny_sd import DEFAULT_GUIDANCE, TinySD
from .unet import UNet
from .weights import WEIGHTS_DIR, load_clip, load_lcm_unet, load_unet, load_vae, save_model

SIGMA_DATA = 0.5  # LCM's boundary-condition constants, as diffusers' LCMScheduler
TIMESTEP_SCALING = 10.0
ORIGINAL_STEPS = 50  # the DDIM solver's timesteps during distillation (k = 1000 / 50 = 20)


def boundary_scalings(t: torch.Tensor | int, timestep_scaling: float = TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at integer timesteps ``t``: f(z, t) = c_skip z + c_out x0, with f(z, 0) = z."""
    scaled = torch.as_tensor(t, dtype=torch.float32) * timestep_scaling
    c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
    c_out = scaled / (scaled ** 2 + SIGMA_DATA ** 2) ** 0.5
    return c_skip, c_out


def ddim_timesteps(original_steps: int = ORIGINAL_STEPS, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The distillation's DDIM timesteps, ascending: k - 1, 2k - 1, ..., 999 with k = 1000 // original_steps."""
    if not isinstance(original_steps, int) or not 1 <= original_steps <= num_train_timesteps:
        raise ValueError(f"original_steps must be an integer in [1, {num_train_timesteps}], got {original_steps!r}")
    k = num_train_timesteps // original_steps
    return torch.arange(1, original_steps + 1) * k - 1


def lcm_timesteps(num_steps: int, original_steps: int = ORIGINAL_STEPS, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The timesteps of an ``num_steps``-step LCM run, as ``LCMScheduler.set_timesteps`` picks them: evenly spaced
    indices into the distillation's DDIM timesteps, from 999 down (1 step: [999]; 4 steps: [999, 759, 499, 259])."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= original_steps:
        raise ValueError(f"num_steps must be an integer from 1 to {original_steps} (the distillation's DDIM steps), "
                         f"got {num_steps!r}")
    origin = ddim_timesteps(original_steps, num_train_timesteps).flip(0)  # (original_steps,) descending
    indices = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
    return origin[torch.from_numpy(indices)]


def x0_from_eps(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """The clean latent implied by a noise prediction: (z - sqrt(1 - ab_t) eps) / sqrt(ab_t); ``t`` is (B,) or an int."""
    ab = schedule.alphas_cumprod.to(z.device)[torch.as_tensor(t, device=z.device).long()]
    ab = ab.reshape(-1, *([1] * (z.dim() - 1))) if ab.dim() else ab
    return (z - (1 - ab).sqrt() * eps) / ab.sqrt()


def consistency_fn(eps: torch.Tensor, z: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """f(z, t) = c_skip(t) z + c_out(t) x0(z, eps, t): the consistency model's output for a U-Net noise prediction."""
    c_skip, c_out = boundary_scalings(t)
    shape = (-1, *([1] * (z.dim() - 1)))
    c_skip, c_out = c_skip.to(z).reshape(shape), c_out.to(z).reshape(shape)
    return c_skip * z + c_out * x0_from_eps(z, eps, t, schedule)


@torch.no_grad()
def lcm_sample(model: Callable, noise: torch.Tensor, num_steps: int, schedule: NoiseSchedule | None = None,
               generator: torch.Generator | None = None, callback: Callable | None = None) -> torch.Tensor:
    """Multistep consistency sampling, as diffusers' ``LCMScheduler``: ``model(z, t)`` -> predicted noise (B, ...).

    At each timestep: denoised = f(z, t); unless it is the last step, z = sqrt(ab_next) denoised +
    sqrt(1 - ab_next) n with fresh noise n drawn from ``generator`` (the last step returns ``denoised``).
    callback(i, t, z, denoised) runs after every step.
    """
    schedule = schedule or sd_schedule()
    timesteps = lcm_timesteps(num_steps, ORIGINAL_STEPS, schedule.num_train_timesteps)
    z = noise.float()
    for i, t in enumerate(timesteps.tolist()):
        tt = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        denoised = consistency_fn(model(z, tt).float(), z, tt, schedule)
        if i + 1 < len(timesteps):
            ab_next = schedule.alphas_cumprod[int(timesteps[i + 1])].to(z.device)  # float32, as the scheduler's
            fresh = torch.randn(z.shape, generator=generator, device=generator.device if generator is not None
                                else z.device).to(z)
            z = ab_next.sqrt() * denoised + (1 - ab_next).sqrt() * fresh
        else:
            z = denoised
        if callback is not None:
            callback(i, t, z, denoised)
    return z


class LCMSD(TinySD):
    """``TinySD`` with a latent-consistency U-Net: 1 to 4 steps, one network evaluation each, guidance built in."""

    sampler_name = "lcm"  # how the model cards name its sampler

    def generate(self, prompts: str | list[str], num_steps: int = 4, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 callback: Callable | None = None, return_latents: bool = False, **unsupported):
        """Images (B, 3, 64, 64) in [-1, 1] for ``prompts`` in ``num_steps`` (1 to 50) consistency steps.

        guidance_scale: only the scale the model was distilled at (its card's ``guidance_scale``) or None:
        guidance is inside the weights, so there is no unconditional pass to mix.
        """
        if unsupported:
            raise ValueError(f"LCMSD.generate does not take {sorted(unsupported)}: a consistency model samples with "
                             f"its own multistep rule (course_lib.lcm.lcm_sample)")
        distilled = getattr(self.unet, "distilled_guidance", None)
        if guidance_scale is not None and distilled is not None and float(guidance_scale) != distilled:
            raise ValueError(f"this LCM was distilled at guidance scale {distilled:g}; guidance is built into its "
                             f"weights, so it cannot sample at {guidance_scale} (pass None)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("give at least one prompt")
        cond, _ = self.prompt_states(prompts, None, guided=False)
        latents = self.starting_latents(len(prompts), latents, generator)
        z = lcm_sample(lambda x, t: self.unet(x.to(self.dtype), t, cond), latents.to(self.device), num_steps,
                       self.schedule, generator, callback)
        images = self.decode_latents(z.to(self.dtype))
        return (images, z) if return_latents else images


def load_lcm_sd(device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                weights_dir: str | Path | None = None) -> LCMSD:
    """The shipped VAE and CLIP with the distilled U-Net ``weights/lcm_unet.safetensors``."""
    sd = LCMSD.from_models(load_vae(weights_dir, device, dtype), load_clip(weights_dir, device, dtype),
                           load_lcm_unet(weights_dir, device, dtype))
    return sd


# --- Distillation. -------------------------------------------------------------------------------------------

@dataclass
class LCMTraining:
    steps: int = 800  # optimiser steps (LCM distils SD 1.5 in ~4,000 steps of batch 72 x 8 GPUs)
    batch_size: int = 32  # latents per step
    n_scenes: int = 5_000  # training scenes encoded once (latents, text states), as for the U-Net
    # AdamW learning rate, constant after a 100-step warm-up; the student starts as the teacher. Trial runs (4-step
    # adherence on the card's 64 prompts): 1e-4 gave 27% after 100 steps; 3e-4 gave 33% after 150 and 45% after 300.
    lr: float = 3e-4
    guidance_scale: float = DEFAULT_GUIDANCE  # the teacher's guidance folded into the student (LCM's w = scale - 1)
    original_steps: int = ORIGINAL_STEPS  # DDIM solver steps (skipping step k = 1000 / original_steps)
    huber_c: float = 0.001  # pseudo-Huber loss constant (diffusers' script default)
    target_ema: float = 0.95  # the target network is an EMA of the student (LCM: mu = 0.95)
    eval_captions: int = 64  # held-out one-object captions for the card's quick check
    seed: int = 0


def quick_lcm() -> LCMTraining:
    """A seconds-long run, for smoke tests."""
    return LCMTraining(steps=5, batch_size=8, n_scenes=256, eval_captions=4)


def distillation_loss(student: UNet, target: UNet, teacher: UNet, z0: torch.Tensor, context: torch.Tensor,
                      empty: torch.Tensor, g: torch.Generator, tc: LCMTraining,
                      schedule: NoiseSchedule) -> torch.Tensor:
    """The latent consistency distillation loss of one batch (module docstring): draws t and the noise from ``g``."""
    b, device = z0.shape[0], z0.device
    solver = ddim_timesteps(tc.original_steps, schedule.num_train_timesteps).to(device)
    k = schedule.num_train_timesteps // tc.original_steps
    index = torch.randint(0, tc.original_steps, (b,), generator=g, device=g.device).to(device)
    t_start = solver[index]  # t_{n+k}
    t_end = (t_start - k).clamp(min=0)  # t_n
    eps = torch.randn(z0.shape, generator=g, device=g.device).to(z0)
    z_start = add_noise(z0, eps, t_start, schedule)
    f_student = consistency_fn(student(z_start, t_start, context), z_start, t_start, schedule)
    with torch.no_grad():
        both = teacher(torch.cat([z_start, z_start]), torch.cat([t_start, t_start]),
                       torch.cat([context, empty.expand_as(context)]))
        eps_c, eps_u = both.chunk(2)
        w = tc.guidance_scale - 1.0  # LCM's guidance: cond + w (cond - uncond)
        eps_g = eps_c + w * (eps_c - eps_u)
        x0_g = x0_from_eps(z_start, eps_g, t_start, schedule)  # linear in eps: the same as guiding the x0s
        ab_end = torch.where(t_start - k >= 0, schedule.alphas_cumprod.to(device)[t_end],
                             schedule.alphas_cumprod[0].to(device)).reshape(-1, 1, 1, 1)
        z_end = ab_end.sqrt() * x0_g + (1 - ab_end).sqrt() * eps_g  # one DDIM step of the guided teacher
        f_target = consistency_fn(target(z_end, t_end, context), z_end, t_end, schedule)
    return (((f_student - f_target) ** 2 + tc.huber_c ** 2).sqrt() - tc.huber_c).mean()


def distill_lcm(scenes: data.Scenes, heldout: data.Scenes, data_cfg=None, tc: LCMTraining | None = None,
                out_dir: str | Path = WEIGHTS_DIR, device="cpu", quiet: bool = False,
                measure: Callable[[UNet], dict] | None = None) -> UNet:
    """Distil the U-Net in ``out_dir`` (the teacher) into ``lcm_unet``: student and target start as the teacher;
    the student learns by ``distillation_loss``, the target follows it as an EMA, the student is shipped.
    Writes ``lcm_unet.safetensors`` and its card (with a quick 4-step adherence check when an evaluator is there)."""
    from .evaluator import load_evaluator, prompt_adherence
    from .train import DataSettings, EncodedScenes, LossLog, _bar, _card, _sha_or_none, batches, lr_at

    tc = tc or LCMTraining()
    data_cfg = data_cfg or DataSettings()
    started, cpu_started = time.time(), time.process_time()
    vae = load_vae(out_dir, device=device).eval().requires_grad_(False)
    clip = load_clip(out_dir, device=device).eval().requires_grad_(False)
    teacher = load_unet(out_dir, device=device).eval().requires_grad_(False)
    torch.manual_seed(tc.seed)
    g = torch.Generator().manual_seed(tc.seed)  # everything random is drawn on the CPU, then moved: same on a GPU
    n = min(len(scenes), tc.n_scenes)
    encoded = EncodedScenes.encode(vae, clip, scenes, n, device)
    schedule = sd_schedule()
    student = UNet(teacher.config).to(device)
    student.load_state_dict(teacher.state_dict())
    target = UNet(teacher.config).to(device).requires_grad_(False)
    target.load_state_dict(teacher.state_dict())
    opt = torch.optim.AdamW(student.parameters(), lr=tc.lr, weight_decay=0.0)
    log = LossLog()
    prep_s = time.time() - started
    with _bar(tc.steps, "lcm_unet", quiet) as bar:
        for step, idx in enumerate(batches(n, tc.batch_size, tc.steps, g)):
            z0 = encoded.scale * (encoded.mean[idx.to(device)] + encoded.std[idx.to(device)]
                                  * torch.randn(encoded.mean[:len(idx)].shape, generator=g).to(device))
            context = encoded.states[encoded.caption_index[idx].to(device)]
            loss = distillation_loss(student, target, teacher, z0, context, encoded.empty, g, tc, schedule)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, tc.steps, tc.lr, warmup=min(100, tc.steps // 5 + 1), cosine=False)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                for pt, ps in zip(target.parameters(), student.parameters()):
                    pt.lerp_(ps, 1 - tc.target_ema)
            log.add(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.5f}", refresh=False)
    train_s = time.time() - started - prep_s
    student.eval().requires_grad_(False)
    metrics = {}
    if measure is not None:
        metrics = measure(student)
    elif tc.eval_captions and (Path(out_dir) / "evaluator.json").exists():
        captions = [c for c, k in zip(heldout.captions, heldout.n_objects.tolist()) if k == 1][:tc.eval_captions]
        images = LCMSD.from_models(vae, clip, student).generate(captions, num_steps=4,
                                                               generator=torch.Generator().manual_seed(0))
        result = prompt_adherence(images, captions, load_evaluator(out_dir, device=device))
        metrics = {"adherence_one_object_lcm4": result["adherence"], "per_attribute": result["per_attribute"],
                   "n_captions": len(captions), "full_benchmark": "benchmarks/bench_flow.py"}
    card = _card(data_cfg, tc, log, metrics, started, device)
    card.update({"training_time_s": round(prep_s + train_s, 1), "cpu_time_s": round(time.process_time() - cpu_started, 1),
                 "wall_time_breakdown_s": {"pre_encode": round(prep_s, 1), "distil": round(train_s, 1)},
                 "teacher": "unet", "teacher_sha256": _sha_or_none(out_dir, "unet"), "guidance_scale": tc.guidance_scale,
                 "objective": "latent consistency distillation (Luo et al. 2023), DDIM solver, skipping step "
                              f"{schedule.num_train_timesteps // tc.original_steps}; sample with course_lib.lcm.LCMSD"})
    card["stored_as"] = "float16 (loads as float32); the card's metrics were measured before rounding"
    save_model(student, "lcm_unet", student.config, card, out_dir, dtype=torch.float16)  # a third U-Net: half the file
    return student

