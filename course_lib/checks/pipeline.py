"""Checks for solutions/07_pipeline_exercises.ipynb: the latents a pipeline starts from, and one guided
denoising step as StableDiffusionPipeline takes it (one U-Net call on a doubled batch, CFG, DDIM).

Lesson: notebooks/07_complete_pipeline.ipynb (the complete pipeline).
"""

from __future__ import annotations

import torch

from course_tools.agent import Probe, ProbeDenoiser
from course_tools.checking import Exercise, Run
from course_lib.checks.samplers import ddim_step, linear_alpha_bars

# ==============================================================================================
# Reference implementations
# ==============================================================================================


def latent_shape(batch: int, height: int, width: int, latent_channels: int = 4, factor: int = 8) -> tuple:
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
    return (batch, latent_channels, height // factor, width // factor)


def guided_ddim_step(unet, latents, t, context, uncond_context, guidance_scale, alpha_bar_t, alpha_bar_prev):
    """One U-Net call on [uncond, cond], classifier-free guidance, then a DDIM step (eta = 0)."""
    model_in = torch.cat([latents, latents])  # (2B, C, h, w)
    eps_uncond, eps_cond = unet(model_in, t, torch.cat([uncond_context, context])).chunk(2)  # (B, C, h, w) each
    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    return ddim_step(latents.double(), eps.double(), alpha_bar_t, alpha_bar_prev)


# ==============================================================================================
# Exercise: the guided denoising step
# ==============================================================================================
GUIDED_STEP = Exercise("ex07_guided_denoising_step", "Latents and one guided denoising step",
                       targets=("latent_shape", "prepare_latents", "guided_ddim_step"))


@GUIDED_STEP.check("latent_shape(batch, height, width) for SD-sized images, ValueError otherwise", points=2,
                   hint="(batch, latent_channels, height // factor, width // factor); the VAE only takes sizes "
                        "divisible by its factor, so say so with a ValueError instead of rounding.")
def _(run, learner):
    rng = run.rng(0)
    for args, kw in [((1, 512, 512), {}), ((4, 768, 1344), {}), ((2, 1024, 1024), {"latent_channels": 16}),
                     ((1, int(rng.integers(1, 100)) * 8, int(rng.integers(1, 100)) * 8), {})]:
        got = run.call(learner.latent_shape, *args, **kw)
        run.equal(tuple(got) if isinstance(got, (list, tuple, torch.Size)) else got, latent_shape(*args, **kw),
                  f"latent_shape{args}")
    run.raises("ValueError", learner.latent_shape, 1, 500, 512)


@GUIDED_STEP.check("prepare_latents draws torch.randn(shape, generator=...) scaled by init_noise_sigma", points=2,
                   hint="torch.randn(latent_shape(...), generator=generator) * init_noise_sigma: the same draw as "
                        "diffusers' pipelines, so the same seed gives the same image.")
def _(run, learner):
    for k, (args, sigma) in enumerate([((1, 64, 64), 1.0), ((2, 32, 48), 14.6)]):
        got = run.call(learner.prepare_latents, *args, generator=Probe.of("generator", seed=run.seeds[k]),
                       init_noise_sigma=sigma)
        want = torch.randn(latent_shape(*args), generator=torch.Generator().manual_seed(run.seeds[k])) * sigma
        run.close(got, want, f"prepare_latents{args} with init_noise_sigma={sigma}", rtol=1e-6, atol=1e-6,
                  kind="tensor")


def _step_case(run: Run, k: int, B: int = 2):
    latents = run.randn(B, 4, 8, 8, k=k)
    context = run.randn(B, 5, 8, k=k + 1)
    uncond = torch.zeros(B, 5, 8)
    ab = linear_alpha_bars()
    t, t_prev = [(801, 781), (401, 361), (21, 1)][k % 3]
    return latents, context, uncond, t, float(ab[t]), float(ab[t_prev])


@GUIDED_STEP.check("guided_ddim_step calls the U-Net once, on the doubled batch",
                   hint="Concatenate [latents, latents] and [uncond_context, context] and make one call, as the "
                        "pipelines do: two half-size calls cost more.")
def _(run, learner):
    latents, context, uncond, t, a, a_prev = _step_case(run, 0)
    unet = run.make(Probe.of("denoiser", seed=run.seeds[0]))
    run.call(learner.guided_ddim_step, unet, latents, t, context, uncond, 7.5, a, a_prev)
    calls = run.get(unet.calls, label="the U-Net's call log")
    run.equal([tuple(c) for c in calls], [(4, float(t))], "the U-Net calls as (batch size, t)")


@GUIDED_STEP.check("the step equals CFG on the two halves followed by DDIM (eta = 0)", points=3,
                   hint="eps_uncond, eps_cond = unet(...).chunk(2) in the order you concatenated; eps = eps_uncond + "
                        "scale·(eps_cond - eps_uncond); then x0 = (x - sqrt(1-ᾱ_t)·eps)/sqrt(ᾱ_t) and "
                        "x_prev = sqrt(ᾱ_prev)·x0 + sqrt(1-ᾱ_prev)·eps.")
def _(run, learner):
    for k, scale in enumerate((7.5, 3.0, 12.0)):
        latents, context, uncond, t, a, a_prev = _step_case(run, k)
        unet = Probe.of("denoiser", seed=run.seeds[k % 3])
        got = run.call(learner.guided_ddim_step, unet, latents, t, context, uncond, scale, a, a_prev)
        want = guided_ddim_step(ProbeDenoiser(seed=run.seeds[k % 3]), latents, t, context, uncond, scale, a, a_prev)
        run.close(got, want, f"guided_ddim_step(..., t={t}, guidance_scale={scale})", rtol=1e-4, atol=1e-5,
                  kind="tensor")


@GUIDED_STEP.check("Verify: guidance_scale = 1 gives the conditional-only step",
                   hint="uncond + 1·(cond - uncond) = cond.")
def _(run, learner):
    latents, context, uncond, t, a, a_prev = _step_case(run, 1)
    got = run.call(learner.guided_ddim_step, Probe.of("denoiser", seed=5), latents, t, context, uncond, 1.0, a, a_prev)
    eps = ProbeDenoiser(seed=5)(latents, t, context)
    run.close(got, ddim_step(latents.double(), eps.double(), a, a_prev), "guided_ddim_step(..., guidance_scale=1)",
              rtol=1e-4, atol=1e-5, kind="tensor")
