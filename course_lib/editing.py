"""Editing images with the model: img2img (SDEdit) and DDIM inversion.

Lesson 9 (editing) teaches them; tests/test_editing.py checks their behaviour and
tests/test_editing_diffusers_parity.py proves them equal to diffusers' ``StableDiffusionImg2ImgPipeline``
and ``DDIMInverseScheduler`` on the course's weights. benchmarks/bench_editing.py measures them.

**img2img** (SDEdit, Meng et al. 2022, "SDEdit: guided image synthesis and editing with stochastic
differential equations"): encode the image, noise its latents to an intermediate timestep with the forward
process (DDPM eq. 4), and let the sampler denoise from there with a (new) prompt. ``strength`` in [0, 1] picks
the timestep: the larger it is, the more noise, the more the prompt and the less the input decides.
diffusers: ``StableDiffusionImg2ImgPipeline`` (its ``get_timesteps`` and ``prepare_latents``).

**DDIM inversion** (Song et al. 2021, Sec. 4.3; the starting point of null-text inversion, Mokady et al. 2023):
deterministic DDIM (eta = 0) is an ODE step, so it can be run backwards: from the image's latents z0 up to a
z_T from which DDIM sampling comes back to (nearly) z0. An edit then starts from z_T with a changed prompt.
diffusers: ``DDIMInverseScheduler`` (used by the pix2pix-zero and DiffEdit pipelines). With guidance the
inversion drifts; **exact inversion** (``fixed_point_iters``) solves each inverse step so that the forward
step undoes it (AIDI, Pan et al. 2023; ReNoise, Garibi et al. 2024).

Measured (benchmarks/bench_editing.py, assets/bench_editing.json, held-out scenes): img2img keeps the layout
(edge F1 against the input) from 91% at strength 0 down to 41% at 1 (text-to-image from the same noise: 38%),
while a new colour is followed from 0% (strength 0.2) to 96% (0.9): about 0.6 is where the curves cross.
Plain DDIM inversion at 20 steps reconstructs with latent MSE 3e-2 (median 5e-3) without guidance and 0.36 at
w = 7.5; exact inversion (5 Anderson iterations) 7e-6 and 1e-2.

Notation (schedule symbols as in course_lib/schedules.py):
    z0          the image's scaled latents (VAE posterior, times vae.config.scaling_factor)
    s, t        two neighbouring timesteps, s < t (s less noisy); inversion steps s -> t
    a_s, a_t    sqrt(alpha_bar) at s and t;  b_s, b_t   sqrt(1 - alpha_bar)
    F(x, t)     the (guided) model's output at (x, t); eps its noise prediction
    strength    img2img's fraction of the sampling steps that run (diffusers' ``strength``)
    w           the classifier-free guidance scale (1: no guidance)
"""

from __future__ import annotations

from typing import Callable

import torch

from .guidance import guided_model
from .samplers import SAMPLERS, Model, _check_inputs, _check_timesteps, _randn_like, default_timesteps, sample
from .schedules import NoiseSchedule, add_noise
from .tiny_sd import DEFAULT_GUIDANCE, TinySD

IMAGE_SIDE = 64  # the course's images are 64x64 pixels (SD 1.5: 512)


# -----------------------------------------------------------------------------
# checks shared by img2img and inversion


def _prompts(prompts: str | list[str], batch: int, name: str = "prompts") -> list[str]:
    """One prompt per image: a string is repeated, a list must have one per image."""
    out = [prompts] * batch if isinstance(prompts, str) else list(prompts)
    if len(out) != batch or not all(isinstance(p, str) for p in out):
        raise ValueError(f"give one prompt (a string) for all {batch} images or a list of {batch} strings as "
                         f"{name}, got {len(out)}")
    return out


