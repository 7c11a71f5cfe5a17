"""The "check yourself" cell of lesson 6 (notebooks/06_controlnet.ipynb): combining controls and step windows.

The learner writes
- ``combine_controls(residuals, scales)``: several ControlNets' residuals, one ``(down, mid)`` pair
  per control (``down`` a list with one tensor per skip connection), weighted by one scale each
  and summed skip by skip (diffusers' ``MultiControlNetModel``; ``controlnet.MultiControlNet``);
- ``active_steps(num_steps, start, end)``: for each sampling step, whether a control with that
  start/end window acts (diffusers' ``controlnet_keep``; ``controlnet.Control.active_at``).

Notation (code name -> meaning):
    scale        conditioning scale of one control (0: off, 1: as trained)
    start, end   fractions of the sampling steps: the control acts on step i of n when
                 i / n >= start and (i + 1) / n <= end
"""

from __future__ import annotations

import torch

from course_tools.checking import Exercise, ExerciseResult, Run, run_in_notebook

# ==============================================================================================
# Reference implementations
# ==============================================================================================


def combine_controls(residuals: list, scales: list) -> tuple[list[torch.Tensor], torch.Tensor]:
    """sum_k scale_k * residual_k, skip connection by skip connection, and for the mid block."""
    down = [sum(s * d[i].double() for (d, _), s in zip(residuals, scales)) for i in range(len(residuals[0][0]))]
    mid = sum(s * m.double() for (_, m), s in zip(residuals, scales))
    return down, mid


def active_steps(num_steps: int, start: float, end: float) -> list[bool]:
    """diffusers' rule: control on step i of n when i / n >= start and (i + 1) / n <= end."""
    return [i / num_steps >= start and (i + 1) / num_steps <= end for i in range(num_steps)]


# ==============================================================================================
# The checks
# ==============================================================================================
L06 = Exercise("l06_combine_controls", "Lesson 6: several controls and their step windows",
               targets=("combine_controls", "active_steps"))

SKIP_SHAPES = [(2, 32, 8, 8), (2, 32, 8, 8), (2, 32, 4, 4), (2, 64, 4, 4)]  # the tiny U-Net's skips, batch 2
MID_SHAPE = (2, 64, 4, 4)


def _residuals(run: Run, n_controls: int, k: int) -> list:
    out = []
    for c in range(n_controls):
        down = [run.randn(*s, k=k + 10 * c + i) for i, s in enumerate(SKIP_SHAPES)]
        out.append((down, run.randn(*MID_SHAPE, k=k + 10 * c + 9)))
    return out


def _pair(run: Run, got, label: str) -> tuple[list, object]:
    run.expect(isinstance(got, (tuple, list)) and len(got) == 2, f"{label} to return a pair (down, mid)",
               f"{type(got).__name__}" + (f" of length {len(got)}" if isinstance(got, (tuple, list)) else ""),
               "Return two things: the list of summed down residuals, and the summed mid residual.")
    down, mid = got
    run.expect(isinstance(down, (list, tuple)) and len(down) == len(SKIP_SHAPES),
               f"down to be a list of {len(SKIP_SHAPES)} tensors (one per skip connection)",
               f"{type(down).__name__}" + (f" of length {len(down)}" if isinstance(down, (list, tuple)) else ""),
               "Sum the residuals skip by skip: down[i] = sum over controls of scale * that control's down[i].")
    return list(down), mid


@L06.check("combine_controls sums the scaled residuals skip by skip, and the mid residuals", points=2,
           hint="down[i] = sum_k scales[k] * residuals[k][0][i]; mid = sum_k scales[k] * residuals[k][1].")
def _(run, learner):
    for n, k in ((2, 0), (3, 40)):
        res = _residuals(run, n, k)
        scales = [float(s) for s in run.rng(k).uniform(0.2, 1.8, size=n)]
        label = f"combine_controls(<{n} controls>, {[round(s, 2) for s in scales]})"
        down, mid = _pair(run, run.call(learner.combine_controls, res, scales, label=label), label)
        want_down, want_mid = combine_controls(res, scales)
        for i, (g, w) in enumerate(zip(down, want_down)):
            run.close(g, w, f"down[{i}] of {label}", rtol=1e-5, atol=1e-5, kind="tensor")
        run.close(mid, want_mid, f"mid of {label}", rtol=1e-5, atol=1e-5, kind="tensor")


@L06.check("a control with scale 0 drops out exactly; one control at scale 1 is passed through", points=1,
           hint="Multiply each control's residuals by its own scale before adding them up.")
def _(run, learner):
    res = _residuals(run, 2, 80)
    down, mid = _pair(run, run.call(learner.combine_controls, res, [1.0, 0.0], label="combine_controls(<2>, [1.0, 0.0])"),
                      "combine_controls")
    for i, (g, w) in enumerate(zip(down, res[0][0])):
        run.close(g, w, f"down[{i}] with scales [1, 0]", rtol=0, atol=1e-6, kind="tensor")
    run.close(mid, res[0][1], "mid with scales [1, 0]", rtol=0, atol=1e-6, kind="tensor")


@L06.check("active_steps(n, start, end) follows diffusers' window rule for every step", points=2,
           hint="Step i of n is on when i / n >= start and (i + 1) / n <= end.")
def _(run, learner):
    rng = run.rng(1)
    cases = [(20, 0.0, 1.0), (20, 0.0, 0.5), (10, 0.3, 0.8), (7, 0.25, 1.0)]
    cases += [(int(rng.integers(5, 40)), round(float(a), 2), round(float(b), 2))
              for a, b in [sorted(rng.uniform(0, 1, size=2)) for _ in range(3)]]
    for n, start, end in cases:
        if end <= start:
            continue
        label = f"active_steps({n}, {start}, {end})"
        got = run.call(learner.active_steps, n, start, end, label=label)
        run.expect(isinstance(got, (list, tuple, torch.Tensor)) and len(got) == n, f"{label} to give {n} values",
                   f"{type(got).__name__}" + (f" of length {len(got)}" if hasattr(got, "__len__") else ""),
                   "Return one True/False per sampling step.")
        got = [bool(v) for v in got]
        want = active_steps(n, start, end)
        if got != want:
            i = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
            run.expect(False, f"{label}[{i}] = {want[i]}", f"{got[i]} (on for steps "
                       f"{[j for j, v in enumerate(got) if v]}, expected {[j for j, v in enumerate(want) if v]})")


def check_yourself(combine_controls_fn, active_steps_fn) -> ExerciseResult:
    """Run lesson 6's checks on your two functions: a table of checks, or a one-line error while one fails."""
    return run_in_notebook(L06, (combine_controls_fn, active_steps_fn))
