"""The "check yourself" cells of lessons 4 and 5: one short exercise each, checked with seeded cases.

Lesson 4 (notebooks/04_classifier_free_guidance.ipynb): ``cfg`` with one guidance scale per sample,
the batched form that lets a whole guidance sweep run as one sampling loop.
Lesson 5 (notebooks/05_ddim_and_samplers.ipynb): ``spaced_timesteps``, which timesteps a sampler
visits under "leading" (with SD's steps_offset), "trailing" and "linspace" spacing.

A lesson's cell calls ``check_yourself(exercise_id, *objects)``, which works like
``course_lib.checks.check``: a table of checks, and a one-line error while one fails.

Notation (code name -> paper symbol):
    scale      w     guidance scale, SD's convention (w = 1: the conditional prediction)
    T          number of training timesteps (1000), timesteps 0 .. T-1
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from course_tools.checking import Exercise, Run, run_in_notebook
from course_lib.schedules import make_timesteps

# ==============================================================================================
# Reference implementations
# ==============================================================================================


def cfg(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale) -> torch.Tensor:
    """uncond + w (cond - uncond), with w a number or one scale per sample (B,), broadcast as (B, 1, ...)."""
    w = torch.as_tensor(scale, dtype=torch.float64)
    if w.ndim == 1:
        w = w.view(-1, *([1] * (pred_cond.ndim - 1)))  # (B, 1, 1, 1)
    return pred_uncond.double() + w * (pred_cond.double() - pred_uncond.double())


def spaced_timesteps(num_steps: int, spacing: str, steps_offset: int = 1, T: int = 1000) -> torch.Tensor:
    """diffusers' spacings (Lin et al. 2023, Table 2), noisiest first; steps_offset applies to "leading" only."""
    return make_timesteps(num_steps, T, spacing, steps_offset if spacing == "leading" else 0)


# ==============================================================================================
# Lesson 4: classifier-free guidance with one scale per sample
# ==============================================================================================
CFG_PER_SAMPLE = Exercise("l04_cfg_per_sample", "Guidance with one scale per sample", targets=("cfg",))


def _preds(run: Run, k: int, shape=(3, 4, 8, 8)):
    return run.randn(*shape, k=k), run.randn(*shape, k=k + 10)


@CFG_PER_SAMPLE.check("cfg(u, c, w) = u + w (c - u) for a number w", points=1,
                      hint="Step from the unconditional prediction along (cond - uncond), w times as far.")
def _(run, learner):
    for k, w in enumerate((7.5, 0.0, 1.0, float(run.rng(0).uniform(1.5, 20)))):
        u, c = _preds(run, k)
        run.close(run.call(learner.cfg, u, c, w), cfg(u, c, w), f"cfg(uncond, cond, {w:g})", rtol=1e-5, atol=1e-5,
                  kind="tensor")


@CFG_PER_SAMPLE.check("cfg(u, c, w) with w of shape (B,): sample i is guided with scale w[i]", points=2,
                      hint="A (B,) tensor broadcasts against (B, 4, 8, 8) along the LAST axis, not the batch: "
                           "reshape it to (B, 1, 1, 1) first, e.g. w.view(-1, *[1] * (cond.ndim - 1)).")
def _(run, learner):
    for k, B in enumerate((4, 3)):  # B = 4 is the trap: a (4,) vector also broadcasts against the last axis
        shape = (B, 4, 8, 4) if B == 4 else (B, 4, 8, 8)
        u, c = _preds(run, k + 20, shape)
        w = torch.from_numpy(run.rng(k + 1).uniform(1.0, 15.0, size=B)).float()
        run.close(run.call(learner.cfg, u, c, w), cfg(u, c, w), f"cfg(uncond, cond, <{B} scales>)", rtol=1e-5,
                  atol=1e-5, kind="tensor")


@CFG_PER_SAMPLE.check("Verify: w = 0 gives the unconditional prediction and w = 1 the conditional one", points=1,
                      hint="u + 0 (c - u) = u and u + 1 (c - u) = c.")