def _check_images(images: torch.Tensor) -> None:
    """Images as the VAE takes them: float (B, 3, 64, 64) in [-1, 1]."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a tensor (B, 3, {IMAGE_SIDE}, {IMAGE_SIDE}), got {type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}; convert uint8 "
                         "pictures with course_lib.data.to_float (x / 127.5 - 1)")
    if images.ndim != 4 or images.shape[0] == 0 or tuple(images.shape[1:]) != (3, IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(f"images must have shape (B, 3, {IMAGE_SIDE}, {IMAGE_SIDE}) with B >= 1, got "
                         f"{tuple(images.shape)}; resize them to {IMAGE_SIDE}x{IMAGE_SIDE} first")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(f"images must lie in [-1, 1] (the VAE's range), got values from {lo:.3g} to {hi:.3g}; "
                         "from [0, 1] use 2 x - 1, from [0, 255] use x / 127.5 - 1")


def _check_latents(sd: TinySD, latents: torch.Tensor, name: str = "latents") -> None:
    shape = sd.latent_shape(1)[1:]
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (B, {', '.join(map(str, shape))})")
    if latents.ndim != 4 or latents.shape[0] == 0 or tuple(latents.shape[1:]) != shape:
        raise ValueError(f"{name} must have shape (B, {', '.join(map(str, shape))}), got {tuple(latents.shape)}; "
                         "encode images with encode_images first")


def _check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1] (0 keeps the image, 1 noises it to the first "
                         f"sampling timestep), got {strength!r}")
    return float(strength)


# -----------------------------------------------------------------------------
# img2img (SDEdit)


def img2img_timesteps(num_steps: int, strength: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The timesteps img2img visits: the last ``int(num_steps * strength)`` of the ``num_steps`` a text-to-image
    run would visit (SD's "leading" spacing, steps_offset 1), noisiest first. diffusers:
    ``StableDiffusionImg2ImgPipeline.get_timesteps``:

        init_timestep = min(int(num_steps * strength), num_steps)   # how many steps run
        t_start       = num_steps - init_timestep                   # how many are skipped
        timesteps     = all_timesteps[t_start:]

    e.g. 20 steps at strength 0.75: 15 steps, 701, 651, ..., 1 (of 951 ... 1). The image is noised to the
    first of them. ``int`` rounds down (and in float arithmetic: 20 * 0.7 = 14.000000000000002 runs 14
    steps, 100 * 0.29 = 28.999999999999996 runs 28). A strength below 1 / num_steps runs no step: the result
    is an empty tensor, and ``img2img`` then returns the image's own latents.
    Returns a LongTensor of shape (int(num_steps * strength),).
    """
    strength = _check_strength(strength)
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    full = default_timesteps(num_steps, num_train_timesteps)  # (num_steps,) e.g. 951 ... 1
    init_timestep = min(int(num_steps * strength), num_steps)
    t_start = max(num_steps - init_timestep, 0)
    return full[t_start:]


@torch.no_grad()
def encode_images(sd: TinySD, images: torch.Tensor, generator: torch.Generator | None = None,
                  sample_posterior: bool = True) -> torch.Tensor:
    """Images (B, 3, 64, 64) in [-1, 1] -> scaled latents z0 (B, 4, 16, 16), what the U-Net works on.

    sample_posterior=True draws z ~ q(z | x) with ``generator`` (diffusers' ``retrieve_latents`` default,
    sample_mode="sample"); False takes the posterior mean (sample_mode="argmax"), which is deterministic.
    """
    _check_images(images)
    posterior = sd.vae.encode(images.to(sd.device, sd.dtype))
    z = posterior.sample(generator) if sample_posterior else posterior.mean
    return z * sd.vae.config.scaling_factor


@torch.no_grad()
def img2img_from_latents(sd: TinySD, latents: torch.Tensor, prompts: str | list[str], strength: float = 0.8,
                         num_steps: int = 20, guidance_scale: float = DEFAULT_GUIDANCE,
                         negative_prompt: str | list[str] | None = None, sampler: str = "ddim",
                         generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                         callback: Callable | None = None) -> torch.Tensor:
    """``img2img`` on latents already encoded (``encode_images``): returns the edited scaled latents.

    z_t0 = sqrt(alpha_bar_t0) z0 + sqrt(1 - alpha_bar_t0) noise at t0 = img2img_timesteps(...)[0] (DDPM eq. 4,
    ``scheduler.add_noise``), then the sampler runs the remaining timesteps with guidance. noise: the
    (B, 4, 16, 16) unit Gaussian to add (default: drawn from ``generator``, after the posterior sample, as
    diffusers' ``prepare_latents`` draws it).
    """
    _check_latents(sd, latents)
    b = latents.shape[0]
    prompts = _prompts(prompts, b)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    timesteps = img2img_timesteps(num_steps, strength, sd.schedule.num_train_timesteps)
    if noise is not None and tuple(noise.shape) != tuple(latents.shape):
        raise ValueError(f"noise must have the latents' shape {tuple(latents.shape)}, got {tuple(noise.shape)}")
    model = _guided(sd, prompts, guidance_scale, negative_prompt)  # checks the scale and negative prompts
    if len(timesteps) == 0:  # strength < 1 / num_steps: no step runs; the image comes back as it went in
        return latents.clone()
    z0 = latents.to(sd.device, sd.dtype)
    if noise is None:
        noise = _randn_like(z0, generator)
    x = add_noise(z0, noise.to(z0.device, z0.dtype), int(timesteps[0]), sd.schedule)  # (B, 4, 16, 16) at t0
    return sample(sampler, model, x, sd.schedule, timesteps, None, prediction_type=sd.unet.config.prediction_type,
                  generator=generator, callback=callback)


