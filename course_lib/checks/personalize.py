"""Checks of personalisation: a LoRA layer by hand, and the loss textual inversion minimises.

| id | where | kind |
| --- | --- | --- |
| lora_linear | solutions/10_personalize_exercises.ipynb | graded exercise |
| textual_inversion_loss | solutions/10_personalize_exercises.ipynb | graded exercise |

Notation (code name -> meaning; course_lib/personalize.py uses the same):
    base            the frozen nn.Linear a LoRA layer wraps, W (out_features, in_features) and its bias
    rank, alpha     r and alpha of Hu et al. 2021; the update is scaled by alpha / r (peft's ``scaling``)
    lora_A          A (r, in_features), starts uniform in +-1/sqrt(in_features) (peft: kaiming_uniform_(a=sqrt(5)))
    lora_B          B (out_features, r), starts at zero, so the adapted layer starts as the base layer
    ids             token ids (B, L) of captions that use the new token
    z0, noise       scaled latents and unit Gaussian noise (B, 4, h, w)
    t               timesteps (B,), one per sample
    alphas_cumprod  alpha_bar_t for t = 0 ... T - 1 (T = 1000); z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) noise

The learner's layers and models live on the learner's side (the grader's sandboxed kernel): the checks have
them built there from seeds (``course_tools.agent``'s probes ``linear``, ``unet``, ``text_encoder``,
``new_token``) and build the same ones here for the references.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.schedules import sd_schedule
from course_tools.agent import Probe, ProbeNewToken, probe_linear, probe_text_encoder, probe_unet
from course_tools.checking import Exercise, Failed, Run

# ==============================================================================================
# Reference implementations (tests/test_checkers.py proves them equal to course_lib.personalize and peft)
# ==============================================================================================


@torch.no_grad()
def lora_forward(base: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                 x: torch.Tensor) -> torch.Tensor:
    """Hu et al. 2021, eq. 3: h = W x + (alpha / r) B A x, for x of shape (..., in_features), in float64."""
    x = x.double()
    out = F.linear(x, base.weight.double(), None if base.bias is None else base.bias.double())
    return out + scale * (x @ lora_A.double().T @ lora_B.double().T)  # (..., in) -> (..., r) -> (..., out)


def peft_lora_linear(base: nn.Linear, rank: int, alpha: float, lora_A: torch.Tensor,
                     lora_B: torch.Tensor) -> nn.Module:
    """peft's own layer (``peft.tuners.lora.Linear``) around a copy of ``base``, built as diffusers' LoRA training
    scripts build theirs (``inject_adapter_in_model(LoraConfig(...), model)``), with A and B copied in."""
    from peft import LoraConfig, inject_adapter_in_model

    model = nn.Sequential(OrderedDict(proj=copy.deepcopy(base)))
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"]), model)
    layer = model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    return layer


def textual_inversion_loss(text_encoder: nn.Module, unet: nn.Module, ids: torch.Tensor, z0: torch.Tensor,
                           t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                           target: str = "noise", roots: tuple[bool, bool] = (True, True),
                           per_sample: bool = True, unet_first_t: bool = False) -> torch.Tensor:
    """SD's denoising loss through the text tower (``personalize.denoising_loss`` of ``text_encoder(ids)``): the
    mean of |noise - eps_theta(z_t, t, text)|^2, z_t = sqrt(ab[t]) z0 + sqrt(1 - ab[t]) noise (DDPM eq. 4).

    The keyword arguments make the usual mistakes, for the feedback: ``target="z0"``, ``roots=(False, False)``
    (alpha_bar instead of its square root), ``per_sample=False`` (t[0]'s alpha_bar for the whole batch)."""
    states = text_encoder(ids).last_hidden_state  # (B, L, width), with the graph back to the embedding table
    tt = t if per_sample else t[:1].expand_as(t)
    ab = alphas_cumprod.to(z0)[tt].view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1)
    signal = ab.sqrt() if roots[0] else ab
    rest = (1 - ab).sqrt() if roots[1] else 1 - ab
    z_t = signal * z0 + rest * noise
    pred = unet(z_t, tt if unet_first_t else t, states)
    return F.mse_loss(pred, noise if target == "noise" else z0)


