"""Checks of flow matching: the conditional flow-matching loss, and Euler's method on the flow ODE.

| id | where | kind |
| --- | --- | --- |
| flow_matching_loss | solutions/11_flow_matching_exercises.ipynb | graded exercise |
| flow_euler_sample | solutions/11_flow_matching_exercises.ipynb | graded exercise |

Notation (code name -> meaning; course_lib/flow.py uses the same):
    x0, noise       data (or scaled latents) and unit Gaussian noise, both (B, ...)
    sigma           flow matching's noise level in [0, 1], one per sample (B,): the share of noise in x_sigma
                    (the SD 3 paper's t; not Karras' sigma of the DDPM-type samplers)
    x_sigma         (1 - sigma) x0 + sigma noise, the straight path from data (sigma = 0) to noise (sigma = 1)
    velocity_fn     v(x, sigma) -> (B, ...), called with sigma of shape (B,); the network predicts d x_sigma / d sigma
    target          noise - x0, the conditional velocity (Lipman et al. 2022; Liu et al. 2022)
    sigmas          a sampling run's num_steps + 1 noise levels from 1 down to 0 (``flow.flow_sigmas``)
    timestep        1000 sigma: what diffusers' FlowMatchEulerDiscreteScheduler and SD 3's transformer call t

The velocity functions live on the learner's side (the grader's sandboxed kernel): the checks have them built there
from seeds (``course_tools.agent``'s probe ``velocity``: a small ``flow.VelocityMLP``, the stand-in function of
tests/test_dit.py, or the exact marginal field of ``flow.GaussianMixture2D.ring()``) and build the same ones here for
the references.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from course_lib.flow import flow_sigmas, uniform_sigmas
from course_tools.agent import Probe, ProbeVelocity, stand_in_velocity
from course_tools.checking import Exercise, Failed, Run

# ==============================================================================================
# Reference implementations (tests/test_checkers.py proves them equal to course_lib.flow and diffusers)
# ==============================================================================================


def flow_matching_loss(velocity_fn, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                       target: str = "noise - x0", path: str = "data at 0", per_sample: bool = True,
                       first_sigma_to_model: bool = False, reduction: str = "mean",
                       unshaped: bool = False) -> torch.Tensor:
    """Conditional flow matching (Lipman et al. 2022, eq. 9 with the straight path of rectified flow; the SD 3 paper,
    Esser et al. 2024, section 2): the mean of |v(x_sigma, sigma) - (noise - x0)|^2, x_sigma = (1 - sigma) x0 + sigma
    noise. ``course_lib.flow.flow_matching_loss`` draws noise and sigma itself; here they are given.

    The keyword arguments make the usual mistakes, for the feedback: ``target="x0 - noise"``, ``path="noise at 0"``
    (sigma x0 + (1 - sigma) noise), ``per_sample=False`` (sigma[0] for the whole batch on the path; with
    ``first_sigma_to_model`` the network is told sigma[0] too), ``reduction="sum"`` or ``"sum per sample"``,
    ``unshaped`` (sigma (B,) left as it is, so that it lines up with x0's last dimension: an error, or, where that
    dimension happens to be B long, a wrong loss)."""
    s = sigma if per_sample else sigma[:1].expand_as(sigma)
    s_b = s.reshape(-1, *([1] * (x0.dim() - 1))).to(x0)  # (B,) -> (B, 1, ...): one level per sample
    s_b = s.to(x0) if unshaped else s_b
    x_sigma = (1 - s_b) * x0 + s_b * noise if path == "data at 0" else s_b * x0 + (1 - s_b) * noise
    v = velocity_fn(x_sigma, s if first_sigma_to_model else sigma)
    err = (v - (noise - x0 if target == "noise - x0" else x0 - noise)) ** 2
    if reduction == "sum":
        return err.sum()
    if reduction == "sum per sample":
        return err.flatten(1).sum(1).mean()
    return err.mean()


@torch.no_grad()
def flow_euler_sample(velocity_fn, noise: torch.Tensor, sigmas: torch.Tensor, sign: float = 1.0,
                      at_next: bool = False, skip_last: bool = False, step_scale: float = 1.0) -> torch.Tensor:
    """Euler's method on dx/dsigma = v(x, sigma) from sigmas[0] (noise) to sigmas[-1] (data), as
    ``course_lib.flow.euler_sample`` and diffusers' ``FlowMatchEulerDiscreteScheduler.step``:
    x <- x + (sigmas[i + 1] - sigmas[i]) v(x, sigmas[i]).

    The keyword arguments make the usual mistakes: ``sign=-1`` (sigma - sigma_next), ``at_next`` (v at sigmas[i + 1]),
    ``skip_last`` (the loop stops at sigmas[-2]), ``step_scale=1000`` (the timestep 1000 sigma in the update)."""
    x = noise
    for i in range(len(sigmas) - 1 - int(skip_last)):
        at = sigmas[i + 1] if at_next else sigmas[i]
        v = velocity_fn(x, at.expand(x.shape[0]))
        x = x + sign * step_scale * (sigmas[i + 1] - sigmas[i]) * v
    return x


def scheduler_sample(noise: torch.Tensor, num_steps: int, shift: float) -> torch.Tensor:
    """diffusers' own loop: ``FlowMatchEulerDiscreteScheduler`` (SD 3's scheduler) driving the stand-in velocity at
    its timesteps (1000 sigma), as tests/test_dit.py runs it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(num_steps)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(stand_in_velocity(x, t.expand(x.shape[0]) / 1000), t, x).prev_sample
    return x


