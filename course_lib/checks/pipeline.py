"""Checks of the complete pipeline: the latents it starts from, one guided denoising step as
StableDiffusionPipeline takes it (one U-Net call on a doubled batch, CFG, DDIM), the shapes through it.

| id | where | kind |
| --- | --- | --- |
| guided_denoising_step | solutions/07_pipeline_exercises.ipynb | graded exercise |
| pipeline_shapes | notebooks/07_complete_pipeline.ipynb | check yourself |
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
GUIDED_STEP = Exercise("guided_denoising_step", "Latents and one guided denoising step",
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


# ==============================================================================================
# Check yourself (notebooks/07_complete_pipeline.ipynb): the shapes through the pipeline, and postprocessing
# ==============================================================================================
# The learner writes
# - ``pipeline_shapes(batch, height, width, guidance_scale, text_tokens=77, text_width=768,
#   latent_channels=4, factor=8)``: the shape of every tensor that crosses a step of
#   ``StableDiffusionPipeline`` (run for SD 1.5, SD 2.1, SDXL-sized inputs and the tiny SD, with and
#   without guidance), the arithmetic behind episode 85's four claims;
# - ``postprocess(images)``: decoder output in [-1, 1] -> uint8 pictures (B, H, W, 3), as diffusers'
#   ``VaeImageProcessor.postprocess`` + ``numpy_to_pil`` do it.


def pipeline_shapes(batch: int, height: int, width: int, guidance_scale: float, text_tokens: int = 77,
                    text_width: int = 768, latent_channels: int = 4, factor: int = 8) -> dict:
    """Shapes of the text states the U-Net reads, the latents, the U-Net's input and the decoded images.

    Guidance (diffusers: guidance_scale > 1) doubles the batch of the U-Net's input and of the text
    states it reads: [negative prompt, prompt] in one call.
    """
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
    unet_batch = 2 * batch if guidance_scale > 1 else batch
    h, w = height // factor, width // factor
    return {
        "text_embeddings": (unet_batch, text_tokens, text_width),
        "latents": (batch, latent_channels, h, w),
        "unet_input": (unet_batch, latent_channels, h, w),
        "image": (batch, 3, height, width),
    }


def postprocess(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) floats in about [-1, 1] -> (B, H, W, 3) uint8: x / 2 + 0.5, clamp to [0, 1], * 255, round."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)  # float32, as diffusers computes it
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # (B, H, W, 3)


# name -> (batch, height, width, guidance_scale, keyword arguments): the cases the shape check runs
SHAPE_CASES = {
    "SD 1.5, 512 px, guidance 7.5": (1, 512, 512, 7.5, {}),
    "SD 1.5, 4 images, guidance off": (4, 512, 512, 1.0, {}),
    "SD 2.1 (768 model), 768 px": (1, 768, 768, 7.5, {"text_width": 1024}),
    "SDXL, 2 images, 1024 x 768": (2, 1024, 768, 5.0, {"text_width": 2048}),
    "tiny SD, 64 px": (8, 64, 64, 5.0, {"text_tokens": 48, "text_width": 128}),  # clip.CONTEXT_LENGTH tokens
}


PIPELINE_SHAPES = Exercise("pipeline_shapes", "Check yourself: shapes through the pipeline, and postprocessing",
                           targets=("pipeline_shapes", "postprocess"))

_SHAPE_HINT = ("latents: (batch, latent_channels, height // factor, width // factor); the image: (batch, 3, height, "
               "width); with guidance (guidance_scale > 1) the U-Net input and the text states hold 2 * batch rows, "
               "[negative prompt, prompt], and without it batch rows.")


def _as_tuples(got):
    if isinstance(got, dict):
        return {k: tuple(v) if isinstance(v, (list, tuple, torch.Size)) else v for k, v in got.items()}
    return got


@PIPELINE_SHAPES.check("pipeline_shapes: latents and decoded images for SD 1.5, SD 2.1, SDXL and the tiny SD", points=2,
                       hint=_SHAPE_HINT)
def _(run, learner):
    for name, (b, h, w, scale, kw) in SHAPE_CASES.items():
        got = _as_tuples(run.call(learner.pipeline_shapes, b, h, w, scale, **kw, label=f"pipeline_shapes(<{name}>)"))
        want = pipeline_shapes(b, h, w, scale, **kw)
        run.expect(isinstance(got, dict) and set(got) == set(want),
                   f"pipeline_shapes(<{name}>) to be a dict with keys {sorted(want)}",
                   repr(sorted(got)) if isinstance(got, dict) else type(got).__name__)
        for key in ("latents", "image"):
            run.equal(got[key], want[key], f"pipeline_shapes(<{name}>)[{key!r}]")


@PIPELINE_SHAPES.check("pipeline_shapes: guidance doubles the U-Net's batch (one call on [negative, prompt]), "
                       "no guidance does not", points=2, hint=_SHAPE_HINT)
def _(run, learner):
    rng = run.rng(0)
    cases = dict(SHAPE_CASES)
    cases["random"] = (int(rng.integers(1, 9)), int(rng.integers(1, 65)) * 8, int(rng.integers(1, 65)) * 8,
                       float(rng.choice([1.0, 3.0, 7.5])), {"text_width": int(rng.choice([768, 1024]))})
    for name, (b, h, w, scale, kw) in cases.items():
        got = _as_tuples(run.call(learner.pipeline_shapes, b, h, w, scale, **kw, label=f"pipeline_shapes(<{name}>)"))
        want = pipeline_shapes(b, h, w, scale, **kw)
        for key in ("text_embeddings", "unet_input"):
            run.equal(got.get(key) if isinstance(got, dict) else got, want[key], f"pipeline_shapes(<{name}>)[{key!r}]")


@PIPELINE_SHAPES.check("pipeline_shapes raises ValueError for sizes the VAE cannot take", points=1,
                       hint="The VAE halves the size factor = 8 = 2**3 times; say so with a ValueError instead of "
                            "rounding.")
def _(run, learner):
    run.raises("ValueError", learner.pipeline_shapes, 1, 500, 512, 7.5)


@PIPELINE_SHAPES.check("postprocess: [-1, 1] floats -> (B, H, W, 3) uint8, rounded as diffusers rounds", points=2,
                       hint="(images / 2 + 0.5).clamp(0, 1), times 255, .round(), .to(torch.uint8), then "
                            ".permute(0, 2, 3, 1): channels last, as pictures are stored.")
def _(run, learner):
    for k, (b, h, w) in enumerate([(2, 8, 8), (1, 16, 24), (3, 4, 4)]):
        x = run.randn(b, 3, h, w, k=k) * 0.7  # some values fall outside [-1, 1]: clamp them
        got = run.call(learner.postprocess, x.clone(), label=f"postprocess(<images {(b, 3, h, w)}>)")
        want = postprocess(x)
        arr = run.tensor(got, f"postprocess(<images {(b, 3, h, w)}>)", shape=tuple(want.shape), kind="any")
        run.expect(str(getattr(got, "dtype", "")).endswith("uint8"), "a uint8 result (what pictures hold)",
                   f"dtype {getattr(got, 'dtype', type(got).__name__)}")
        off = abs(arr - want.double().numpy())
        # exact, up to a rare tie that float64 arithmetic rounds the other way; truncating instead of
        # rounding is off by one on about half of the values
        run.expect(off.max() <= 1 and (off > 0).mean() < 0.01,
                   f"postprocess(<images {(b, 3, h, w)}>) equal to the reference (rounded, not truncated)",
                   f"{int((off > 0).sum())} of {off.size} values differ, by up to {int(off.max())}")
