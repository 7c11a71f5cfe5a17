"""Checks of ControlNet: the zero convolution and adding control, an edge map from an object mask, several controls
and their step windows.

| id | where | kind |
| --- | --- | --- |
| zero_convolution | solutions/06_controlnet_exercises.ipynb | graded exercise |
| edge_map_from_mask | solutions/06_controlnet_exercises.ipynb | graded exercise |
| combine_controls | notebooks/06_controlnet.ipynb | check yourself |

Notation (code name -> meaning):
    scale        conditioning scale of one control (0: off, 1: as trained)
    start, end   fractions of the sampling steps: the control acts on step i of n when
                 i / n >= start and (i + 1) / n <= end
    labels       (N, H, W) object-label map: 0 background, k for object k (a bool mask: one object)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from course_lib import data
from course_tools.checking import Exercise, Failed, Run

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
# Exercise: an edge map from an object mask (the control images the tiny ControlNet was trained on)
# ==============================================================================================


def edge_map_from_mask(labels: torch.Tensor) -> torch.Tensor:
    """``data.edge_map`` for label maps of any size: the one-pixel inner boundary of every object.

    labels: (N, H, W), 0 for background and k for object k (bool: one object). A pixel is an edge when it
    belongs to an object and one of its 4 neighbours (sharing a side) holds another label; outside the
    image counts as another label. Returns (N, H, W) bool.
    """
    lab = labels.long()
    padded = F.pad(lab, (1, 1, 1, 1), value=-1)  # (N, H+2, W+2); -1 = outside, no object's label
    h, w = lab.shape[-2:]
    differs = torch.zeros(lab.shape, dtype=torch.bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):  # up, down, left, right
        differs |= padded[:, dy:dy + h, dx:dx + w] != lab
    return differs & (lab > 0)


EDGE_MAP = Exercise("edge_map_from_mask", "An edge map from a mask", targets=("edge_map_from_mask",))


def _at(idx: np.ndarray) -> str:
    n, y, x = (int(i) for i in idx)
    return f"scene {n}, row {y}, column {x}"


def _pixels(n: int) -> str:
    return f"{n} edge pixel" + ("" if n == 1 else "s")


def _edges(run: Run, learner, labels: torch.Tensor, label: str, hint: str | None = None) -> None:
    """Call the learner on ``labels`` and compare with the reference, saying where the edges differ and how."""
    got = run.call(learner.edge_map_from_mask, labels, label=label)
    arr = run.tensor(got, label, shape=tuple(labels.shape))
    if not np.isin(arr, (0, 1)).all():
        raise Failed(f"{label} to hold only True/False (or 0/1)", f"values such as {sorted(set(arr.ravel().tolist()))[:5]}",
                     "Return a bool tensor: True where a pixel is an edge.")
    have, want = arr.astype(bool), edge_map_from_mask(labels).numpy()
    if (have == want).all():
        return
    lab = labels.long().numpy()
    extra, missing = have & ~want, want & ~have
    parts = []
    if extra.any():
        on_bg = int((extra & (lab == 0)).sum())
        where = "on the background beside an object" if on_bg == int(extra.sum()) else "inside objects" if on_bg == 0 \
            else "on the background and inside objects"
        parts.append(f"{_pixels(int(extra.sum()))} where the reference has none, {where} (first at "
                     f"{_at(np.argwhere(extra)[0])})")
    if missing.any():
        parts.append(f"{_pixels(int(missing.sum()))} missing (first at {_at(np.argwhere(missing)[0])})")
    raise Failed(f"{label} to equal the world's edge map ({_pixels(int(want.sum()))})", "; ".join(parts), hint)


def _labels(rows: list[str]) -> torch.Tensor:
    """A hand-made (1, H, W) label map from strings: '.' background, a digit the object with that label."""
    return torch.tensor([[0 if ch == "." else int(ch) for ch in r] for r in rows], dtype=torch.long)[None]


def _scene_labels(scenes) -> torch.Tensor:
    """(N, H, W) uint8 label maps of rendered scenes, as ``data.render`` builds them: the visible masks are disjoint."""
    k = torch.arange(1, scenes.masks.shape[1] + 1, dtype=torch.uint8).view(1, -1, 1, 1)
    return (scenes.masks.to(torch.uint8) * k).sum(1).to(torch.uint8)


@EDGE_MAP.check("a single pixel and a filled rectangle: (N, H, W) bool, the one-pixel inner boundary", points=1,
                hint="A pixel is an edge when it belongs to an object (label > 0) and one of its 4 neighbours "
                     "(up, down, left, right) holds another label. Return a bool tensor of the input's shape.")
def _(run, learner):
    rng = run.rng(0)
    h, w = int(rng.integers(7, 12)), int(rng.integers(7, 12))
    dot = torch.zeros(1, h, w, dtype=torch.long)
    dot[0, h // 2, w // 2] = 1
    _edges(run, learner, dot, f"edge_map_from_mask(<one pixel in a {h}x{w} map>)")
    box = torch.zeros(2, h, w, dtype=torch.long)
    box[0, 2:h - 2, 2:w - 2] = 1  # a filled rectangle: its edge is its outermost ring
    box[1, 1:h - 3, 3:w - 1] = int(rng.integers(2, 9))  # any label, not only 1
    _edges(run, learner, box, f"edge_map_from_mask(<filled rectangles in {h}x{w} maps>)")
    _edges(run, learner, box > 0, "edge_map_from_mask(<the same as a bool mask>)",
           "A bool mask is a label map with one object: True is object 1 (labels.long() turns it into 0 and 1).")


@EDGE_MAP.check("the edge is the object's own outermost pixels (inner boundary), not the background around it",
                points=1, hint="Mark object pixels that have a neighbour outside the object, never background "
                               "pixels that touch an object: the world draws each outline on the object itself.")
def _(run, learner):
    rng = run.rng(1)
    side = 15
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    cy, cx, r = 7 + float(rng.uniform(-0.5, 0.5)), 7 + float(rng.uniform(-0.5, 0.5)), float(rng.uniform(4.2, 5.8))
    disc = (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).long()[None]
    _edges(run, learner, disc, f"edge_map_from_mask(<a disc of radius {r:.1f}>)")


@EDGE_MAP.check("only the 4 neighbours that share a side count: a diagonal neighbour makes no edge", points=1,
                hint="Compare each pixel with the pixels above, below, left and right of it only. With the "
                     "diagonals too, slanted sides come out two pixels thick (a 4-connected line).")
def _(run, learner):
    rng = run.rng(2)
    k = int(rng.integers(3, 6))
    side = 2 * k + 5
    yy, xx = torch.meshgrid(torch.arange(side) - side // 2, torch.arange(side) - side // 2, indexing="ij")
    diamond = ((yy.abs() + xx.abs()) <= k).long()[None]  # every side slanted at 45 degrees
    _edges(run, learner, diamond, f"edge_map_from_mask(<a diamond of radius {k}>)")


@EDGE_MAP.check("the image border counts as outside: an object cut by the border has an edge along it", points=1,
                hint="Pad the label map with a value that is no object's label (data.edge_map uses 255, -1 or 0 "
                     "works too) before comparing neighbours. torch.roll wraps around to the other side of the "
                     "image, and replicate padding copies the border pixel, so the border is never an edge.")
def _(run, learner):
    rng = run.rng(3)
    h, w = int(rng.integers(6, 10)), int(rng.integers(6, 10))
    full = torch.ones(1, h, w, dtype=torch.long)  # the whole image is one object: its edge is the border ring
    _edges(run, learner, full, f"edge_map_from_mask(<a {h}x{w} map that is all one object>)")
    corner = torch.zeros(1, h, w, dtype=torch.long)
    corner[0, :3, w - 4:] = 1  # cut by the top and right borders
    corner[0, h - 2:, :2] = 2  # and one in the opposite corner, cut by the bottom and left borders
    _edges(run, learner, corner, "edge_map_from_mask(<two objects in opposite corners>)")


@EDGE_MAP.check("touching objects: both sides of their common boundary are edges", points=1,
                hint="Compare labels, not 'object or not': a pixel whose neighbour belongs to another object is an "
                     "edge of its own object (labels > 0 would merge touching objects into one).")
def _(run, learner):
    grids = [["........", ".111222.", ".111222.", ".111222.", "........"],
             ["........", ".11111..", ".11111..", ".11333..", ".11333..", "........"]]
    rng = run.rng(4)
    for rows in grids:
        labels = _labels(rows)
        relabel = torch.tensor([0] + [int(v) for v in rng.permutation(np.arange(1, 4))])  # any labels, shuffled
        _edges(run, learner, relabel[labels], "edge_map_from_mask(<" + " / ".join(rows) + ">)")


@EDGE_MAP.check("Verify: equal to the world's own edge maps (data.edge_map) on rendered scenes", points=2,
                hint="Scenes overlap and touch the border: each case above is in them. The label maps are "
                     "uint8, as data.edge_map takes them; compare with != rather than subtracting.")
def _(run, learner):
    seed = int(run.rng(5).integers(0, 2**20))
    pool = data.generate(256, seed=seed, split="heldout", object_counts=(0.2, 0.4, 0.4))
    m = pool.masks  # (256, K, 64, 64): some objects reach the border, some touch each other
    at_border = (m[..., 0, :].any(-1) | m[..., -1, :].any(-1) | m[..., :, 0].any(-1) | m[..., :, -1].any(-1)).any(1)
    pick = torch.cat([at_border.nonzero().squeeze(1)[:8], (~at_border).nonzero().squeeze(1)[:8]])
    scenes = pool.select(pick)
    labels = _scene_labels(scenes)  # (16, 64, 64) uint8
    if not torch.equal(data.edge_map(labels)[:, None], scenes.edges):  # the reference is the world's
        raise Failed("the scenes' edge maps to be data.edge_map of their label maps", "they differ: a checker bug")
    _edges(run, learner, labels, f"edge_map_from_mask(<label maps of {len(pick)} held-out scenes, "
                                 f"{int(at_border[pick].sum())} with an object at the border, seed {seed}>)")


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
