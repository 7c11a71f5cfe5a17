"""Checks of ControlNet: the zero convolution and adding control, several controls and their step windows.

| id | where | kind |
| --- | --- | --- |
| zero_convolution | solutions/06_controlnet_exercises.ipynb | graded exercise |
| combine_controls | notebooks/06_controlnet.ipynb | check yourself |

Notation (code name -> meaning):
    scale        conditioning scale of one control (0: off, 1: as trained)
    start, end   fractions of the sampling steps: the control acts on step i of n when
                 i / n >= start and (i + 1) / n <= end
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from course_tools.checking import Exercise, Run

# ==============================================================================================
# Reference implementations
# ==============================================================================================


def zero_conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x.double(), weight.double(), bias.double())


def add_control(features: list, control: list, weights: list, biases: list, strength: float = 1.0) -> list:
    """Zhang et al. 2023, eq. 2: y_c = F(x) + Z(F_copy(x + Z(c))); here the last Z, per skip feature."""
    return [f.double() + strength * zero_conv_forward(c, w, b) for f, c, w, b in zip(features, control, weights, biases)]


# ==============================================================================================
# Exercise: the zero convolution
# ==============================================================================================
ZERO_CONV = Exercise("zero_convolution", "Zero convolution", targets=("zero_conv", "add_control"))


def _state(run: Run, module, label: str) -> dict:
    sd = run.call(module.state_dict, label=f"{label}.state_dict()")
    run.expect(isinstance(sd, dict), f"{label}.state_dict() to be a dict", f"{type(sd).__name__}")
    return sd


@ZERO_CONV.check("zero_conv(C) is a torch.nn.Conv2d from C to C channels with a 1x1 kernel",
                 hint="torch.nn.Conv2d(channels, channels, kernel_size=1): a weight of shape (C, C, 1, 1) and a bias.")
def _(run, learner):
    for C in (4, 32):
        zc = run.call(learner.zero_conv, C)
        info = run.describe(zc)
        run.expect(info["is_module"] and info["type"].endswith("Conv2d"), "a torch.nn.Conv2d",
                   f"an object of type {info['type']}")
        sd = _state(run, zc, f"zero_conv({C})")
        run.equal(sorted(sd), ["bias", "weight"], f"the parameters of zero_conv({C})")
        run.tensor(sd["weight"], f"zero_conv({C}).weight", shape=(C, C, 1, 1))
        run.tensor(sd["bias"], f"zero_conv({C}).bias", shape=(C,))


@ZERO_CONV.check("its weight and bias start at exactly zero, so its output is zero for any input",
                 hint="torch.nn.init.zeros_(conv.weight) and torch.nn.init.zeros_(conv.bias).")
def _(run, learner):
    zc = run.call(learner.zero_conv, 8)
    x = run.randn(2, 8, 6, 6, k=0) * 100
    run.close(run.call(zc, x, label="zero_conv(8)(x)"), torch.zeros(2, 8, 6, 6), "zero_conv(8)(x)", atol=0,
              rtol=0, kind="tensor")


@ZERO_CONV.check("Verify: at initialisation the weight still gets a gradient, the input does not", points=2,
                 hint="dL/dW = Σ dL/dy · x is not zero even though W = 0, so training moves W away from zero; "
                      "dL/dx = Wᵀ · dL/dy is zero, so the frozen model is undisturbed at first.")
def _(run, learner):
    zc = run.call(learner.zero_conv, 6)
    x, g = run.randn(3, 6, 5, 5, k=1), run.randn(3, 6, 5, 5, k=2)
    res = run.vjp(zc, x, wrt=[0], grad_output=g, label="zero_conv(6)(x).backward(g)")
    run.close(res["arg_grads"][0], torch.zeros_like(x), "the gradient w.r.t. the input", atol=0, rtol=0,
              kind="tensor")
    want_w = torch.einsum("bohw,bihw->oi", g.double(), x.double())[:, :, None, None]
    grads = res["param_grads"]
    run.expect(isinstance(grads, dict) and {"weight", "bias"} <= set(grads), "gradients for weight and bias",
               f"{str(grads)[:80]}")
    run.close(grads["weight"], want_w, "the gradient w.r.t. the weight", rtol=1e-4, atol=1e-4, kind="tensor")
    run.close(grads["bias"], g.double().sum(dim=(0, 2, 3)), "the gradient w.r.t. the bias", rtol=1e-4, atol=1e-4,
              kind="tensor")


def _features(run: Run, k: int):
    shapes = [(2, 4, 16, 16), (2, 8, 8, 8), (2, 16, 4, 4)]
    feats = [run.randn(*s, k=k + i) for i, s in enumerate(shapes)]
    control = [run.randn(*s, k=k + 10 + i) for i, s in enumerate(shapes)]
    return feats, control


@ZERO_CONV.check("add_control leaves the frozen model's features unchanged while the convs are zero", points=1,
                 hint="Return [feature + strength * zero_conv(control) for each level], as a new list.")
def _(run, learner):
    feats, control = _features(run, 0)
    convs = [run.call(learner.zero_conv, f.shape[1]) for f in feats]
    got = run.call(learner.add_control, feats, control, convs, strength=1.0)
    run.close(got, feats, "add_control(features, control, zero_convs) at initialisation", rtol=0, atol=0,
              kind="tensor")


@ZERO_CONV.check("add_control adds strength × zero_conv(control) once the convs have learned", points=2,
                 hint="Each level's control feature goes through its own zero conv; strength scales the result.")
def _(run, learner):
    feats, control = _features(run, 3)
    convs, weights, biases = [], [], []
    for i, f in enumerate(feats):
        C = f.shape[1]
        zc = run.call(learner.zero_conv, C)
        w, b = run.randn(C, C, 1, 1, k=20 + i) * 0.1, run.randn(C, k=30 + i) * 0.1
        run.call(zc.load_state_dict, {"weight": w, "bias": b}, label=f"zero_conv({C}).load_state_dict(...)")
        convs.append(zc)
        weights.append(w)
        biases.append(b)
    for strength in (1.0, 0.35):
        got = run.call(learner.add_control, feats, control, convs, strength=strength)
        run.close(got, add_control(feats, control, weights, biases, strength),
                  f"add_control(..., strength={strength})", rtol=1e-4, atol=1e-5, kind="tensor")


# ==============================================================================================
# Check yourself (notebooks/06_controlnet.ipynb): several controls and their step windows
# ==============================================================================================
# The learner writes
# - ``combine_controls(residuals, scales)``: several ControlNets' residuals, one ``(down, mid)`` pair
#   per control (``down`` a list with one tensor per skip connection), weighted by one scale each
#   and summed skip by skip (diffusers' ``MultiControlNetModel``; ``controlnet.MultiControlNet``);
# - ``active_steps(num_steps, start, end)``: for each sampling step, whether a control with that
#   start/end window acts (diffusers' ``controlnet_keep``; ``controlnet.Control.active_at``).


def combine_controls(residuals: list, scales: list) -> tuple[list[torch.Tensor], torch.Tensor]:
    """sum_k scale_k * residual_k, skip connection by skip connection, and for the mid block."""
    down = [sum(s * d[i].double() for (d, _), s in zip(residuals, scales)) for i in range(len(residuals[0][0]))]
    mid = sum(s * m.double() for (_, m), s in zip(residuals, scales))
    return down, mid


def active_steps(num_steps: int, start: float, end: float) -> list[bool]:
    """diffusers' rule: control on step i of n when i / n >= start and (i + 1) / n <= end."""
    return [i / num_steps >= start and (i + 1) / num_steps <= end for i in range(num_steps)]


COMBINE_CONTROLS = Exercise("combine_controls", "Check yourself: several controls and their step windows",
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


@COMBINE_CONTROLS.check("combine_controls sums the scaled residuals skip by skip, and the mid residuals", points=2,
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


@COMBINE_CONTROLS.check("a control with scale 0 drops out exactly; one control at scale 1 is passed through", points=1,
                        hint="Multiply each control's residuals by its own scale before adding them up.")
def _(run, learner):
    res = _residuals(run, 2, 80)
    down, mid = _pair(run, run.call(learner.combine_controls, res, [1.0, 0.0], label="combine_controls(<2>, [1.0, 0.0])"),
                      "combine_controls")
    for i, (g, w) in enumerate(zip(down, res[0][0])):
        run.close(g, w, f"down[{i}] with scales [1, 0]", rtol=0, atol=1e-6, kind="tensor")
    run.close(mid, res[0][1], "mid with scales [1, 0]", rtol=0, atol=1e-6, kind="tensor")


@COMBINE_CONTROLS.check("active_steps(n, start, end) follows diffusers' window rule for every step", points=2,
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
