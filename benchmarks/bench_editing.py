"""Benchmark of editing with the tiny SD (lesson 9): img2img's strength trade-off and DDIM inversion's error.

    python benchmarks/bench_editing.py                          # every part (about 5 minutes on one thread)
    python benchmarks/bench_editing.py --parts inversion        # one part; the others keep their stored results
    python benchmarks/bench_editing.py --threads 1 --write-assets   # the README's figure and results, in assets/

Parts (``--parts``, comma-separated; each is a function in PARTS that prints its tables and returns its results,
stored under its own key of bench_editing.json, so a part can be rerun or added without rerunning the others):

- **img2img** (SDEdit, ``editing.img2img``) on held-out one-object scenes, each edited twice with a *new*
  prompt: the object's colour changed (``"a red circle"`` -> ``"a blue circle"``), or its shape changed, every
  other attribute of the scene named as it is. Against strength 0 ... 1 (DDIM, the pipeline's default steps and
  guidance): how much of the input's layout survives (edge F1 of the output's Canny edges against the scene's
  own edge map, 1 px, as bench_controlnet.py scores layout; PSNR against the input image) and how well the new
  prompt is followed (``evaluator.prompt_adherence`` with the new prompt: the changed attribute alone, and the
  whole prompt, i.e. the edit done *and* every other attribute kept). Strength 0 is the VAE's reconstruction:
  the ceiling of layout kept; text-to-image from the same noise with no image is the floor, and shows how much
  of the layout strength 1 still keeps (SD's "leading" timesteps start at t = 951, where 9% of z0 remains).
- **inversion** (``editing.ddim_invert`` then ``editing.reconstruct``, both with the scene's own caption):
  reconstruction error (latent MSE against z0 = the posterior mean; image PSNR of the decoded reconstruction
  against the decoded z0, so the VAE's own error is left out) against the number of DDIM steps without
  guidance, and against the guidance scale (the same scale for inversion and sampling); plain DDIM inversion
  beside exact inversion by fixed-point iteration with Anderson acceleration (``fixed_point_iters``,
  ``anderson_memory``, ``relaxation``).

Inpainting and prompt-to-prompt parts belong here too: add a function to PARTS.
Figure: editing_curves.png. Results: bench_editing.json. In artifacts/, or assets/ with --write-assets.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import add_run_args, set_up  # noqa: E402
from course_lib import data, edges, editing  # noqa: E402
from course_lib.evaluator import load_evaluator, prompt_adherence  # noqa: E402
from course_lib.metrics import EDGE_TOLERANCE  # noqa: E402
from course_lib.tiny_sd import DEFAULT_GUIDANCE, load_tiny_sd  # noqa: E402
from course_lib.vae import psnr  # noqa: E402

STRENGTHS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
INVERSION_STEPS = [5, 10, 20, 50]
INVERSION_SCALES = [1.0, 2.0, 3.0, 5.0, 7.5]


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# -----------------------------------------------------------------------------
# img2img


def edited_prompts(scenes: data.Scenes, change: str, seed: int) -> tuple[list[str], list[str]]:
    """For each one-object scene: (the new prompt: ``change`` ("colour" or "shape") set to another value the
    model was trained on, every other attribute as it is; the changed attribute's new value)."""
    rng = random.Random(seed)
    choices = {"colour": data.TRAIN_COLOURS, "shape": data.TRAIN_SHAPES}[change]
    prompts, values = [], []
    for i in range(len(scenes)):
        truth = scenes.attributes(i)
        obj = dict(truth["objects"][0])
        obj[change] = rng.choice([v for v in choices if v != obj[change]])
        prompts.append(data.template_caption({"objects": [obj], "background": truth["background"]}))
        values.append(obj[change])
    return prompts, values


def part_img2img(sd, evaluator, args) -> dict:
    pool = data.generate(400, seed=0, split="heldout")  # the held-out scenes of the training command (data seed 0)
    scenes = pool.select(pool.n_objects == 1).select(slice(0, args.n_img2img))
    images = scenes.images_float()
    z0 = editing.encode_images(sd, images, sample_posterior=False)  # deterministic: the posterior mean
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(args.seed))
    print(f"## img2img (SDEdit): {len(scenes)} held-out one-object scenes, DDIM {args.steps} steps, guidance "
          f"{args.guidance:g}, the same noise for every strength\n")
    results = {"n_scenes": len(scenes), "steps": args.steps, "guidance_scale": args.guidance, "edits": {}}
    samples = {}
    for change in ("colour", "shape"):
        prompts, _ = edited_prompts(scenes, change, args.seed)
        rows = []
        for strength in STRENGTHS:
            z = editing.img2img_from_latents(sd, z0, prompts, strength, args.steps, args.guidance, noise=noise)
            out = sd.decode_latents(z)
            adh = prompt_adherence(out, prompts, evaluator)
            f1 = edges.edge_f1(edges.canny_edges(out), scenes.edges, EDGE_TOLERANCE)["f1"].mean().item()
            rows.append({"strength": strength, "steps_run": len(editing.img2img_timesteps(args.steps, strength)),
                         "edge_f1": f1, "psnr_db": psnr(out, images).mean().item(),
                         "changed_attribute": adh["per_attribute"][change], "whole_prompt": adh["adherence"],
                         "position": adh["per_attribute"]["position"], "size": adh["per_attribute"]["size"]})
            samples.setdefault(change, []).append(out[:4])
        # the reference: text-to-image from the same noise, no image at all (what strength 1 would be if the
        # image did not leak through the first timestep's sqrt(alpha_bar))
        _, z = sd.generate(prompts, args.steps, args.guidance, latents=noise, return_latents=True)
        out = sd.decode_latents(z)
        adh = prompt_adherence(out, prompts, evaluator)
        t2i = {"edge_f1": edges.edge_f1(edges.canny_edges(out), scenes.edges, EDGE_TOLERANCE)["f1"].mean().item(),
               "psnr_db": psnr(out, images).mean().item(), "changed_attribute": adh["per_attribute"][change],
               "whole_prompt": adh["adherence"], "position": adh["per_attribute"]["position"],
               "size": adh["per_attribute"]["size"]}
        results["edits"][change] = {"example": prompts[0], "original": scenes.captions[0], "rows": rows,
                                    "text_to_image_same_noise": t2i}
        print(f"### New {change}, e.g. \"{scenes.captions[0]}\" -> \"{prompts[0]}\"\n")
        print(f"| strength | steps run | edge F1 vs input (layout kept) | PSNR vs input | new {change} | "
              "whole new prompt | position as named | size as named |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['strength']:.1f} | {r['steps_run']} | {pct(r['edge_f1'])} | {r['psnr_db']:.1f} dB | "
                  f"{pct(r['changed_attribute'])} | {pct(r['whole_prompt'])} | {pct(r['position'])} | "
                  f"{pct(r['size'])} |")
        print(f"| text-to-image, same noise, no image | {args.steps} | {pct(t2i['edge_f1'])} | {t2i['psnr_db']:.1f} dB | "
              f"{pct(t2i['changed_attribute'])} | {pct(t2i['whole_prompt'])} | {pct(t2i['position'])} | "
              f"{pct(t2i['size'])} |")
        print()
    results["_samples"] = (images[:4], samples)
    return results


