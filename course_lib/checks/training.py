"""Checks of latent-diffusion training: one training step of the U-Net, with caption dropout and the eps loss.

| id | where | kind |
| --- | --- | --- |
| diffusion_training_step | solutions/07_pipeline_exercises.ipynb | graded exercise |

The learner writes ``training_step(unet, z0, context, uncond_context, alpha_bar, generator, p_uncond)``:
DDPM's Algorithm 1 (Ho et al. 2020) on scaled latents, with the text conditioning of Rombach et al. 2022
and the caption dropout that classifier-free guidance needs (Ho & Salimans 2022), as in
``notebooks/07_complete_pipeline.ipynb`` (section 9) and ``course_lib/train.py`` (``train_unet``).
The draws from ``generator`` come in one documented order, so the checks can replay them:
t, then eps, then the dropout mask.

Notation (code name -> paper symbol):
    alpha_bar   ᾱ_t      cumulative product of (1 - β) (DDPM), a (T,) tensor indexed by t
    z0, z_t     z_0, z_t  scaled clean latents, and the same noised to level t
    eps         ε         the Gaussian noise the U-Net learns to predict
    p_uncond    p         share of captions replaced by the empty prompt (SD 1.5 and the course: 0.1)
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from course_tools.agent import Probe, ProbeDenoiser
from course_tools.checking import Exercise, Failed, Run

Mistake = Literal["none", "x0_target", "no_sqrt", "drop_latents", "sum"]

# ==============================================================================================
# Reference implementation, and the usual mistakes (to name them in the feedback)
# ==============================================================================================


def training_step(unet, z0: torch.Tensor, context: torch.Tensor, uncond_context: torch.Tensor,
                  alpha_bar: torch.Tensor, generator: torch.Generator, p_uncond: float,
                  mistake: Mistake = "none") -> torch.Tensor:
    """The loss of one epsilon-prediction training step; ``mistake`` replays a usual error instead.

    z0 (B, C, h, w) scaled latents; context (B, L, D) their captions' text states; uncond_context
    (1, L, D) the empty prompt's states; alpha_bar (T,). Draws, in this order: t ~ U{0..T-1} (B,),
    eps ~ N(0, I) like z0, the dropout mask rand(B) < p_uncond.
    """
    b = z0.shape[0]
    t = torch.randint(0, len(alpha_bar), (b,), generator=generator)  # (B,)
    eps = torch.randn(z0.shape, generator=generator, dtype=z0.dtype)  # (B, C, h, w)
    drop = torch.rand(b, generator=generator) < p_uncond  # (B,)
    if mistake == "drop_latents":  # the dropout zeroes latents instead of captions
        z0 = torch.where(drop[:, None, None, None], torch.zeros_like(z0), z0)
    else:
        context = torch.where(drop[:, None, None], uncond_context.expand_as(context), context)  # (B, L, D)
    ab = alpha_bar.to(z0.dtype)[t].reshape(b, 1, 1, 1)  # (B, 1, 1, 1)
    if mistake == "no_sqrt":
        z_t = ab * z0 + (1 - ab) * eps
    else:
        z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
    target = z0 if mistake == "x0_target" else eps
    squared = (unet(z_t, t, context) - target) ** 2
    return squared.sum() if mistake == "sum" else squared.mean()


MISTAKE_HINTS = {
    "x0_target": "Your loss compares the prediction with z0: the U-Net predicts the noise. The target is eps, the "
                 "noise you drew: loss = mean((unet(z_t, t, context) - eps)²).",
    "no_sqrt": "Your z_t uses ᾱ_t and 1 - ᾱ_t as weights: they are variances. The weights are their square roots: "
               "z_t = sqrt(ᾱ_t)·z0 + sqrt(1 - ᾱ_t)·eps, so that z_t keeps unit variance.",
    "drop_latents": "Your step drops latents, not captions: caption dropout replaces the *text states* of a share "
                    "p_uncond of the rows by uncond_context and leaves z0 alone.",
    "sum": "Your loss is a sum over all elements: take the mean (F.mse_loss's default), so that the loss does not "
           "grow with the batch and the learning rate means the same at any size.",
}


def _case(run: Run, k: int, b: int = 6, tokens: int = 5, width: int = 8):
    """Latents, text states, the empty prompt's states and SD's ᾱ table for one seeded case."""
    z0 = run.randn(b, 4, 8, 8, k=k)
    context = run.randn(b, tokens, width, k=k + 20)
    uncond = run.randn(1, tokens, width, k=k + 40) * 0.1
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled-linear betas
    alpha_bar = torch.cumprod(1 - betas, dim=0).float()  # (1000,)
    return z0, context, uncond, alpha_bar


def _reference(run: Run, k: int, case, p_uncond: float, mistake: Mistake = "none") -> float:
    z0, context, uncond, alpha_bar = case
    with torch.no_grad():
        return float(training_step(ProbeDenoiser(seed=run.seeds[k % 3]), z0, context, uncond, alpha_bar,
                                   torch.Generator().manual_seed(run.seeds[k % 3] + k), p_uncond, mistake))


def _loss_of(run: Run, learner, k: int, case, p_uncond: float) -> float:
    z0, context, uncond, alpha_bar = case
    got = run.call(learner.training_step, Probe.of("denoiser", seed=run.seeds[k % 3]), z0, context, uncond,
                   alpha_bar, Probe.of("generator", seed=run.seeds[k % 3] + k), p_uncond,
                   label=f"training_step(unet, z0 {tuple(z0.shape)}, ..., p_uncond={p_uncond})")
    return run.number(got, f"training_step(..., p_uncond={p_uncond})")


def _compare(run: Run, learner, k: int, case, p_uncond: float, mistakes: tuple, hint: str) -> None:
    """The learner's loss against the reference; when it matches a usual mistake instead, say which."""
    got = _loss_of(run, learner, k, case, p_uncond)
    want = _reference(run, k, case, p_uncond)
    if np.isclose(got, want, rtol=1e-4, atol=1e-6):
        return
    for mistake in mistakes:
        if np.isclose(got, _reference(run, k, case, p_uncond, mistake), rtol=1e-4, atol=1e-6):
            raise Failed(f"training_step(..., p_uncond={p_uncond}) = {want:.6g}", f"{got:.6g}",
                         MISTAKE_HINTS[mistake])
    raise Failed(f"training_step(..., p_uncond={p_uncond}) = {want:.6g} (tolerance rtol 1e-4)", f"{got:.6g}", hint)


