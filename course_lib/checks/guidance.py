"""Checks of classifier-free guidance: the CFG simulator, guidance rescale, one scale per sample.

| id | where | kind |
| --- | --- | --- |
| cfg_simulator | solutions/04_guidance_exercises.ipynb | graded exercise (episode 85's CFG scale simulator) |
| guidance_rescale | solutions/04_guidance_exercises.ipynb | graded exercise |
| rescale_in_v_space | solutions/04_guidance_exercises.ipynb | graded exercise |
| per_sample_guidance | notebooks/04_classifier_free_guidance.ipynb | check yourself |

Notation (code name -> paper symbol):
    scale      w     guidance scale, SD's convention (w = 1: the conditional prediction)
"""

from __future__ import annotations

import numpy as np
import torch

from course_tools.checking import Exercise, Run

SCALES = (1.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0)

# ==============================================================================================
# Reference implementations
# ==============================================================================================


def apply_cfg(unconditional, conditional, scale: float):
    """Ho & Salimans 2022, eq. 6 in SD's convention: uncond + scale · (cond - uncond)."""
    return unconditional + scale * (conditional - unconditional)


def cfg_sweep(unconditional: np.ndarray, signal: np.ndarray, scales) -> list[dict]:
    """For each scale: cosine of the guided output to the signal, its L2 norm, and the amplification
    (guided output's component along the signal over the conditional's)."""
    conditional = unconditional + signal
    unit = signal / np.linalg.norm(signal)
    rows = []
    for s in scales:
        guided = apply_cfg(unconditional, conditional, s)
        rows.append({
            "scale": float(s),
            "cosine_to_signal": float(guided @ signal / (np.linalg.norm(guided) * np.linalg.norm(signal))),
            "norm": float(np.linalg.norm(guided)),
            "amplification": float((guided @ unit) / (conditional @ unit)),
        })
    return rows


def artifact_scale(unconditional: np.ndarray, signal: np.ndarray, scales, factor: float = 3.0):
    """The first scale whose guided norm exceeds factor × the conditional's norm, or None."""
    limit = factor * np.linalg.norm(unconditional + signal)
    for row in cfg_sweep(unconditional, signal, scales):
        if row["norm"] > limit:
            return row["scale"]
    return None