# ==============================================================================================
# Exercise: the conditional flow-matching loss
# ==============================================================================================
FM_LOSS = Exercise("flow_matching_loss", "Flow matching: the loss and where its gradient goes",
                   targets=("flow_matching_loss",))

BROADCAST_HINT = ("sigma has shape (B,): to scale a (B, ...) tensor sample by sample it needs shape (B, 1, ..., 1), "
                  "sigma.view(-1, *[1] * (x0.dim() - 1)). As it is, (B,) lines up with x0's *last* dimension.")
SIGMA_SHAPE_HINT = ("velocity_fn takes sigma itself, a (B,) tensor of noise levels in [0, 1]: call "
                    "velocity_fn(x_sigma, sigma), not with sigma[0], a number, the reshaped (B, 1, ...) sigma or "
                    "1000 sigma.")

# (what the learner did, the variant's keyword arguments, a hint): checked in order when a value is off.
FM_MISTAKES = (
    ("the target x0 - noise", {"target": "x0 - noise"},
     "The target is the velocity d x_sigma / d sigma = noise - x0: the path goes from data (sigma = 0) to noise "
     "(sigma = 1), so it points towards the noise. x0 - noise is the way a sampler walks, not what the network "
     "learns."),
    ("the path sigma x0 + (1 - sigma) noise", {"path": "noise at 0"},
     "The path runs the other way: x_sigma = (1 - sigma) x0 + sigma noise, so sigma = 0 is the data and sigma = 1 "
     "pure noise (the SD 3 paper's z_t = (1 - t) x_0 + t eps)."),
    ("sigma[0] for the whole batch", {"per_sample": False},
     "Each sample has its own noise level: reshape sigma (B,) to (B, 1, ..., 1) "
     "(sigma.view(-1, *[1] * (x0.dim() - 1))) so that it scales each sample, instead of using sigma[0] for all."),
    ("sigma[0] for the whole batch", {"per_sample": False, "first_sigma_to_model": True},
     "Each sample has its own noise level: reshape the whole sigma to (B, 1, ..., 1) for the path, and pass sigma "
     "itself, (B,), to velocity_fn."),
    ("sigma (B,) lined up with x0's last dimension", {"unshaped": True}, None),
    ("the sum of the squared errors", {"reduction": "sum"},
     "Average over every element (F.mse_loss's default reduction 'mean'): a sum grows with the batch and the image "
     "size, and so would the learning rate you need."),
    ("each sample's squared errors summed, then averaged over the batch", {"reduction": "sum per sample"},
     "Average over every element, not only over the batch: F.mse_loss(prediction, target), or ((v - target) ** 2)"
     ".mean()."),
)


def _velocity(run: Run, kind: str, k: int) -> tuple:
    """(the probe to send, the same velocity function here, its label)."""
    seed = run.seeds[k % 3] + k
    here = ProbeVelocity(kind, seed=seed)
    return Probe.of("velocity", kind=kind, seed=seed), here, {"mlp": "<VelocityMLP>", "stand_in": "<stand-in v>",
                                                              "ring": "<the ring's exact v>"}[kind]