# ==============================================================================================
# Exercise: one training step
# ==============================================================================================
TRAINING_STEP = Exercise("diffusion_training_step", "One latent-diffusion training step",
                         targets=("training_step",), call_timeout=20.0)

_ORDER_HINT = ("Draw from `generator` in this order: t = torch.randint(0, len(alpha_bar), (B,)), then eps = "
               "torch.randn(z0.shape), then drop = torch.rand(B) < p_uncond; z_t = sqrt(ᾱ_t)·z0 + sqrt(1 - ᾱ_t)·eps; "
               "loss = mean((unet(z_t, t, context) - eps)²).")


@TRAINING_STEP.check("without dropout (p_uncond = 0) the loss is the eps MSE of z_t = sqrt(ᾱ_t)·z0 + sqrt(1 - ᾱ_t)·eps",
                     points=3, hint=_ORDER_HINT)
def _(run, learner):
    for k in range(3):
        _compare(run, learner, k, _case(run, k), 0.0, ("x0_target", "no_sqrt", "sum"), _ORDER_HINT)


@TRAINING_STEP.check("with dropout the mask is drawn after t and eps, and dropped rows read uncond_context", points=2,
                     hint=_ORDER_HINT + " Replace the dropped rows' context: torch.where(drop[:, None, None], "
                                        "uncond_context, context).")
def _(run, learner):
    for k, p in ((3, 0.5), (4, 1.0), (5, 0.3)):
        _compare(run, learner, k, _case(run, k, b=8), p, ("drop_latents", "x0_target", "no_sqrt", "sum"),
                 _ORDER_HINT + " Replace the dropped rows' context: torch.where(drop[:, None, None], "
                               "uncond_context, context).")


@TRAINING_STEP.check("the loss is a tensor that backpropagates (for loss.backward() and the optimiser)", points=1,
                     hint="Return the loss tensor itself: not loss.item() or float(loss), and not computed under "
                          "torch.no_grad(), or the optimiser has no gradient to follow.")
def _(run, learner):
    z0, context, uncond, alpha_bar = _case(run, 6)
    out = run.vjp(learner.training_step, Probe.of("denoiser", seed=run.seeds[0]), z0, context, uncond, alpha_bar,
                  Probe.of("generator", seed=run.seeds[0]), 0.0, wrt=[1], grad_output=torch.tensor(1.0),
                  label="training_step(...) then loss.backward()")
    grad = run.tensor(out["arg_grads"][0], "the gradient of the loss with respect to z0", shape=tuple(z0.shape))
    run.expect(bool(np.abs(grad).sum() > 0), "a non-zero gradient with respect to z0", "zero everywhere",
               "The loss must depend on z0 through z_t and the U-Net's prediction.")


@TRAINING_STEP.check("Verify: about p_uncond of the captions are dropped, and only captions", points=2,
                     hint="drop = torch.rand(B, generator=generator) < p_uncond drops each row with probability "
                          "p_uncond (`>` would keep it with that probability); a dropped row's context is replaced "
                          "by uncond_context, its latents are left alone.")
def _(run, learner):
    # A dropped row's text states never reach the U-Net, so the loss's gradient with respect to them is
    # exactly zero: the rows with a zero gradient are the dropped ones.
    b = 800
    for k, p in ((7, 0.2), (8, 0.0), (9, 1.0)):
        z0, context, uncond, alpha_bar = _case(run, k, b=b)
        out = run.vjp(learner.training_step, Probe.of("denoiser", seed=run.seeds[k % 3]), z0, context, uncond,
                      alpha_bar, Probe.of("generator", seed=run.seeds[k % 3] + k), p, wrt=[2],
                      grad_output=torch.tensor(1.0), label=f"training_step(<batch of {b}>, p_uncond={p}) then backward()")
        grad = run.tensor(out["arg_grads"][0], "the gradient with respect to context", shape=tuple(context.shape))
        dropped = float((np.abs(grad).reshape(b, -1).sum(axis=1) == 0).mean())
        if p == 0.2 and dropped == 0.0:
            latents_hit = _reference(run, k, (z0, context, uncond, alpha_bar), p, "drop_latents")
            got = run.number(out["output"], "the loss")
            hint = MISTAKE_HINTS["drop_latents"] if np.isclose(got, latents_hit, rtol=1e-4) else None
            raise Failed(f"about 20% of the {b} rows' captions dropped (their context unused)",
                         "no row's context was dropped", hint)
        run.expect(abs(dropped - p) <= 0.05, f"a share of about {p:.0%} of the {b} captions dropped (± 5 points)",
                   f"{dropped:.1%}")