# ==============================================================================================
# Exercise: a LoRA layer by hand
# ==============================================================================================
LORA = Exercise("lora_linear", "LoRA: a low-rank update of a frozen linear layer", targets=("LoRALinear",))


def _layer(run: Run, learner, seed: int, in_features: int, out_features: int, rank: int, alpha: float,
           bias: bool = True):
    """The learner's LoRALinear around a seeded nn.Linear built on its side; returns (its Ref, the same base here,
    a label)."""
    label = f"LoRALinear(<nn.Linear({in_features}, {out_features})>, rank={rank}, alpha={alpha:g})"
    probe = Probe.of("linear", seed=seed, in_features=in_features, out_features=out_features, bias=bias)
    layer = run.call(learner.LoRALinear, probe, rank, alpha, label=label)
    return layer, probe_linear(seed, in_features, out_features, bias), label


def _factors(run: Run, layer, label: str, in_features: int, out_features: int,
             rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A and lora_B as the layer's state dict holds them, after checking their names and shapes."""
    state = run.call(layer.state_dict, label=f"{label}.state_dict()")
    if not isinstance(state, dict):
        raise Failed(f"{label}.state_dict() to be a dict of tensors", f"{type(state).__name__}", None)
    want = {"lora_A": (rank, in_features), "lora_B": (out_features, rank)}
    missing = [k for k in want if k not in state]
    if missing:
        peft_like = any(k.startswith(("lora_A.", "lora_B.")) for k in state)
        raise Failed(f"parameters named lora_A {want['lora_A']} and lora_B {want['lora_B']} in {label}",
                     f"the state dict's keys {sorted(state)[:6]}",
                     "Keep A and B as nn.Parameter attributes named lora_A and lora_B, as "
                     "course_lib.personalize.LoRALinear does (peft wraps them in nn.Linear layers, lora_A.weight; "
                     "this exercise does not)." if peft_like else
                     "self.lora_A = nn.Parameter(...) of shape (rank, in_features) and self.lora_B = "
                     "nn.Parameter(...) of shape (out_features, rank).")
    for key, shape in want.items():
        got = state[key]
        if not isinstance(got, torch.Tensor):
            raise Failed(f"{label}.{key} to be a tensor of shape {shape}", f"{type(got).__name__}", None)
        if tuple(got.shape) != shape:
            transposed = tuple(got.shape) == shape[::-1]
            raise Failed(f"{label}.{key} of shape {shape}", f"shape {tuple(got.shape)}",
                         f"{key} is transposed: A maps in_features to rank, so it is (rank, in_features) like an "
                         "nn.Linear(in_features, rank).weight, and B is (out_features, rank)." if transposed else
                         "A is (rank, in_features) and B (out_features, rank), so that B A has the base weight's "
                         "shape (out_features, in_features).")
    return state["lora_A"].float(), state["lora_B"].float()


def _forward(run: Run, layer, x: torch.Tensor, label: str, out_features: int) -> np.ndarray:
    got = run.call(layer, x, label=f"{label}(x)")
    return run.tensor(got, f"{label}(x)", shape=(*x.shape[:-1], out_features))


@LORA.check("lora_A (rank, in_features) and lora_B (out_features, rank) are parameters of the layer", points=1,
            hint="self.lora_A = nn.Parameter(torch.empty(rank, base.in_features)), "
                 "self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank)).")
def _(run, learner):
    for k, (i, o, r) in enumerate(((12, 20, 3), (24, 8, 5))):
        layer, _, label = _layer(run, learner, run.seeds[k], i, o, r, 2.0 * r)
        _factors(run, layer, label, i, o, r)


@LORA.check("it starts equal to the base layer: lora_B starts at zero", points=1,
            hint="B starts at zero (torch.zeros), A at random: B A = 0, so the adapted layer starts as the base layer "
                 "and fine-tuning starts from the model as it was.")
def _(run, learner):
    i, o, r = 16, 12, 4
    layer, base, label = _layer(run, learner, run.seeds[0], i, o, r, 8.0)
    a, b = _factors(run, layer, label, i, o, r)
    x = run.randn(5, i, k=1)
    have = _forward(run, layer, x, label, o)
    if torch.count_nonzero(b):
        raise Failed(f"{label}.lora_B all zero at initialisation, so that the layer starts as base(x)",
                     f"lora_B starts with {int(torch.count_nonzero(b))} of {b.numel()} values non-zero",
                     "B initialised randomly: peft starts B at zero (and A at random), so that B A = 0 and the "
                     "adapted layer starts exactly as the base layer.")
    want = lora_forward(base, a, b, 0.0, x).numpy()
    run.close(have, want, f"{label}(x) at initialisation", rtol=1e-5, atol=1e-6,
              hint="With B = 0 the output is base(x) itself: return self.base(x) + the scaled update, with the base "
                   "layer unchanged.")


@LORA.check("lora_A starts uniform in ±1/sqrt(in_features) (peft's kaiming_uniform_(a=sqrt(5))), so the first "
            "gradient of lora_B is not zero", points=1,
            hint="nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5)): uniform in ±1/sqrt(in_features), "
                 "nn.Linear's own default.")
def _(run, learner):
    i, o, r, alpha = 64, 24, 8, 4.0
    layer, _, label = _layer(run, learner, run.seeds[1], i, o, r, alpha)
    a, _ = _factors(run, layer, label, i, o, r)
    if not torch.count_nonzero(a):
        raise Failed(f"{label}.lora_A to start at random", "lora_A is all zero",
                     "A zero so nothing can learn: with B = 0 too, the gradient of B is g (A x)^T = 0 and that of A "
                     "is B^T g x^T = 0, so neither ever moves. Only B starts at zero; A starts at random.")
    bound = 1 / math.sqrt(i)
    std = float(a.double().std())
    if float(a.abs().max()) > bound * (1 + 1e-5) or not 0.75 * bound / math.sqrt(3) < std < 1.25 * bound / math.sqrt(3):
        raise Failed(f"lora_A uniform in ±1/sqrt({i}) = ±{bound:.4f} (standard deviation {bound / math.sqrt(3):.4f})",
                     f"values up to {float(a.abs().max()):.4f}, standard deviation {std:.4f}",
                     "nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5)), as peft does (torch.randn draws with "
                     "standard deviation 1: far too large an update once B moves).")
    x, g = run.randn(6, i, k=2), run.randn(6, o, k=3)
    res = run.vjp(layer, x, wrt=[0], grad_output=g, label=f"{label}(x).backward(g)")
    grads = res["param_grads"]
    if not isinstance(grads, dict) or grads.get("lora_B") is None:
        raise Failed("a gradient for lora_B", "none: lora_B is not a trainable parameter used in forward",
                     "lora_B must be an nn.Parameter (requires_grad True) that forward uses.")
    have = run.tensor(grads["lora_B"], "the gradient of lora_B", shape=(o, r))
    want = (g.double().T @ (x.double() @ a.double().T)).numpy()  # dL/dB is (alpha / r) g^T (x A^T): (out, r)
    cosine = float((have * want).sum() / (np.linalg.norm(have) * np.linalg.norm(want) + 1e-30))
    if cosine < 0.9999:  # the direction only: the scale has a check of its own
        raise Failed("the gradient of lora_B at initialisation along g^T (x A^T) (dL/dB with B = 0)",
                     f"a gradient whose direction differs (cosine similarity {cosine:.4f})",
                     "forward is base(x) + (alpha / rank) * x A^T B^T; with B = 0, dL/dB = (alpha / rank) g^T (x A^T).")


@LORA.check("the base layer is frozen: lora_A and lora_B are the only trainable tensors", points=1,
            hint="self.base = base.requires_grad_(False); lora_A and lora_B are nn.Parameters (trainable).")
def _(run, learner):
    i, o, r = 10, 14, 2
    layer, _, label = _layer(run, learner, run.seeds[2], i, o, r, 2.0)
    x, g = run.randn(3, i, k=4), run.randn(3, o, k=5)
    res = run.vjp(layer, x, wrt=[0], grad_output=g, label=f"{label}(x).backward(g)")
    names = sorted(res["param_grads"]) if isinstance(res["param_grads"], dict) else []
    odd = [n for n in names if not isinstance(n, str) or len(n) > 200 or n.count(".") > 8]
    if odd or len(names) > 64:  # a LoRA layer has a handful of short parameter names: do not walk anything else
        raise Failed(f"a few parameters with short names in {label} (lora_A, lora_B, base.weight, base.bias)",
                     f"{len(names)} parameters, names such as {[str(n)[:40] for n in (odd or names)[:3]]}",
                     "Keep the layer plain: self.base, self.lora_A, self.lora_B.")
    trainable = [n for n in names
                 if run.get(functools.reduce(getattr, [*n.split("."), "requires_grad"], layer), label=f"{label}.{n}")]
    if trainable == ["lora_A", "lora_B"]:
        return
    frozen_wanted = [n for n in trainable if n not in ("lora_A", "lora_B")]
    if frozen_wanted:
        raise Failed(f"exactly two trainable tensors in {label}: lora_A and lora_B", f"trainable: {trainable}",
                     "Freeze the base layer: base.requires_grad_(False). LoRA trains A and B only; the base "
                     "weight stays as the pretrained model had it.")
    raise Failed(f"exactly two trainable tensors in {label}: lora_A and lora_B",
                 f"trainable: {trainable} (parameters: {names})",
                 "Wrap A and B in nn.Parameter (not plain tensors or buffers) so that the optimiser sees them.")


@LORA.check("the update is scaled by alpha / rank", points=2,
            hint="forward(x) = base(x) + (alpha / rank) * x A^T B^T; alpha = rank gives scale 1 (diffusers' scripts).")
def _(run, learner):
    for k, (i, o, r, alpha) in enumerate(((16, 12, 4, 8.0), (20, 24, 8, 2.0))):
        layer, base, label = _layer(run, learner, run.seeds[k], i, o, r, alpha)
        _factors(run, layer, label, i, o, r)
        a, b = run.randn(r, i, k=10 + k) * 0.3, run.randn(o, r, k=20 + k) * 0.3
        run.call(layer.load_state_dict, {"lora_A": a, "lora_B": b}, strict=False,
                 label=f"{label}.load_state_dict(<lora_A, lora_B>, strict=False)")
        x = run.randn(4, i, k=30 + k)
        have = _forward(run, layer, x, label, o)
        want = lora_forward(base, a, b, alpha / r, x).numpy()
        if np.allclose(have, want, rtol=1e-4, atol=1e-5):
            continue
        for scale, name, why in ((alpha, "alpha alone", "the update is divided by the rank too"),
                                 (r / alpha, "rank / alpha", "the ratio is the other way round"),
                                 (1.0, "no scale at all", "the update is multiplied by alpha / rank")):
            if np.allclose(have, lora_forward(base, a, b, scale, x).numpy(), rtol=1e-4, atol=1e-5):
                raise Failed(f"{label}(x) with the update scaled by alpha / rank = {alpha / r:g}",
                             f"the update scaled by {name} ({scale:g})",
                             f"Scale by alpha / rank: {why} (Hu et al. 2021, section 4.1; peft's scaling = "
                             "lora_alpha / r), so that changing the rank does not change the size of the update.")
        run.close(have, want, f"{label}(x) with A and B loaded", rtol=1e-4, atol=1e-5)


@LORA.check("equals peft's lora.Linear for random sizes, ranks, alphas and batches, (B, L, in_features) included",
            points=2, hint="x of any shape (..., in_features): base(x) + (alpha / rank) * (x @ A.T @ B.T) works "
                           "on the last dimension whatever comes before it.")
def _(run, learner):
    rng = run.rng(4)
    for k in range(4):
        i, o = int(rng.integers(6, 40)), int(rng.integers(6, 40))
        r = int(rng.integers(1, min(i, o) + 1))
        alpha = float(np.round(rng.uniform(0.5, 32.0), 2))
        bias = bool(k % 2 == 0)
        layer, base, label = _layer(run, learner, run.seeds[k % 3] + k, i, o, r, alpha, bias)
        _, _ = _factors(run, layer, label, i, o, r)
        run.call(layer.load_state_dict, {"lora_B": run.randn(o, r, k=40 + k) * 0.2}, strict=False,
                 label=f"{label}.load_state_dict(<lora_B>, strict=False)")
        a, b = _factors(run, layer, label, i, o, r)  # the learner's A (its own start) and the B just loaded
        theirs = peft_lora_linear(base, r, alpha, a, b)
        lead = [(int(rng.integers(1, 5)),), (int(rng.integers(1, 4)), int(rng.integers(2, 6)))][k % 2]
        x = run.randn(*lead, i, k=50 + k)
        with torch.no_grad():
            want = theirs(x).double().numpy()
        run.close(_forward(run, layer, x, label, o), want, f"{label}(<x of shape {tuple(x.shape)}>) against peft's",
                  rtol=1e-4, atol=1e-5)


@LORA.check("a rank of 0, or one larger than min(in_features, out_features), raises a ValueError", points=1,
            hint="Check 1 <= rank <= min(base.in_features, base.out_features) first and raise ValueError saying "
                 "so: a rank above the smaller side is no longer a low-rank update.")
def _(run, learner):
    for rank in (0, 7, 11):
        probe = Probe.of("linear", seed=run.seeds[0], in_features=6, out_features=10, bias=True)
        run.raises("ValueError", learner.LoRALinear, probe, rank, 4.0,
                   label=f"LoRALinear(<nn.Linear(6, 10)>, rank={rank}, alpha=4)")


# ==============================================================================================
# Exercise: the loss textual inversion minimises
# ==============================================================================================
TI_LOSS = Exercise("textual_inversion_loss", "Textual inversion: the loss and where its gradient goes",
                   targets=("textual_inversion_loss",))

# A small random U-Net and text tower of the course's classes: fast, and no trained weights to lean on.
SMALL_UNET = {"block_channels": (8, 16), "heads": 2, "context_dim": 16, "time_embed_dim": 16, "norm_groups": 4}
SMALL_TEXT = {"width": 16, "layers": 1, "heads": 2, "context_length": 8}

# (what the learner did, the variant's keyword arguments, a hint): checked in order when a value is off.
TI_MISTAKES = (
    ("the clean latent z0 as the target", {"target": "z0"},
     "The U-Net is an epsilon-prediction model: the target is the noise that made z_t, not z0."),
    ("alpha_bar without square roots", {"roots": (False, False)},
     "z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) noise: alpha_bar is the share of the *variance*, so "
     "both factors take a square root (DDPM eq. 4)."),
    ("a square root on one factor only", {"roots": (True, False)},
     "Square roots on both factors: sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) noise."),
    ("a square root on one factor only", {"roots": (False, True)},
     "Square roots on both factors: sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) noise."),
    ("t[0]'s alpha_bar for the whole batch", {"per_sample": False},
     "Each sample has its own timestep: alphas_cumprod[t] has shape (B,); reshape it to (B, 1, 1, 1) "
     "(.view(-1, 1, 1, 1)) so that it scales each sample's latent, instead of using t[0] for all."),
    ("t[0] for the whole batch", {"per_sample": False, "unet_first_t": True},
     "Each sample has its own timestep: index alphas_cumprod with the whole t, reshape to (B, 1, 1, 1), and "
     "pass t itself to the U-Net."),
)


def _weights_dir() -> str | None:
    """Where this process finds the shipped weights for the references: next to course_lib (None), or, when the
    grader runs the checks from a copy of the library without them, in the course folder it names in COURSE_ROOT."""
    root = os.environ.get("COURSE_ROOT")
    return os.path.join(root, "weights") if root else None


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[nn.Module, nn.Module]:
    where = _weights_dir()
    return probe_text_encoder(shipped=True, weights_dir=where), probe_unet(shipped=True, weights_dir=where)


@functools.lru_cache(maxsize=1)
def _new_token() -> ProbeNewToken:
    return ProbeNewToken(weights_dir=_weights_dir())


def _models(run: Run, k: int, shipped: bool):
    """(learner-side text tower and U-Net as Refs, the same two here, whether they read real captions, latent
    side)."""
    if shipped:
        te, unet = _shipped()
        probes = Probe.of("text_encoder", shipped=True), Probe.of("unet", shipped=True)
        return (*[run.make(p) for p in probes], te, unet, True, 16)
    seed = run.seeds[k % 3] + k
    probes = Probe.of("text_encoder", seed=seed, **SMALL_TEXT), Probe.of("unet", seed=seed, **SMALL_UNET)
    te, unet = probe_text_encoder(seed, **SMALL_TEXT), probe_unet(seed, **SMALL_UNET)
    return (*[run.make(p) for p in probes], te, unet, False, 8)


def _caption_ids(run: Run, k: int, n: int) -> torch.Tensor:
    """Token ids (n, context_length) of ``n`` captions of the world, read by the shipped tokeniser."""
    from course_lib import data
    from course_lib.clip import Tokenizer

    captions = data.generate(n, seed=int(run.rng(k).integers(0, 10_000)), split="train").captions
    return Tokenizer.from_config(_shipped()[0].config)(captions)


def _judge(run: Run, got, label: str, models: tuple[nn.Module, nn.Module], args: tuple) -> None:
    """Compare the learner's loss with the reference on ``models`` (text tower, U-Net) and ``args`` (ids, z0, t,
    noise, alphas_cumprod), naming a known mistake when the value is one of theirs."""
    if not isinstance(got, torch.Tensor):
        raise Failed(f"{label} to be a 0-dim torch.Tensor", f"{type(got).__name__} {got!r}"[:80],
                     "Return the tensor F.mse_loss gives, not .item() or a float: textual inversion calls "
                     ".backward() on it.")
    if got.dim() != 0:
        raise Failed(f"{label} to be a 0-dim tensor (one number for the batch)", f"shape {tuple(got.shape)}",
                     "Average over every element: F.mse_loss(prediction, noise) with its default reduction 'mean'.")
    have = run.number(got, label)  # finite, one number
    with torch.no_grad():
        want = float(textual_inversion_loss(*models, *args))
        if math.isclose(have, want, rel_tol=1e-4, abs_tol=1e-6):
            return
        for what, kwargs, hint in TI_MISTAKES:
            if math.isclose(have, float(textual_inversion_loss(*models, *args, **kwargs)), rel_tol=1e-5, abs_tol=1e-7):
                raise Failed(f"{label} = {want:.6g}", f"{have:.6g}, the loss with {what}", hint)
    raise Failed(f"{label} = {want:.6g} (tolerance rtol 0.0001)", f"{have:.6g}", None)


def _loss_case(run: Run, learner, k: int, t: list[int], shipped: bool, label: str) -> None:
    """Call the learner's loss on one case and compare with the reference."""
    te_ref, unet_ref, te_ref_here, unet_here, real_captions, side = _models(run, k, shipped)
    b = len(t)
    if real_captions:
        ids = _caption_ids(run, k, b)
    else:  # any ids of the small tower's table
        vocab = te_ref_here.config.vocab_size
        ids = torch.from_numpy(run.rng(k + 100).integers(0, vocab, size=(b, SMALL_TEXT["context_length"])))
    z0, noise = run.randn(b, 4, side, side, k=k + 200), run.randn(b, 4, side, side, k=k + 300)
    tt = torch.tensor(t, dtype=torch.long)
    ab = sd_schedule().alphas_cumprod
    args = (ids.long(), z0, tt, noise, ab)
    got = run.call(learner.textual_inversion_loss, te_ref, unet_ref, *args, label=label)
    _judge(run, got, label, (te_ref_here, unet_here), args)


@TI_LOSS.check("a 0-dim tensor equal to the reference (a small random U-Net and text tower, one timestep for the "
               "batch)", points=1,
               hint="states = text_encoder(ids).last_hidden_state; z_t = sqrt(ab) z0 + sqrt(1 - ab) noise; "
                    "return F.mse_loss(unet(z_t, t, states), noise).")
def _(run, learner):
    _loss_case(run, learner, 0, [500, 500], shipped=False, label="textual_inversion_loss(<small models>, t=[500, 500])")


@TI_LOSS.check("the target is the noise, not the clean latent z0 (the shipped U-Net)", points=1,
               hint="The U-Net predicts the noise (epsilon prediction): compare its output with noise.")
def _(run, learner):
    _loss_case(run, learner, 1, [400, 400, 400], shipped=True, label="textual_inversion_loss(<shipped>, t=400)")


@TI_LOSS.check("z_t = sqrt(alpha_bar) z0 + sqrt(1 - alpha_bar) noise: square roots on both factors", points=1,
               hint="alpha_bar is the share of the variance: take the square root of alpha_bar and of 1 - alpha_bar.")
def _(run, learner):
    for k, t in ((2, 250), (3, 650)):
        _loss_case(run, learner, k, [t, t], shipped=True, label=f"textual_inversion_loss(<shipped>, t={t})")


@TI_LOSS.check("each sample is noised to its own timestep t[i] (t has shape (B,))", points=2,
               hint="alphas_cumprod[t] has shape (B,): .view(-1, 1, 1, 1) broadcasts it over (B, 4, h, w).")
def _(run, learner):
    _loss_case(run, learner, 4, [30, 520, 980], shipped=True,
               label="textual_inversion_loss(<shipped>, t=[30, 520, 980])")
    _loss_case(run, learner, 5, [900, 10], shipped=False, label="textual_inversion_loss(<small models>, t=[900, 10])")


@TI_LOSS.check("random batches and timesteps on small random models and the shipped ones equal the reference",
               points=1, hint="The same loss for any batch size: nothing may depend on B or on the models' sizes.")
def _(run, learner):
    rng = run.rng(6)
    for k in range(4):
        b = int(rng.integers(1, 6))
        t = [int(v) for v in rng.integers(0, 1000, size=b)]
        shipped = k % 2 == 1
        _loss_case(run, learner, 10 + k, t, shipped=shipped,
                   label=f"textual_inversion_loss(<{'shipped' if shipped else 'small'} models>, t={t})")


@TI_LOSS.check("Verify: .backward() on the loss reaches the new token's embedding row (after add_token(sd, '<x>', "
               "init='circle'))", points=2,
               hint="The gradient flows from the loss through the U-Net and the text tower back to the row: "
                    "compute the text states with the graph (no torch.no_grad(), no .detach()).")
def _(run, learner):
    probe = run.make(Probe.of("new_token"))
    here = _new_token()
    b = here.ids.shape[0]
    z0, noise = run.randn(b, 4, 16, 16, k=20), run.randn(b, 4, 16, 16, k=21)
    t = torch.from_numpy(run.rng(7).integers(50, 950, size=b)).long()
    ab = sd_schedule().alphas_cumprod
    label = "textual_inversion_loss(<tiny SD with <x>>, ...).backward()"
    res = run.call(probe.gradient, learner.textual_inversion_loss, z0, t, noise, ab, label=label)
    want = here.gradient(textual_inversion_loss, z0, t, noise, ab)
    no_flow = ("The text states were cut from the graph (torch.no_grad() or .detach()): the row never gets a "
               "gradient, so textual inversion cannot learn. The models are frozen, but gradients still pass "
               "through them: call text_encoder(ids) with the graph on.")
    if not isinstance(res, dict):
        raise Failed(f"{label} to give a result", f"{type(res).__name__}", None)
    _judge(run, res.get("loss"), label.removesuffix(".backward()"), (here.text_encoder, here.unet),
           (here.ids, z0, t, noise, ab))
    if not res.get("keeps_graph"):
        raise Failed("a loss that keeps its graph back to the new embedding row",
                     "a loss with requires_grad=False: .backward() has nothing to reach", no_flow)
    if res.get("grad") is None or not torch.count_nonzero(res["grad"]):
        raise Failed("a non-zero gradient on the new embedding row", "no gradient reached the row", no_flow)
    if res.get("frozen_with_grad"):
        raise Failed("a gradient on the new row only (the U-Net and text tower frozen)",
                     f"{res['frozen_with_grad']} frozen tensors got a gradient too",
                     "Leave the models as they come (frozen): the loss must not switch on requires_grad.")
    run.close(res["grad"], want["grad"].double(), "the new row's gradient", rtol=1e-3, atol=1e-7, kind="tensor")
