"""Checks for solutions/06_controlnet_exercises.ipynb: the zero convolution and how ControlNet adds
its features to the frozen U-Net's.

Lesson: notebooks/06_controlnet.ipynb (zero convolutions, trainable copy, control strength).
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
ZERO_CONV = Exercise("ex06_zero_convolution", "Zero convolution", targets=("zero_conv", "add_control"))


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
