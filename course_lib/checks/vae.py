"""Checks of latent diffusion and the VAE: compression arithmetic, reparameterisation, the scaling factor.

| id | where | kind |
| --- | --- | --- |
| vae_compression | solutions/01_vae_exercises.ipynb | graded exercise (episode 85's VAE compression analyser) |
| reparameterise | solutions/01_vae_exercises.ipynb | graded exercise |
| scaling_factor | notebooks/01_vae_latent_space.ipynb | check yourself |
"""

from __future__ import annotations

import math

import numpy as np
import torch

from course_tools.agent import Probe
from course_tools.checking import Exercise

FLOAT32_BYTES = 4
MIB = 2**20

# ==============================================================================================
# Reference implementations
# ==============================================================================================


def compression_sizes(resolution, latent_channels: int = 4, downsample: int = 8, steps_per_image: int = 50) -> dict:
    """Sizes of one image in pixel space (H x W x 3) and in latent space (H/f x W/f x C), float32."""
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    if h % downsample or w % downsample:
        raise ValueError(f"{h}x{w} is not a multiple of the downsampling factor {downsample}")
    pixel = h * w * 3
    latent = (h // downsample) * (w // downsample) * latent_channels
    steps = pixel // latent
    return {
        "pixel_elements": pixel,
        "latent_elements": latent,
        "compression": pixel / latent,
        "pixel_mib": pixel * FLOAT32_BYTES / MIB,
        "latent_mib": latent * FLOAT32_BYTES / MIB,
        "saved_mib": (pixel - latent) * FLOAT32_BYTES / MIB,
        "latent_steps_per_pixel_step": steps,
        "images_per_pixel_step": steps / steps_per_image,
    }


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over all but the batch dim: shape (B,)."""
    kl = 0.5 * (mean.double() ** 2 + logvar.double().exp() - 1 - logvar.double())
    return kl.flatten(1).sum(dim=1)


# ==============================================================================================
# Exercise: the VAE compression analyser
# ==============================================================================================
COMPRESSION = Exercise("vae_compression", "VAE compression analyser", targets=("VAECompressionAnalyzer",))
_KEYS = ("pixel_elements", "latent_elements", "compression", "pixel_mib", "latent_mib", "saved_mib",
         "latent_steps_per_pixel_step", "images_per_pixel_step")


@COMPRESSION.check("sizes(512) with SD's VAE: 786,432 pixel values, 16,384 latent values, 48x",
                   hint="Pixel space holds H·W·3 numbers, latent space (H/f)·(W/f)·C; the ratio of the two "
                        "is the compression.")
def _(run, learner):
    an = run.call(learner.VAECompressionAnalyzer, [512], label="VAECompressionAnalyzer([512])")
    got = run.call(an.sizes, 512)
    run.expect(isinstance(got, dict), "sizes(512) to return a dict", f"{type(got).__name__}")
    for key in ("pixel_elements", "latent_elements", "compression"):
        run.close(got.get(key), compression_sizes(512)[key], f"sizes(512)[{key!r}]", rtol=1e-9, kind="number")


@COMPRESSION.check("every field of sizes() for several resolutions, latent channels and factors", points=3,
                   hint="MiB = bytes / 2**20 with 4 bytes per float32 value; latent_steps_per_pixel_step = "
                        "pixel_elements // latent_elements; images_per_pixel_step divides that by steps_per_image.")
def _(run, learner):
    rng = run.rng(0)
    cases = [(512, {}), (1024, {"latent_channels": 4}), ((768, 1344), {}), (1024, {"latent_channels": 16}),
             (int(rng.integers(4, 160)) * 8, {}), ((int(rng.integers(2, 40)) * 16, int(rng.integers(2, 40)) * 16),
                                                    {"latent_channels": 16, "downsample": 16})]
    for res, kw in cases:
        an = run.call(learner.VAECompressionAnalyzer, [res], **kw, steps_per_image=25,
                      label=f"VAECompressionAnalyzer([{res}], {', '.join(f'{k}={v}' for k, v in kw.items())}"
                            f"{', ' if kw else ''}steps_per_image=25)")
        got = run.call(an.sizes, res)
        run.close(got, compression_sizes(res, steps_per_image=25, **kw), f"sizes({res})", rtol=1e-9, kind="number")


@COMPRESSION.check("table() has one row per resolution, each with its resolution and the sizes",
                   hint='Return [{"resolution": r, **self.sizes(r)} for r in self.resolutions].')
def _(run, learner):
    resolutions = [256, 512, 768, 1024]
    an = run.call(learner.VAECompressionAnalyzer, resolutions, label=f"VAECompressionAnalyzer({resolutions})")
    got = run.call(an.table)
    run.expect(isinstance(got, list) and len(got) == 4, "a list of 4 rows", f"{str(got)[:80]}")
    run.close(got, [{"resolution": r, **compression_sizes(r)} for r in resolutions], "table()", rtol=1e-9)


@COMPRESSION.check("Verify: the compression ratio is the same at every resolution",
                   hint="Both sizes scale with H·W, so their ratio does not depend on the resolution.")
def _(run, learner):
    resolutions = [256, 512, 768, 1024, 2048]
    an = run.call(learner.VAECompressionAnalyzer, resolutions, label=f"VAECompressionAnalyzer({resolutions})")
    rows = run.call(an.table)
    ratios = [run.number(r.get("compression") if isinstance(r, dict) else None, "compression") for r in rows]
    run.expect(max(ratios) - min(ratios) < 1e-9 and abs(ratios[0] - 48) < 1e-9, "48.0 at every resolution",
               ", ".join(f"{x:g}" for x in ratios))


@COMPRESSION.check("Verify: the memory saved grows with the square of the resolution",
                   hint="Twice the side is four times the pixels, and four times the memory saved.")
def _(run, learner):
    an = run.call(learner.VAECompressionAnalyzer, [256, 512, 768, 1024], label="VAECompressionAnalyzer([...])")
    saved = {r: run.number(run.call(an.sizes, r).get("saved_mib"), f"sizes({r})['saved_mib']")
             for r in (256, 512, 768, 1024)}
    run.close([saved[1024] / saved[512], saved[768] / saved[256]], [4.0, 9.0],
              "saved_mib(1024)/saved_mib(512) and saved_mib(768)/saved_mib(256)", rtol=1e-9)


@COMPRESSION.check("a resolution that is not a multiple of the downsampling factor raises ValueError",
                   hint="SD's VAE needs H and W divisible by 8: raise ValueError with a message that says so.")
def _(run, learner):
    an = run.call(learner.VAECompressionAnalyzer, [500], label="VAECompressionAnalyzer([500])")
    run.raises("ValueError", an.sizes, 500)
    run.raises("ValueError", an.sizes, (512, 500))


# ==============================================================================================
# Exercise: the reparameterisation trick
# ==============================================================================================
REPARAMETERISE = Exercise("reparameterise", "The reparameterisation trick",
                          targets=("reparameterise", "kl_divergence"))


@REPARAMETERISE.check("z has the shape and dtype of mean", hint="z = mean + std * eps, with eps shaped like mean.")
def _(run, learner):
    for k, shape in enumerate([(2, 4, 8, 8), (5, 3)]):
        mean, logvar = run.randn(*shape, k=k), run.randn(*shape, k=k + 3)
        z = run.call(learner.reparameterise, mean, logvar)
        run.tensor(z, "reparameterise(mean, logvar)", shape=shape)
        run.equal(str(z.dtype), str(mean.dtype), "the dtype of z")


@REPARAMETERISE.check("z = mean + exp(logvar / 2) · eps: over 40,000 draws, (z - mean) / std has mean 0 and std 1",
                      points=2, hint="logvar is the log of the variance: the standard deviation is exp(0.5 · logvar),"
                                     " not exp(logvar).")
def _(run, learner):
    for k in range(2):
        mean = run.randn(4, 10_000, k=k) * 2
        logvar = torch.rand(4, 10_000, generator=run.generator(k + 5)) * 5 - 3  # variances from e^-3 to e^2
        z = run.tensor(run.call(learner.reparameterise, mean, logvar), "reparameterise(mean, logvar)",
                       shape=mean.shape)
        eps = (z - mean.double().numpy()) / np.exp(0.5 * logvar.double().numpy())
        run.expect(abs(eps.mean()) < 0.03 and abs(eps.std() - 1) < 0.03,
                   "standardised draws with mean 0 ± 0.03 and std 1 ± 0.03",
                   f"mean {eps.mean():.3f}, std {eps.std():.3f}")


@REPARAMETERISE.check("gradients reach mean and logvar: dz/dmean = 1, dz/dlogvar = (z - mean) / 2", points=2,
                      hint="Draw eps from a standard normal and build z from mean and logvar with tensor operations;"
                           " sampling from torch.distributions.Normal(...).sample() blocks the gradient.")
def _(run, learner):
    mean, logvar = run.randn(3, 4, 5, 5, k=1), run.randn(3, 4, 5, 5, k=2)
    res = run.vjp(learner.reparameterise, mean, logvar, wrt=[0, 1], grad_output=torch.ones_like(mean))
    z = run.tensor(res["output"], "z", shape=mean.shape)
    run.close(res["arg_grads"][0], torch.ones_like(mean), "dz/dmean", rtol=1e-5, kind="tensor")
    run.close(res["arg_grads"][1], (z - mean.double().numpy()) / 2, "dz/dlogvar", rtol=1e-4, atol=1e-5,
              kind="tensor")


@REPARAMETERISE.check("a seeded generator makes the draw reproducible",
                      hint="Take a `generator=None` argument and draw eps with "
                           "torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device).")
def _(run, learner):
    mean, logvar = run.randn(2, 4, 8, 8, k=0), run.randn(2, 4, 8, 8, k=1)
    a, b, c = (run.call(learner.reparameterise, mean, logvar, generator=Probe.of("generator", seed=s))
               for s in (run.seeds[0], run.seeds[0], run.seeds[1]))
    run.close(a, b, "two draws with generators seeded alike", rtol=0, atol=0, kind="tensor")
    run.expect(not torch.equal(a, c), "different draws for different seeds", "the same draw")


@REPARAMETERISE.check("no NaN or inf for extreme log-variances (logvar from -60 to 160)",
                      hint="exp(logvar) overflows float32 above logvar = 88; exp(0.5 · logvar) overflows only "
                           "above 177. Compute the std directly as exp(0.5 · logvar).")
def _(run, learner):
    mean = torch.zeros(1, 6)
    logvar = torch.tensor([[-60.0, -10.0, 0.0, 10.0, 100.0, 160.0]])
    run.tensor(run.call(learner.reparameterise, mean, logvar), "reparameterise(0, extreme logvar)", shape=(1, 6))


@REPARAMETERISE.check("kl_divergence(mean, logvar) is KL(N(mean, var) || N(0, 1)) summed per sample, shape (B,)",
                      points=2, hint="0.5 · (mean² + exp(logvar) - 1 - logvar), summed over every dim but the "
                                     "batch; it is 0 exactly when mean = 0 and logvar = 0.")
def _(run, learner):
    for k, shape in enumerate([(3, 4, 8, 8), (5, 16)]):
        mean, logvar = run.randn(*shape, k=k), run.randn(*shape, k=k + 4)
        got = run.call(learner.kl_divergence, mean, logvar)
        run.close(got, kl_to_standard_normal(mean, logvar), "kl_divergence(mean, logvar)", rtol=1e-4, atol=1e-4,
                  kind="tensor")
    zero = run.call(learner.kl_divergence, torch.zeros(2, 3), torch.zeros(2, 3))
    run.close(zero, torch.zeros(2), "kl_divergence(0, 0)", atol=1e-7, kind="tensor")


# ==============================================================================================
# Check yourself (notebooks/01_vae_latent_space.ipynb): the scaling factor and the SNR of unscaled latents
# ==============================================================================================


def scaling_factor(latents: torch.Tensor) -> float:
    """1 / standard deviation of all the latents' elements (how SD's 0.18215 was found)."""
    return float(1.0 / latents.double().std())


def latent_snr_db(alpha_bar: torch.Tensor, latent_std: float) -> torch.Tensor:
    """SNR in dB of sqrt(abar) x0 + sqrt(1 - abar) eps when x0 has standard deviation ``latent_std``."""
    ab = alpha_bar.double()
    return 10 * torch.log10(ab / (1 - ab) * latent_std**2)


SCALING_FACTOR = Exercise("scaling_factor", "Check yourself: scaling latents", targets=("scaling_factor", "snr_db"))


@SCALING_FACTOR.check("scaling_factor(latents) is 1 / the standard deviation of all the latents' elements", points=2,
                      hint="Take the std over every element at once (latents.std()), not per channel or per image, and "
                           "return 1 / std as a Python float (.item()).")
def _(run, learner):
    for k, (shape, spread, shift) in enumerate([((64, 4, 8, 8), 5.49, 0.0), ((16, 4, 8, 8), 0.7, 0.3),
                                                ((8, 16, 8, 8), 1.3, -0.5)]):
        z = run.randn(*shape, k=k) * spread + shift
        got = run.call(learner.scaling_factor, z, label=f"scaling_factor(<latents {shape}, std about {spread}>)")
        run.close(got, scaling_factor(z), f"scaling_factor(<latents with std about {spread}>)", rtol=2e-3,
                  kind="number")


@SCALING_FACTOR.check("Verify: latents * scaling_factor(latents) have standard deviation 1",
                      hint="Multiplying by a number multiplies the std by that number: the factor is 1 / std.")
def _(run, learner):
    z = run.randn(32, 4, 8, 8, k=5) * 3.7 + 1.0
    f = run.number(run.call(learner.scaling_factor, z), "scaling_factor(latents)")
    run.close((z.double() * f).std().item(), 1.0, "the std of latents * scaling_factor(latents)", rtol=2e-3)


@SCALING_FACTOR.check("snr_db(alpha_bar, latent_std) = 10 log10(alpha_bar / (1 - alpha_bar) * latent_std^2)", points=2,
                      hint="The signal sqrt(alpha_bar) x0 has power alpha_bar * std^2, the noise sqrt(1 - alpha_bar) eps has "
                           "power 1 - alpha_bar; their ratio in dB is 10 log10 of it.")
def _(run, learner):
    from course_lib.schedules import sd_schedule

    ab = sd_schedule().alphas_cumprod.float()
    rng = run.rng(0)
    for std in (1.0, 1 / 0.18215, float(rng.uniform(0.2, 4.0))):
        got = run.call(learner.snr_db, ab, std, label=f"snr_db(<SD's alphas_cumprod>, {std:.4g})")
        run.close(got, latent_snr_db(ab, std), f"snr_db(<SD's alphas_cumprod>, {std:.4g})", rtol=1e-4, atol=1e-3,
                  kind="tensor")


@SCALING_FACTOR.check("Verify: latents with std s gain 20 log10(s) dB at every timestep",
                      hint="log10(x * s^2) = log10(x) + 2 log10(s).")
def _(run, learner):
    ab = torch.linspace(0.999, 0.005, 50)
    s = float(run.rng(1).uniform(2.0, 8.0))
    a = run.tensor(run.call(learner.snr_db, ab, s), f"snr_db(ab, {s:.3g})", shape=(50,))
    b = run.tensor(run.call(learner.snr_db, ab, 1.0), "snr_db(ab, 1.0)", shape=(50,))
    run.close(a - b, torch.full((50,), 20 * math.log10(s)), "snr_db(ab, s) - snr_db(ab, 1)", rtol=1e-4, atol=1e-3,
              kind="array")