def _explain(err: Failed) -> Failed:
    """A learner's error that the checks recognise, with the hint that explains it."""
    if "must match the size of tensor" in (err.got or ""):
        return Failed(err.expected, err.got, BROADCAST_HINT)
    if "velocity_fn(x, sigma) takes" in (err.got or ""):
        return Failed(err.expected, err.got, SIGMA_SHAPE_HINT)
    return err


def _judge_loss(run: Run, got, label: str, velocity_fn, args: tuple) -> None:
    """Compare the learner's loss with the reference on ``velocity_fn`` and ``args`` (x0, noise, sigma), naming a
    known mistake when the value is one of theirs."""
    if not isinstance(got, torch.Tensor):
        raise Failed(f"{label} to be a 0-dim torch.Tensor", f"{type(got).__name__} {got!r}"[:80],
                     "Return the tensor the mean gives, not .item() or a float: training calls .backward() on it.")
    if got.dim() != 0:
        raise Failed(f"{label} to be a 0-dim tensor (one number for the batch)", f"shape {tuple(got.shape)}",
                     "Average over every element: ((v - target) ** 2).mean(), or F.mse_loss(v, target).")
    if not got.is_floating_point():
        raise Failed(f"{label} to be a real floating-point tensor", f"dtype {got.dtype}",
                     "The mean of squared float32 errors is a float32 tensor.")
    have = run.number(got, label)  # finite, one number
    with torch.no_grad():
        want = float(flow_matching_loss(velocity_fn, *args))
        if math.isclose(have, want, rel_tol=1e-4, abs_tol=1e-6):
            return
        for what, kwargs, hint in FM_MISTAKES:
            try:
                wrong = float(flow_matching_loss(velocity_fn, *args, **kwargs))
            except RuntimeError:  # a mistake that cannot even run on these shapes
                continue
            if math.isclose(have, wrong, rel_tol=1e-5, abs_tol=1e-7):
                raise Failed(f"{label} = {want:.6g}", f"{have:.6g}, the loss with {what}", hint or BROADCAST_HINT)
    raise Failed(f"{label} = {want:.6g} (tolerance rtol 0.0001)", f"{have:.6g}", None)


def _loss_case(run: Run, learner, k: int, kind: str, shape: tuple, sigma: list[float]) -> None:
    """Call the learner's loss on one case (x0 and noise of ``shape``, one sigma per sample) and judge it."""
    probe, here, name = _velocity(run, kind, k)
    x0 = run.randn(*shape, k=k + 100) * (2.0 if kind == "mlp" else 1.0)
    noise = run.randn(*shape, k=k + 200)
    s = torch.tensor(sigma, dtype=torch.float32)
    label = f"flow_matching_loss({name}, x0 {tuple(shape)}, noise, sigma={[round(v, 3) for v in sigma]})"
    try:
        got = run.call(learner.flow_matching_loss, probe, x0, noise, s, label=label)
    except Failed as err:
        raise _explain(err) from None
    _judge_loss(run, got, label, here, (x0, noise, s))


def _sigmas(run: Run, k: int, b: int) -> list[float]:
    return [round(float(v), 4) for v in run.rng(k).uniform(0.05, 0.95, size=b)]


@FM_LOSS.check("a 0-dim tensor equal to the reference (2-D points, a small VelocityMLP, one sigma for the batch)",
               points=1,
               hint="x_sigma = (1 - sigma) x0 + sigma noise, with sigma reshaped to (B, 1, ...); "
                    "return ((velocity_fn(x_sigma, sigma) - (noise - x0)) ** 2).mean().")
def _(run, learner):
    _loss_case(run, learner, 0, "mlp", (6, 2), [0.3] * 6)


@FM_LOSS.check("the target is the velocity noise - x0, not x0 - noise ((B, 4, 8, 8) latents)", points=1,
               hint="d x_sigma / d sigma = noise - x0: the network learns the direction from the data to the noise.")
def _(run, learner):
    _loss_case(run, learner, 1, "stand_in", (3, 4, 8, 8), [0.7] * 3)


@FM_LOSS.check("x_sigma = (1 - sigma) x0 + sigma noise: the data at sigma = 0, pure noise at sigma = 1", points=1,
               hint="sigma is the share of noise: (1 - sigma) * x0 + sigma * noise.")