# -----------------------------------------------------------------------------
# DDIM inversion


def round_trip(sd, z0, prompts, steps, w, iters, memory, relaxation) -> dict:
    """Invert, reconstruct, and score the reconstruction against z0 (latents) and decode(z0) (pixels)."""
    t0 = time.time()
    zT = editing.ddim_invert(sd, z0, prompts, steps, w, fixed_point_iters=iters, anderson_memory=memory,
                             relaxation=relaxation)
    rec = editing.reconstruct(sd, zT, prompts, steps, w)
    mse = ((rec - z0) ** 2).flatten(1).mean(1)  # (B,)
    p = psnr(sd.decode_latents(rec), sd.decode_latents(z0))  # (B,)
    return {"latent_mse": mse.mean().item(), "latent_mse_median": mse.median().item(),
            "latent_mse_worst": mse.max().item(), "psnr_db": p.mean().item(), "zT_std": zT.std().item(),
            "seconds": round(time.time() - t0, 1)}


def part_inversion(sd, evaluator, args) -> dict:
    scenes = data.generate(args.n_inversion, seed=1, split="heldout")
    z0 = editing.encode_images(sd, scenes.images_float(), sample_posterior=False)
    prompts = scenes.captions
    k, m, lam = args.fixed_point_iters, args.anderson_memory, args.relaxation
    methods = {"plain": (0, m, lam), f"exact ({k} Anderson fixed-point iterations, memory {m}, damping {lam:g})":
               (k, m, lam)}
    print(f"## DDIM inversion: {len(scenes)} held-out scenes with their own captions; latent MSE against z0 "
          f"(its variance: {z0.var().item():.3f}) and PSNR of the decoded reconstruction against decode(z0)\n")
    by_steps = [{"steps": n, "method": m, **round_trip(sd, z0, prompts, n, 1.0, *methods[m])}
                for n in INVERSION_STEPS for m in methods]
    by_scale = [{"guidance_scale": w, "method": m, **round_trip(sd, z0, prompts, args.inversion_steps, w, *methods[m])}
                for w in INVERSION_SCALES for m in methods]
    print("### Against steps, no guidance (w = 1)\n")
    print("| steps | method | latent MSE (mean) | median | worst scene | PSNR | std of z_T | seconds |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in by_steps:
        print(f"| {r['steps']} | {r['method']} | {r['latent_mse']:.2e} | {r['latent_mse_median']:.2e} | "
              f"{r['latent_mse_worst']:.2e} | {r['psnr_db']:.1f} dB | {r['zT_std']:.2f} | {r['seconds']} |")
    print(f"\n### Against the guidance scale (the same w to invert and to sample), {args.inversion_steps} steps\n")
    print("| w | method | latent MSE (mean) | median | worst scene | PSNR | std of z_T | seconds |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in by_scale:
        print(f"| {r['guidance_scale']:g} | {r['method']} | {r['latent_mse']:.2e} | {r['latent_mse_median']:.2e} | "
              f"{r['latent_mse_worst']:.2e} | {r['psnr_db']:.1f} dB | {r['zT_std']:.2f} | {r['seconds']} |")
    print()
    return {"n_scenes": len(scenes), "latent_variance": z0.var().item(), "fixed_point_iters": k,
            "anderson_memory": m, "relaxation": lam,
            "guidance_sweep_steps": args.inversion_steps, "by_steps": by_steps, "by_guidance_scale": by_scale}


PARTS = {"img2img": part_img2img, "inversion": part_inversion}


# -----------------------------------------------------------------------------
# figure


def save_figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("img2img", "inversion") if p in results]
    ncols = {"img2img": 2, "inversion": 2}
    fig, axes = plt.subplots(1, sum(ncols[p] for p in panels), figsize=(4.2 * sum(ncols[p] for p in panels), 3.6))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    if "img2img" in results:
        for change in ("colour", "shape"):
            ax = axes.pop(0)
            rows = results["img2img"]["edits"][change]["rows"]
            s = [r["strength"] for r in rows]
            ax.plot(s, [r["edge_f1"] for r in rows], "o-", label="layout kept (edge F1 vs input)")
            ax.plot(s, [r["changed_attribute"] for r in rows], "s-", label=f"new {change} followed")
            ax.plot(s, [r["whole_prompt"] for r in rows], "^--", label="whole new prompt true")
            t2i = results["img2img"]["edits"][change].get("text_to_image_same_noise")
            if t2i:
                ax.axhline(t2i["edge_f1"], color="C0", ls=":", lw=1, label="edge F1 of text-to-image (no image)")
            ax.set_xlabel("strength")
            ax.set_ylim(0, 1.02)
            ax.set_title(f"img2img: new {change} ({results['img2img']['n_scenes']} scenes)")
            ax.legend(fontsize=7, loc="center left")
            ax.grid(alpha=0.3)
    if "inversion" in results:
        inv = results["inversion"]
        methods = list(dict.fromkeys(r["method"] for r in inv["by_steps"]))
        short = {m: m.split(" (")[0] for m in methods}  # "plain", "exact"
        for key, x_key, xlabel, title in (
                ("by_steps", "steps", "DDIM steps (w = 1)", "DDIM inversion against steps"),
                ("by_guidance_scale", "guidance_scale", f"guidance scale w ({inv['guidance_sweep_steps']} steps)",
                 "DDIM inversion against guidance")):
            ax = axes.pop(0)
            for c, m in enumerate(methods):
                rows = [r for r in inv[key] if r["method"] == m]
                xs = [r[x_key] for r in rows]
                ax.semilogy(xs, [r["latent_mse"] for r in rows], "o-", color=f"C{c}", label=f"{short[m]}, mean")
                ax.semilogy(xs, [r["latent_mse_median"] for r in rows], "o--", color=f"C{c}", alpha=0.6,
                            label=f"{short[m]}, median")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"reconstruction latent MSE ({inv['n_scenes']} scenes)")
            ax.set_title(title)
            ax.legend(fontsize=7, loc="best")
            ax.grid(alpha=0.3)
        fig.text(0.99, 0.01, f"exact: {methods[-1].split('(')[-1].rstrip(')')}", ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--n-img2img", type=int, default=48, help="held-out one-object scenes for img2img")
    ap.add_argument("--n-inversion", type=int, default=16, help="held-out scenes for inversion")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps of a full img2img run")
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="img2img's guidance scale")
    ap.add_argument("--inversion-steps", type=int, default=20, help="DDIM steps of the guidance sweep")
    ap.add_argument("--fixed-point-iters", type=int, default=5, help="exact inversion's iterations per step")
    ap.add_argument("--anderson-memory", type=int, default=3, help="exact inversion's Anderson memory (0: none)")
    ap.add_argument("--relaxation", type=float, default=0.5, help="exact inversion's damping")
    add_run_args(ap, card="unet")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        ap.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if args.update_card:
        ap.error("--update-card: this benchmark writes no model card")
    assets, device = set_up(args)
    t0 = time.time()
    sd = load_tiny_sd(device=device, weights_dir=args.weights)
    evaluator = load_evaluator(weights_dir=args.weights, device=device)
    print(f"# Editing benchmark: parts {', '.join(parts)}; torch threads {torch.get_num_threads()}, seed {args.seed}\n")

    path = assets / "bench_editing.json"
    results = json.loads(path.read_text()) if path.exists() else {}  # other parts' stored results stay
    samples = None
    for name in parts:
        t_part = time.time()
        torch.manual_seed(args.seed)
        r = PARTS[name](sd, evaluator, args)
        samples = r.pop("_samples", samples)
        r["wall_time_s"] = round(time.time() - t_part, 1)
        results[name] = r
    results["run"] = {"parts": parts, "seed": args.seed, "torch_threads": torch.get_num_threads(),
                      "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                      "wall_time_s": round(time.time() - t0, 1)}
    path.write_text(json.dumps(results, indent=2) + "\n")
    save_figure(results, assets / "editing_curves.png")
    if samples is not None:
        save_samples(samples, assets / "editing_img2img_samples.png")
    print(f"Figure: {assets / 'editing_curves.png'}; results: {path} ({time.time() - t0:.0f}s)")
    return 0


def save_samples(samples, path: Path) -> None:
    """Rows: input images, then the colour edit at strengths 0.2, 0.4, 0.6, 0.8, 1.0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inputs, by_change = samples
    picks = [STRENGTHS.index(s) for s in (0.2, 0.4, 0.6, 0.8, 1.0)]
    rows = [("input", inputs)] + [(f"colour, strength {STRENGTHS[i]:.1f}", by_change["colour"][i]) for i in picks]
    n = inputs.shape[0]
    fig, axes = plt.subplots(n, len(rows), figsize=(1.6 * len(rows), 1.6 * n))
    for c, (title, imgs) in enumerate(rows):
        for r in range(n):
            ax = axes[r][c]
            ax.imshow(((imgs[r].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            ax.axis("off")
            if r == 0:
                ax.set_title(title, fontsize=7)
    fig.suptitle("img2img: the same scene and noise, a new colour, rising strength", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