def rescale_noise_cfg(guided: torch.Tensor, pred_cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Lin et al. 2023, Sec. 3.4 (diffusers' rescale_noise_cfg): match each sample's std to the
    conditional prediction's, then mix with the unrescaled guided prediction."""
    dims = list(range(1, guided.ndim))  # all but the batch
    std_cond = pred_cond.double().std(dim=dims, keepdim=True)  # (B, 1, ...)
    std_guided = guided.double().std(dim=dims, keepdim=True)  # (B, 1, ...)
    rescaled = guided.double() * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided.double()


def eps_to_v(eps: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = (eps - sqrt(1 - alpha_bar) x_t) / sqrt(alpha_bar); alpha_bar broadcast as (B, 1, ...)."""
    return (eps.double() - (1 - alpha_bar) ** 0.5 * x_t.double()) / alpha_bar**0.5


def v_to_eps(v: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    return alpha_bar**0.5 * v + (1 - alpha_bar) ** 0.5 * x_t.double()


def rescale_in_v_space(guided, pred_cond, x_t, alpha_bar, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale for an epsilon model done on v (ComfyUI's RescaleCFG; course_lib.guidance.rescale_cfg_in_v_space)."""
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    ab = ab.view(-1, *([1] * (x_t.ndim - 1))) if ab.ndim == 1 else ab  # (B,) -> (B, 1, ...)
    v_out = rescale_noise_cfg(eps_to_v(guided, x_t, ab), eps_to_v(pred_cond, x_t, ab), guidance_rescale)
    return v_to_eps(v_out, x_t, ab)


# ==============================================================================================
# Exercise: the CFG simulator
# ==============================================================================================
CFG_SIMULATOR = Exercise("cfg_simulator", "CFG scale simulator", targets=("CFGSimulator",))


def _sim(run: Run, learner, k: int, dim: int = 100, strength: float = 1.0):
    sim = run.call(learner.CFGSimulator, dim=dim, signal_strength=strength, seed=run.seeds[k % 3] + k,
                   label=f"CFGSimulator(dim={dim}, signal_strength={strength}, seed=...)")
    data = {key: run.get(getattr(sim, key)) for key in ("unconditional", "signal", "conditional")}
    for key, value in data.items():
        run.tensor(value, f"CFGSimulator.{key}", shape=(dim,), kind="array")
    return sim, data


# Each check is written out whole, alike in shape on purpose: a check reads as one test of one behaviour.
@CFG_SIMULATOR.check("the features: unconditional ~ N(0, 1), conditional = unconditional + signal, seeded",
                     hint="Use np.random.default_rng(seed) for both the unconditional features and the signal "
                          "direction; the signal is signal_strength times a random normal vector.")
def _(run, learner):
    _, a = _sim(run, learner, 0)
    _, b = _sim(run, learner, 0)
    _, c = _sim(run, learner, 1)
    run.close(a["conditional"], a["unconditional"] + a["signal"], "conditional", rtol=1e-9, kind="array")
    run.close(b["unconditional"], a["unconditional"], "unconditional with the same seed", rtol=0, atol=0,
              kind="array")
    run.expect(not np.array_equal(a["unconditional"], c["unconditional"]), "other features for another seed",
               "the same features")
    u = np.asarray(a["unconditional"])
    run.expect(abs(u.mean()) < 0.5 and 0.6 < u.std() < 1.4, "standard-normal unconditional features",
               f"mean {u.mean():.2f}, std {u.std():.2f}")


@CFG_SIMULATOR.check("apply_cfg(u, c, scale) = u + scale · (c - u), for arrays of any shape", points=2,
                     hint="Scale 0 gives the unconditional prediction, scale 1 the conditional one, and larger "
                          "scales extrapolate past it.")
def _(run, learner):
    sim, _ = _sim(run, learner, 0)
    rng = run.rng(2)
    for shape, scale in [((100,), 7.5), ((3, 100), 0.0), ((2, 4, 5), 1.0), ((100,), float(rng.uniform(-2, 30)))]:
        u, c = rng.standard_normal(shape), rng.standard_normal(shape)
        run.close(run.call(sim.apply_cfg, u, c, scale), apply_cfg(u, c, scale), f"apply_cfg(u, c, {scale:g})",
                  rtol=1e-9, atol=1e-12, kind="array")


@CFG_SIMULATOR.check("sweep(scales): cosine to the signal, L2 norm and amplification per scale", points=3,
                     hint="amplification = (guided · ŝ) / (conditional · ŝ) with ŝ = signal / |signal|: how much "
                          "more of the signal direction the guided output carries than the conditional one.")
def _(run, learner):
    for k, strength in enumerate([1.0, 0.3]):
        sim, d = _sim(run, learner, k + 2, strength=strength)
        got = run.call(sim.sweep, list(SCALES))
        want = cfg_sweep(d["unconditional"], d["signal"], SCALES)
        run.expect(isinstance(got, list) and len(got) == len(SCALES), f"a list of {len(SCALES)} rows",
                   f"{str(got)[:80]}")
        run.close(got, want, f"sweep(scales) with signal_strength {strength}", rtol=1e-6, atol=1e-9)


@CFG_SIMULATOR.check("artifact_scale(scales, factor=3) is the first scale whose norm passes 3× the conditional's",
                     hint="Compare each guided norm with factor · |conditional|; return None when no scale gets there.")
def _(run, learner):
    for k in range(2):
        sim, d = _sim(run, learner, k + 4)
        got = run.call(sim.artifact_scale, list(SCALES))
        run.equal(got, artifact_scale(d["unconditional"], d["signal"], SCALES), "artifact_scale(scales)")
    run.equal(run.call(sim.artifact_scale, list(SCALES), factor=1e6), None, "artifact_scale(scales, factor=1e6)")


@CFG_SIMULATOR.check("Verify: the cosine to the signal rises with every step of the scale",
                     hint="guided = u + scale · signal: the signal's share of the vector grows with the scale.")
def _(run, learner):
    sim, _ = _sim(run, learner, 6)
    scales = [float(s) for s in np.linspace(0.5, 60, 25)]
    rows = run.call(sim.sweep, scales)
    cos = [run.number(r.get("cosine_to_signal") if isinstance(r, dict) else None, "cosine_to_signal") for r in rows]
    run.expect(all(b > a for a, b in zip(cos, cos[1:])), "strictly increasing values",
               ", ".join(f"{c:.3f}" for c in cos[:6]) + ", ...")


@CFG_SIMULATOR.check("Verify: the norm grows without bound, by about |signal| per unit of scale",
                     hint="For a large scale, guided ≈ scale · signal, so norm / scale tends to |signal|.")
def _(run, learner):
    sim, d = _sim(run, learner, 7)
    rows = run.call(sim.sweep, [1e3, 1e4])
    norms = [run.number(r.get("norm") if isinstance(r, dict) else None, "norm") for r in rows]
    run.close([norms[0] / 1e3, norms[1] / 1e4], [np.linalg.norm(d["signal"])] * 2,
              "norm / scale at scales 1e3 and 1e4", rtol=2e-2)


# ==============================================================================================
# Exercise: guidance rescale
# ==============================================================================================
RESCALE = Exercise("guidance_rescale", "Guidance rescale", targets=("rescale_noise_cfg", "guided_prediction"))


def _preds(run: Run, k: int, shape=(3, 4, 8, 8)):
    uncond = run.randn(*shape, k=k)
    cond = uncond + 0.3 * run.randn(*shape, k=k + 1)
    return uncond, cond


@RESCALE.check("rescale_noise_cfg equals diffusers' rescale_noise_cfg", points=3,
               hint="Per sample: std over every dim but the batch (keepdim=True); rescaled = guided · std_cond / "
                    "std_guided; return phi · rescaled + (1 - phi) · guided.")
def _(run, learner):
    for k, (shape, phi) in enumerate([((3, 4, 8, 8), 0.7), ((2, 16), 0.5), ((1, 4, 6, 6), 1.0)]):
        uncond, cond = _preds(run, k, shape)
        guided = apply_cfg(uncond, cond, 7.5)
        got = run.call(learner.rescale_noise_cfg, guided, cond, phi)
        run.close(got, rescale_noise_cfg(guided, cond, phi), f"rescale_noise_cfg(<{tuple(shape)}>, phi={phi})",
                  rtol=1e-4, atol=1e-5, kind="tensor")


@RESCALE.check("phi = 0 returns the guided prediction unchanged", hint="(1 - 0) · guided + 0 · rescaled = guided.")
def _(run, learner):
    uncond, cond = _preds(run, 3)
    guided = apply_cfg(uncond, cond, 5.0)
    run.close(run.call(learner.rescale_noise_cfg, guided, cond, 0.0), guided, "rescale_noise_cfg(..., 0.0)",
              rtol=1e-6, atol=1e-6, kind="tensor")


@RESCALE.check("Verify: with phi = 1 every sample gets the std of its conditional prediction",
               hint="This is the point of the method: large scales inflate the std (over-exposed, saturated "
                    "images); rescaling brings it back to the conditional prediction's.")
def _(run, learner):
    uncond, cond = _preds(run, 4)
    guided = apply_cfg(uncond, cond, 12.0)
    got = run.tensor(run.call(learner.rescale_noise_cfg, guided, cond, 1.0), "rescale_noise_cfg(..., 1.0)",
                     shape=guided.shape)
    run.close(got.reshape(len(got), -1).std(1, ddof=1), cond.flatten(1).std(1), "the std of each rescaled sample",
              rtol=1e-4, kind="array")


@RESCALE.check("each sample is rescaled on its own",
               hint="Take the std over dims 1..n (every dim but the batch), not over the whole batch.")
def _(run, learner):
    uncond, cond = _preds(run, 5)
    guided = apply_cfg(uncond, cond, 7.5)
    a = run.call(learner.rescale_noise_cfg, guided, cond, 0.7)
    guided_b, cond_b = guided.clone(), cond.clone()
    guided_b[1:] *= 10
    cond_b[1:] *= 0.1
    b = run.call(learner.rescale_noise_cfg, guided_b, cond_b, 0.7)
    run.close(b[:1] if isinstance(b, torch.Tensor) else b, a[:1] if isinstance(a, torch.Tensor) else a,
              "sample 0 after changing only the other samples", rtol=1e-5, atol=1e-6, kind="tensor")


@RESCALE.check("guided_prediction(uncond, cond, scale, guidance_rescale) is CFG followed by the rescale",
               hint="guided = uncond + scale · (cond - uncond); then rescale_noise_cfg(guided, cond, guidance_rescale).")
def _(run, learner):
    for k, (scale, phi) in enumerate([(7.5, 0.0), (7.5, 0.7), (3.0, 1.0)]):
        uncond, cond = _preds(run, 6 + k)
        got = run.call(learner.guided_prediction, uncond, cond, scale, guidance_rescale=phi)
        run.close(got, rescale_noise_cfg(apply_cfg(uncond, cond, scale), cond, phi),
                  f"guided_prediction(uncond, cond, {scale}, guidance_rescale={phi})", rtol=1e-4, atol=1e-5,
                  kind="tensor")


# ==============================================================================================
# Exercise: guidance rescale in v-space, where it works for an epsilon model (lesson 4, section 5)
# ==============================================================================================
V_RESCALE = Exercise("rescale_in_v_space", "Guidance rescale in v-space", targets=("rescale_in_v_space",))


def _v_case(run: Run, k: int, shape=(3, 4, 8, 8)):
    """Noise predictions at x_t as an epsilon model makes them: eps ~ x_t at high noise, plus a guided one."""
    x_t = run.randn(*shape, k=k)
    uncond = 0.9 * x_t + 0.3 * run.randn(*shape, k=k + 1)
    cond = uncond + 0.2 * run.randn(*shape, k=k + 2)
    return x_t, apply_cfg(uncond, cond, 12.0), cond


@V_RESCALE.check("equals the course's rescale_cfg_in_v_space (ComfyUI's RescaleCFG) for one alpha_bar and for one per sample",
                 points=3, hint="v = (eps - sqrt(1 - alpha_bar) x_t) / sqrt(alpha_bar) for the guided and the conditional "
                                "prediction; rescale the guided v to the conditional v's std per sample and mix with phi; "
                                "back with eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t. A (B,) alpha_bar must be "
                                "viewed as (B, 1, 1, 1) before it multiplies a (B, C, H, W) tensor.")
def _(run, learner):
    cases = [((3, 4, 8, 8), 0.3, 0.7), ((2, 16), 0.9, 0.5), ((3, 4, 6, 6), torch.tensor([0.01, 0.5, 0.99]), 0.7)]
    for k, (shape, ab, phi) in enumerate(cases):
        x_t, guided, cond = _v_case(run, 3 * k, shape)
        got = run.call(learner.rescale_in_v_space, guided, cond, x_t, ab, phi)
        what = f"alpha_bar {ab:g}" if isinstance(ab, float) else "alpha_bar (0.01, 0.5, 0.99), one per sample"
        run.close(got, rescale_in_v_space(guided, cond, x_t, ab, phi), f"rescale_in_v_space(<{tuple(shape)}>, {what}, phi={phi})",
                  rtol=1e-4, atol=1e-5, kind="tensor")


@V_RESCALE.check("at high noise it is not the rescale of the noise itself",
                 hint="Rescaling eps directly (diffusers' rescale_noise_cfg on an epsilon model) barely changes anything "
                      "when alpha_bar is small: eps is then mostly x_t. Convert both predictions to v first.")
def _(run, learner):
    x_t, guided, cond = _v_case(run, 20)
    got = run.call(learner.rescale_in_v_space, guided, cond, x_t, 0.01, 1.0)
    run.close(got, rescale_in_v_space(guided, cond, x_t, 0.01, 1.0), "rescale_in_v_space(..., alpha_bar=0.01, phi=1)",
              rtol=1e-4, atol=1e-5, kind="tensor")


@V_RESCALE.check("phi = 0 returns the guided prediction unchanged", hint="(1 - 0) · v_guided + 0 · v_rescaled = v_guided, "
                 "and converting v back gives the guided eps again.")
def _(run, learner):
    x_t, guided, cond = _v_case(run, 30)
    run.close(run.call(learner.rescale_in_v_space, guided, cond, x_t, 0.3, 0.0), guided,
              "rescale_in_v_space(..., phi=0.0)", rtol=1e-4, atol=1e-5, kind="tensor")


@V_RESCALE.check("Verify: with phi = 1 each result, read as v, has the std of its conditional v",
                 hint="This is the method: the guided v takes the spread of the conditional v, the spread of the image "
                      "the model is heading for, which high scales inflate.")
def _(run, learner):
    x_t, guided, cond = _v_case(run, 40)
    got = run.tensor(run.call(learner.rescale_in_v_space, guided, cond, x_t, 0.2, 1.0), "rescale_in_v_space(..., 1.0)",
                     shape=guided.shape)
    ab = torch.tensor(0.2, dtype=torch.float64)
    v_got = eps_to_v(torch.as_tensor(got), x_t, ab)
    run.close(v_got.flatten(1).std(1), eps_to_v(cond, x_t, ab).flatten(1).std(1), "the std of each result as v",
              rtol=1e-4, kind="tensor")


# ==============================================================================================
# Check yourself (notebooks/04_classifier_free_guidance.ipynb): one guidance scale per sample, the batched
# form that lets a whole guidance sweep run as one sampling loop
# ==============================================================================================


def per_sample_cfg(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale) -> torch.Tensor:
    """uncond + w (cond - uncond), with w a number or one scale per sample (B,), broadcast as (B, 1, ...)."""
    w = torch.as_tensor(scale, dtype=torch.float64)
    if w.ndim == 1:
        w = w.view(-1, *([1] * (pred_cond.ndim - 1)))  # (B, 1, 1, 1)
    return pred_uncond.double() + w * (pred_cond.double() - pred_uncond.double())


PER_SAMPLE_GUIDANCE = Exercise("per_sample_guidance", "Check yourself: guidance with one scale per sample",
                               targets=("cfg",))


def _pred_pair(run: Run, k: int, shape=(3, 4, 8, 8)):
    return run.randn(*shape, k=k), run.randn(*shape, k=k + 10)


@PER_SAMPLE_GUIDANCE.check("cfg(u, c, w) = u + w (c - u) for a number w", points=1,
                           hint="Step from the unconditional prediction along (cond - uncond), w times as far.")
def _(run, learner):
    for k, w in enumerate((7.5, 0.0, 1.0, float(run.rng(0).uniform(1.5, 20)))):
        u, c = _pred_pair(run, k)
        run.close(run.call(learner.cfg, u, c, w), per_sample_cfg(u, c, w), f"cfg(uncond, cond, {w:g})",
                  rtol=1e-5, atol=1e-5, kind="tensor")


@PER_SAMPLE_GUIDANCE.check("cfg(u, c, w) with w of shape (B,): sample i is guided with scale w[i]", points=2,
                           hint="A (B,) tensor broadcasts against (B, 4, 8, 8) along the LAST axis, not the batch: "
                                "reshape it to (B, 1, 1, 1) first, e.g. w.view(-1, *[1] * (cond.ndim - 1)).")
def _(run, learner):
    for k, B in enumerate((4, 3)):  # B = 4 is the trap: a (4,) vector also broadcasts against the last axis
        shape = (B, 4, 8, 4) if B == 4 else (B, 4, 8, 8)
        u, c = _pred_pair(run, k + 20, shape)
        w = torch.from_numpy(run.rng(k + 1).uniform(1.0, 15.0, size=B)).float()
        run.close(run.call(learner.cfg, u, c, w), per_sample_cfg(u, c, w), f"cfg(uncond, cond, <{B} scales>)",
                  rtol=1e-5, atol=1e-5, kind="tensor")


@PER_SAMPLE_GUIDANCE.check("Verify: w = 0 gives the unconditional prediction and w = 1 the conditional one", points=1,
                           hint="u + 0 (c - u) = u and u + 1 (c - u) = c.")
def _(run, learner):
    u, c = _pred_pair(run, 30)
    run.close(run.call(learner.cfg, u, c, torch.tensor([0.0, 1.0, 0.0])), torch.stack([u[0], c[1], u[2]]),
              "cfg(uncond, cond, tensor([0, 1, 0]))", rtol=1e-5, atol=1e-5, kind="tensor")