@torch.no_grad()
def img2img(sd: TinySD, images: torch.Tensor, prompts: str | list[str], strength: float = 0.8, num_steps: int = 20,
            guidance_scale: float = DEFAULT_GUIDANCE, negative_prompt: str | list[str] | None = None,
            sampler: str = "ddim", generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
            sample_posterior: bool = True, return_latents: bool = False
            ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SDEdit (Meng et al. 2022): images (B, 3, 64, 64) in [-1, 1] redrawn by ``prompts``; images out in [-1, 1].

    1. encode the images (``encode_images``: a posterior sample drawn from ``generator``, or the mean with
       sample_posterior=False) and scale them by the VAE's scaling factor: z0
    2. pick the timesteps from ``strength`` (``img2img_timesteps``: diffusers' ``get_timesteps``)
    3. noise z0 to the first of them (``schedules.add_noise``, diffusers' ``scheduler.add_noise``)
    4. denoise over the rest with classifier-free guidance (``guidance.guided_model``) and ``sampler``
    5. decode

    strength: 0 keeps the image (no step runs, below 1 / num_steps as well: the VAE's reconstruction comes
    back), 1 runs every step. Even at 1 the image is not quite gone: SD's "leading" timesteps start at
    t = 951 (20 steps), where sqrt(alpha_bar) = 0.09 of z0 remains in the start. num_steps: the steps of a
    *full* run; img2img runs int(num_steps * strength) of them. With sampler="ddim" (eta = 0) the latents
    equal diffusers' ``StableDiffusionImg2ImgPipeline`` with a ``DDIMScheduler`` (tests/test_editing_diffusers_parity.py);
    the other samplers run the same way on the same timesteps.
    return_latents=True also returns the final scaled latents.
    """
    _check_images(images)
    _prompts(prompts, images.shape[0])  # fail before the VAE runs
    _check_strength(strength)
    z0 = encode_images(sd, images, generator, sample_posterior)
    z = img2img_from_latents(sd, z0, prompts, strength, num_steps, guidance_scale, negative_prompt, sampler,
                             generator, noise)
    out = sd.decode_latents(z)
    return (out, z) if return_latents else out


def _guided(sd: TinySD, prompts: list[str], guidance_scale: float, negative_prompt) -> Model:
    """The U-Net with the prompts' text states bound and classifier-free guidance at scale w."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not guidance_scale >= 1.0:
        raise ValueError(f"guidance_scale must be a number >= 1 (1 means no guidance), got {guidance_scale!r}")
    b = len(prompts)
    negative = _prompts("" if negative_prompt is None else negative_prompt, b, "negative_prompt")
    cond = sd.encode_prompt(prompts)  # (B, L, D)
    uncond = sd.encode_prompt(negative) if guidance_scale != 1.0 else None
    return guided_model(sd.unet, cond, uncond, float(guidance_scale))


# -----------------------------------------------------------------------------
# DDIM inversion


def _eps_from(out: torch.Tensor, x: torch.Tensor, a: float, b: float, prediction_type: str) -> torch.Tensor:
    """The noise prediction a model's output means at x = a x0 + b eps: eps itself, or a v + b x for v."""
    return out if prediction_type == "epsilon" else a * out + b * x


def anderson_fixed_point(g: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, iters: int, memory: int = 3,
                         relaxation: float = 0.5) -> torch.Tensor:
    """Solve y = g(y) per sample by Anderson acceleration (Walker & Ni 2011), ``iters`` evaluations of g.

    Each iteration evaluates g(y_k) and the residual f_k = g(y_k) - y_k, then, with the differences of the
    last ``memory`` iterates dX and residuals dF (one least-squares problem per sample):
        gamma   = argmin || f_k - dF gamma ||
        y_{k+1} = y_k + beta f_k - (dX + beta dF) gamma          beta = relaxation
    memory = 0 is the plain damped iteration y_{k+1} = y_k + beta (g(y_k) - y_k); beta = 1 undamped.
    """
    xs: list[torch.Tensor] = []  # the last memory + 1 iterates, flattened (B, D) each
    fs: list[torch.Tensor] = []  # and their residuals
    for _ in range(iters):
        f = (g(y) - y).flatten(1)  # (B, D)
        xs, fs = (xs + [y.flatten(1)])[-(memory + 1):], (fs + [f])[-(memory + 1):]
        step = relaxation * f
        if len(xs) > 1:
            dX = torch.stack([b - a for a, b in zip(xs[:-1], xs[1:])], dim=-1)  # (B, D, m)
            dF = torch.stack([b - a for a, b in zip(fs[:-1], fs[1:])], dim=-1)  # (B, D, m)
            gamma = torch.linalg.lstsq(dF, f.unsqueeze(-1)).solution  # (B, m, 1)
            step = step - ((dX + relaxation * dF) @ gamma).squeeze(-1)  # (B, D)
        y = (xs[-1] + step).view_as(y)
    return y


@torch.no_grad()
def ddim_inverse(model: Model, x: torch.Tensor, schedule: NoiseSchedule, timesteps: torch.Tensor | int = 50,
                 cond=None, *, prediction_type: str = "epsilon", fixed_point_iters: int = 0,
                 anderson_memory: int = 3, relaxation: float = 0.5, set_alpha_to_one: bool = False,
                 callback: Callable | None = None) -> torch.Tensor:
    """Deterministic DDIM run backwards (Song et al. 2021, Sec. 4.3), on the samplers' signature.

    x: the clean latents z0; timesteps: those a forward ``samplers.ddim`` run visits (decreasing; an int N
    for SD's N "leading" steps). They are visited in reverse, from the least noisy: from s to the next t > s
    (s = "before the first", alpha_bar_0, for the first step: SD's set_alpha_to_one=False, the level the
    forward DDIM's last step ends on):

        eps  = F(x_s, t)                          the model at the *target* timestep, on the current sample
        x0   = (x_s - b_s eps) / a_s              (DDIM eq. 12's predicted x0, at s)
        x_t  = a_t x0 + b_t eps                   (DDIM eq. 12 with s and t swapped)

    The forward step from x_t would use F(x_t, t), not F(x_s, t): the approximation F(x_s, t) ~ F(x_t, t) is
    what makes plain inversion inexact, and the error grows with how fast the prediction changes with x,
    which classifier-free guidance multiplies by w. This is diffusers' ``DDIMInverseScheduler`` (with the
    pipelines' loop, e.g. ``StableDiffusionDiffEditPipeline.invert``), to float error.

    fixed_point_iters = k > 0: **exact inversion** (Pan et al. 2023, "Effective real image editing with
    accelerated iterative diffusion inversion" (AIDI); Garibi et al. 2024, "ReNoise"): each step solves

        x_t = g(x_t),   g(y) = a_t (x_s - b_s eps(y)) / a_s + b_t eps(y),   eps(y) = F(y, t)

    from the plain step's x_t, with k evaluations of g (one guided model call each). At the solution the
    forward DDIM step maps x_t back to x_s exactly, so errors no longer pile up along the way. As in AIDI
    the iteration is accelerated with Anderson's method (``anderson_fixed_point``, ``anderson_memory`` past
    iterates, damping ``relaxation``): with guidance the plain iteration y <- g(y) contracts slowly or not at
    all at some steps (at w = 5, 20 steps, on a held-out scene: its residual shrinks by about 0.9 per damped
    iteration near t = 50 and not at all near t = 350), so 5 damped iterations leave a reconstruction error of
    0.1 (latent MSE) where 5 of Anderson's leave 4e-4. anderson_memory=0 gives the plain damped iteration,
    relaxation=1 the undamped one (enough without guidance).
    Chosen over null-text optimisation (Mokady et al. 2023) for the lesson: no gradients through the U-Net,
    no optimiser per step, the same prompt and scale work for inversion and sampling, and the idea is one
    line: make the inverse step agree with the forward one.
    callback(i, t, x_t) runs after every step. Returns z_T, shaped like x.
    """
    _check_inputs(x, schedule, prediction_type)
    for name, value in (("fixed_point_iters", fixed_point_iters), ("anderson_memory", anderson_memory)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (fixed_point_iters 0: plain DDIM inversion), got {value!r}")
    if not 0.0 < relaxation <= 1.0:
        raise ValueError(f"relaxation must lie in (0, 1] (1: undamped), got {relaxation!r}")
    ts = _check_timesteps(timesteps, schedule, fractional_ok=False).flip(0)  # (n,) increasing: the inverse order
    ab = schedule.alphas_cumprod
    first = 1.0 if set_alpha_to_one else ab[0].item()
    ab_t = ab[ts.long()].tolist()
    ab_s = [first] + ab_t[:-1]  # the level each step starts from
    t_model = ts.to(x.device)
    for i in range(len(ts)):
        a_s, b_s = ab_s[i] ** 0.5, (1 - ab_s[i]) ** 0.5
        a_t, b_t = ab_t[i] ** 0.5, (1 - ab_t[i]) ** 0.5
        t_i = t_model[i].expand(x.shape[0])
        eps = _eps_from(model(x, t_i, cond), x, a_s, b_s, prediction_type)
        x0 = (x - b_s * eps) / a_s
        x_t = a_t * x0 + b_t * eps
        if fixed_point_iters > 0:
            def g(y: torch.Tensor, x_s: torch.Tensor = x) -> torch.Tensor:  # the inverse step, eps read at y itself
                e = _eps_from(model(y, t_i, cond), y, a_t, b_t, prediction_type)
                return a_t * (x_s - b_s * e) / a_s + b_t * e

            x_t = anderson_fixed_point(g, x_t, fixed_point_iters, anderson_memory, relaxation)
        x = x_t
        if callback is not None:
            callback(i, int(ts[i]), x)
    return x


@torch.no_grad()
def ddim_invert(sd: TinySD, latents: torch.Tensor, prompts: str | list[str], num_steps: int = 50,
                guidance_scale: float = 1.0, negative_prompt: str | list[str] | None = None,
                fixed_point_iters: int = 0, anderson_memory: int = 3, relaxation: float = 0.5,
                callback: Callable | None = None) -> torch.Tensor:
    """Scaled latents z0 (B, 4, 16, 16) -> the z_T from which ``reconstruct`` (DDIM, eta = 0, the same
    ``num_steps``, prompts and scale) comes back to z0. See ``ddim_inverse`` for the step and for
    fixed_point_iters, anderson_memory and relaxation (exact inversion). guidance_scale 1 (no guidance) is
    what inversion is usually run with; above 1 plain inversion drifts (benchmarks/bench_editing.py measures
    how much, and how much exact inversion takes back).
    """
    _check_latents(sd, latents)
    model = _guided(sd, _prompts(prompts, latents.shape[0]), guidance_scale, negative_prompt)
    return ddim_inverse(model, latents.to(sd.device, sd.dtype), sd.schedule,
                        default_timesteps(num_steps, sd.schedule.num_train_timesteps), None,
                        prediction_type=sd.unet.config.prediction_type, fixed_point_iters=fixed_point_iters,
                        anderson_memory=anderson_memory, relaxation=relaxation, callback=callback)


@torch.no_grad()
def reconstruct(sd: TinySD, noise_latents: torch.Tensor, prompts: str | list[str], num_steps: int = 50,
                guidance_scale: float = 1.0, negative_prompt: str | list[str] | None = None) -> torch.Tensor:
    """DDIM sampling (eta = 0) from an inverted z_T back to scaled latents z0: ``TinySD.generate``'s loop with
    the starting latents given. Use the num_steps, prompts and scale of the inversion to get the image back,
    or change the prompt to edit it."""
    _check_latents(sd, noise_latents, "noise_latents")
    prompts = _prompts(prompts, noise_latents.shape[0])
    _, z = sd.generate(prompts, num_steps=num_steps, guidance_scale=guidance_scale,
                       negative_prompt=negative_prompt, sampler="ddim", latents=noise_latents, return_latents=True)
    return z