def _(run, learner):
    _loss_case(run, learner, 2, "stand_in", (2, 4, 8, 8), [0.2] * 2)
    _loss_case(run, learner, 3, "mlp", (5, 2), [0.85] * 5)


@FM_LOSS.check("each sample at its own sigma[i]: sigma (B,) broadcast over the other dimensions", points=2,
               hint="sigma.view(-1, *[1] * (x0.dim() - 1)) has shape (B, 1, ..., 1) and scales each sample by its "
                    "own level; velocity_fn gets sigma itself, (B,).")
def _(run, learner):
    _loss_case(run, learner, 4, "stand_in", (3, 4, 8, 8), [0.1, 0.6, 0.95])
    _loss_case(run, learner, 5, "mlp", (5, 2), _sigmas(run, 5, 5))


@FM_LOSS.check("the mean over every element, not a sum", points=1,
               hint="((v - target) ** 2).mean() averages over the batch and every other dimension.")
def _(run, learner):
    _loss_case(run, learner, 6, "stand_in", (4, 4, 8, 8), _sigmas(run, 6, 4))


@FM_LOSS.check("random batches, shapes and noise levels equal the reference", points=1,
               hint="The same loss for any batch size and any shape (B, ...): nothing may depend on B or on x0.dim().")
def _(run, learner):
    rng = run.rng(7)
    for k, (kind, rest) in enumerate((("mlp", (2,)), ("stand_in", (4, 8, 8)), ("stand_in", (3, 5)), ("mlp", (2,)))):
        b = int(rng.integers(1, 7))
        _loss_case(run, learner, 10 + k, kind, (b, *rest), _sigmas(run, 10 + k, b))


@FM_LOSS.check("Verify: .backward() on the loss reaches every parameter of the network", points=2,
               hint="Compute the prediction with the graph on (no torch.no_grad(), no .detach(), no .item()): "
                    "training the network is backpropagating this loss.")
def _(run, learner):
    probe, here, _ = _velocity(run, "mlp", 20)
    ref = run.make(probe)
    x0, noise = run.randn(8, 2, k=21) * 2, run.randn(8, 2, k=22)
    sigma = torch.tensor(_sigmas(run, 23, 8), dtype=torch.float32)
    label = "flow_matching_loss(<VelocityMLP>, x0 (8, 2), noise, sigma).backward()"
    try:
        res = run.call(ref.gradient, learner.flow_matching_loss, x0, noise, sigma, label=label)
    except Failed as err:
        raise _explain(err) from None
    want = here.gradient(flow_matching_loss, x0, noise, sigma)
    if not isinstance(res, dict):
        raise Failed(f"{label} to give a result", f"{type(res).__name__}", None)
    _judge_loss(run, res.get("loss"), label.removesuffix(".backward()"), here, (x0, noise, sigma))
    no_flow = ("The prediction was cut from the graph (torch.no_grad() or .detach()): the loss has no gradient for "
               "the network's weights, so nothing would ever train. Call velocity_fn with the graph on.")
    if not res.get("keeps_graph"):
        raise Failed("a loss that keeps its graph back to the network's parameters",
                     "a loss with requires_grad=False: .backward() has nothing to reach", no_flow)
    grads = res.get("grads") if isinstance(res.get("grads"), dict) else {}
    missing = [k for k in want["grads"] if grads.get(k) is None]
    if missing:
        raise Failed("a gradient on every parameter of the network", f"none on {missing[:3]}", no_flow)
    for name, g in want["grads"].items():
        run.close(grads[name], g.double(), f"the gradient of {name}", rtol=1e-3, atol=1e-6, kind="tensor")


# ==============================================================================================
# Exercise: Euler's method on the flow ODE
# ==============================================================================================
EULER = Exercise("flow_euler_sample", "Flow matching: Euler steps from noise to data", targets=("flow_euler_sample",))