def _(run, learner):
    u, c = _preds(run, 30)
    run.close(run.call(learner.cfg, u, c, torch.tensor([0.0, 1.0, 0.0])), torch.stack([u[0], c[1], u[2]]),
              "cfg(uncond, cond, tensor([0, 1, 0]))", rtol=1e-5, atol=1e-5, kind="tensor")


# ==============================================================================================
# Lesson 5: which timesteps a sampler visits
# ==============================================================================================
TIMESTEPS = Exercise("l05_spaced_timesteps", "Timestep spacing", targets=("spaced_timesteps",))


def _ts(run: Run, learner, n: int, spacing: str, **kw: Any) -> np.ndarray:
    label = f"spaced_timesteps({n}, {spacing!r}" + "".join(f", {k}={v}" for k, v in kw.items()) + ")"
    got = run.call(learner.spaced_timesteps, n, spacing, **kw, label=label)
    arr = run.tensor(got, label, shape=(n,), kind="any")
    run.expect(bool(np.all(np.diff(arr) < 0)), f"{label} in decreasing order (noisiest first)",
               f"{arr[:5].astype(int).tolist()}...", "Samplers start at the noisiest timestep: flip the order.")
    return arr


@TIMESTEPS.check('"leading": multiples of T // N, plus steps_offset (SD: 981, 961, ..., 1 for 50 steps)', points=1,
                 hint="np.arange(N)[::-1] * (T // N) + steps_offset.")
def _(run, learner):
    for n, off in ((50, 1), (20, 0), (int(run.rng(2).integers(3, 60)), 1)):
        want = spaced_timesteps(n, "leading", off).numpy()
        run.close(_ts(run, learner, n, "leading", steps_offset=off), want, f"spaced_timesteps({n}, 'leading', "
                  f"steps_offset={off})", rtol=0, atol=0)


@TIMESTEPS.check('"trailing": count back from T - 1 in steps of T / N (999, 979, ..., 19 for 50 steps)', points=1,
                 hint="np.round(np.arange(T, 0, -T / N)) - 1: it always starts at the last training timestep.")
def _(run, learner):
    for n in (50, 7, int(run.rng(3).integers(3, 60))):
        got = _ts(run, learner, n, "trailing")
        want = spaced_timesteps(n, "trailing").numpy()
        run.equal(int(got[0]), 999, f"spaced_timesteps({n}, 'trailing')[0]",
                  "Trailing spacing starts at T - 1 = 999, the timestep with the least signal.")
        run.close(got, want, f"spaced_timesteps({n}, 'trailing')", rtol=0, atol=1,
                  hint="Count back from T in steps of T / N, round, subtract 1.")


@TIMESTEPS.check('"linspace": N points evenly over [0, T - 1], rounded (999 ... 0)', points=1,
                 hint="np.linspace(0, T - 1, N).round()[::-1]: both ends are visited.")
def _(run, learner):
    for n in (50, 7, int(run.rng(4).integers(3, 60))):
        got = _ts(run, learner, n, "linspace")
        run.equal((int(got[0]), int(got[-1])), (999, 0), f"spaced_timesteps({n}, 'linspace') first and last")
        run.close(got, spaced_timesteps(n, "linspace").numpy(), f"spaced_timesteps({n}, 'linspace')", rtol=0, atol=1)


# ==============================================================================================
# Entry point for the lessons' cells
# ==============================================================================================
EXERCISES: dict[str, Exercise] = {ex.id: ex for ex in (CFG_PER_SAMPLE, TIMESTEPS)}


def check_yourself(exercise_id: str, *objects: Any):
    """Run one lesson exercise's checks on your objects; shows the table, stops with one line if a check fails."""
    if exercise_id not in EXERCISES:
        raise KeyError(f"no exercise {exercise_id!r}; known: {', '.join(EXERCISES)}")
    return run_in_notebook(EXERCISES[exercise_id], objects)