# (what the learner did, the variant's keyword arguments, a hint): checked in order when a result is off.
EULER_MISTAKES = (
    ("the step's sign flipped, x + (sigma - sigma_next) v", {"sign": -1.0},
     "The ODE is dx/dsigma = v and sigma falls from 1 to 0, so each step adds (sigma_next - sigma) v, a negative "
     "multiple of v: x moves against the velocity, from the noise back to the data."),
    ("v evaluated at sigmas[i + 1]", {"at_next": True},
     "Euler's method evaluates the slope where the step starts: v = velocity_fn(x, sigmas[i]), then moves to "
     "sigmas[i + 1]."),
    ("the last step skipped (the loop stops at sigmas[-2])", {"skip_last": True},
     "Take every step: for i in range(len(sigmas) - 1), the last one from sigmas[-2] down to sigmas[-1] = 0. "
     "Without it the sample keeps the noise of its last level."),
    ("the timestep 1000 sigma in the update", {"step_scale": 1000.0},
     "The step is in sigma, (sigmas[i + 1] - sigmas[i]) v with sigma in [0, 1]; the timestep 1000 sigma is only "
     "what a U-Net (and diffusers' scheduler) is called with."),
)


def _judge_sample(run: Run, got, label: str, shape: tuple, want: torch.Tensor, velocity_fn, noise: torch.Tensor,
                  sigmas: torch.Tensor) -> None:
    """Compare the learner's sample with ``want``, naming a known mistake when the sample is one of theirs."""
    if not isinstance(got, torch.Tensor):
        raise Failed(f"{label} to be a tensor of shape {shape}", f"{type(got).__name__}"[:80],
                     "Return x, the tensor the last step made." if got is None or isinstance(got, (list, tuple))
                     else None)
    if tuple(got.shape) != tuple(shape):
        raise Failed(f"{label} of shape {tuple(shape)}", f"shape {tuple(got.shape)}",
                     "Return the final x only, the shape of noise (not the whole trajectory).")
    have = got.double().numpy()
    wanted = want.double().numpy()
    if np.allclose(have, wanted, rtol=1e-5, atol=1e-5):
        return
    for what, kwargs, hint in EULER_MISTAKES:
        variant = flow_euler_sample(velocity_fn, noise, sigmas, **kwargs).double().numpy()
        if np.allclose(have, variant, rtol=1e-4, atol=1e-5, equal_nan=True):
            raise Failed(f"{label} within 1e-5 of the reference", f"the sample with {what}", hint)
    run.close(got, wanted, label, rtol=1e-5, atol=1e-5, kind="tensor")


def _sample_case(run: Run, learner, k: int, shape: tuple, sigmas: torch.Tensor, name: str,
                 want: torch.Tensor | None = None, kind: str = "stand_in") -> torch.Tensor:
    """Call the learner's sampler on one case with a fresh velocity probe; returns the checks' velocity function."""
    probe, here, v_name = _velocity(run, kind, k)
    noise = run.randn(*shape, k=k + 300)
    label = f"flow_euler_sample({v_name}, noise {tuple(shape)}, {name})"
    try:
        got = run.call(learner.flow_euler_sample, probe, noise, sigmas, label=label)
    except Failed as err:
        raise _explain(err) from None
    want = flow_euler_sample(here, noise, sigmas) if want is None else want(noise)
    _judge_sample(run, got, label, shape, want, here, noise, sigmas)


@EULER.check("equals diffusers' FlowMatchEulerDiscreteScheduler loop (shift 1 and 3; 1, 4 and 28 steps) within 1e-5",
             points=3,
             hint="x = noise; for i in range(len(sigmas) - 1): v = velocity_fn(x, sigmas[i].expand(B)); "
                  "x = x + (sigmas[i + 1] - sigmas[i]) * v; return x.")
def _(run, learner):
    for k, (shift, steps) in enumerate((shift, steps) for shift in (1.0, 3.0) for steps in (1, 4, 28)):
        sigmas = flow_sigmas(steps, shift)
        _sample_case(run, learner, k, (2, 4, 8, 8), sigmas, f"flow_sigmas({steps}, shift={shift:g})",
                     want=functools.partial(scheduler_sample, num_steps=steps, shift=shift))


@EULER.check("velocity_fn is called once per step, at sigmas[i], with sigma of shape (B,)", points=2,
             hint="One call per step, before the step: v = velocity_fn(x, sigmas[i].expand(x.shape[0])).")
def _(run, learner):
    # Scored on the sample alone, compared with the reference computed here: the probe's log of calls lives in the
    # learner's process (a submission could write it), so it only explains a wrong sample, it never earns points.
    probe, here, v_name = _velocity(run, "stand_in", 30)
    ref = run.make(probe)
    sigmas = uniform_sigmas(5)
    noise = run.randn(3, 4, 8, 8, k=31)
    label = f"flow_euler_sample({v_name}, noise (3, 4, 8, 8), uniform_sigmas(5))"
    try:
        got = run.call(learner.flow_euler_sample, ref, noise, sigmas, label=label)
    except Failed as err:
        raise _explain(err) from None
    try:
        _judge_sample(run, got, label, (3, 4, 8, 8), flow_euler_sample(here, noise, sigmas), here, noise, sigmas)
    except Failed as err:
        raise Failed(err.expected, err.got, err.hint or _calls_hint(run, ref, sigmas)) from None


def _calls_hint(run: Run, ref, sigmas: torch.Tensor) -> str | None:
    """What the velocity function's log of calls says went wrong (a hint only: the learner's process keeps it)."""
    try:
        calls = run.get(ref.calls, label="the velocity function's log of calls")
        seen = [round(float(c[1]), 5) for c in calls if isinstance(c, (list, tuple)) and len(c) == 3][:64]
    except (Failed, TypeError, ValueError, OverflowError):
        return None
    want = [round(float(s), 5) for s in sigmas[:-1]]
    if seen == [round(float(s), 5) for s in sigmas[1:]]:
        return EULER_MISTAKES[1][2]
    if seen == want[:-1]:
        return EULER_MISTAKES[2][2]
    if seen != want:
        return f"velocity_fn was called at sigma = {seen[:8]}; one call per step at sigmas[i] gives {want}."
    return None


@EULER.check("each step is x + (sigma_next - sigma) v: sigma falls, so x moves against v", points=1,
             hint="(sigmas[i + 1] - sigmas[i]) is negative: x = x + (sigmas[i + 1] - sigmas[i]) * v.")
def _(run, learner):
    _sample_case(run, learner, 40, (3, 4, 8, 8), uniform_sigmas(3, shift=2.0), "uniform_sigmas(3, shift=2)")
    _sample_case(run, learner, 41, (4, 2), uniform_sigmas(6), "uniform_sigmas(6)", kind="mlp")


@EULER.check("the last step, down to sigma = 0, is taken", points=1,
             hint="for i in range(len(sigmas) - 1): the last step goes from sigmas[-2] to sigmas[-1] = 0.")
def _(run, learner):
    _sample_case(run, learner, 50, (2, 4, 8, 8), torch.tensor([1.0, 0.0]), "sigmas [1, 0]")
    _sample_case(run, learner, 51, (2, 3, 5), torch.tensor([1.0, 0.6, 0.25, 0.0]), "sigmas [1, 0.6, 0.25, 0]")


@EULER.check("Verify: with the exact field of a ring of Gaussians (radius 2), 100 uniform steps carry pure noise "
             "onto the ring, as the reference does from the same noise", points=2,
             hint="The exact marginal field and small steps: your sampler must carry pure noise onto the data. Check "
                  "the sign of the step and that the last one, to sigma = 0, is taken.")
def _(run, learner):
    probe, here, v_name = _velocity(run, "ring", 60)
    noise = run.randn(2000, 2, k=61)
    sigmas = uniform_sigmas(100)
    label = f"flow_euler_sample({v_name}, noise (2000, 2), uniform_sigmas(100))"
    try:
        got = run.call(learner.flow_euler_sample, probe, noise, sigmas, label=label)
    except Failed as err:
        raise _explain(err) from None
    x = torch.from_numpy(run.tensor(got, label, shape=(2000, 2)).astype(np.float64))
    radius = x.norm(dim=1)
    mean, spread = float(radius.mean()), float(radius.std())
    run.expect(abs(mean - 2.0) < 0.05 and spread < 0.3,
               "points on the ring: mean radius within 2 ± 0.05 (the data's spread of radius is 0.12)",
               f"mean radius {mean:.3f}, its standard deviation {spread:.3f}")
    # Landing on the ring is not enough: each point must land where the ODE carries its own starting noise.
    run.close(got, flow_euler_sample(here, noise, sigmas).double().numpy(), f"{label}, point by point",
              rtol=1e-4, atol=1e-4, kind="tensor")
