"""Benchmark of the whole tiny Stable Diffusion: does it draw what the prompt says, and how fast?

    python benchmarks/bench_tiny_sd.py                  # the full benchmark (a few minutes on 2 CPU cores)
    python benchmarks/bench_tiny_sd.py --n 64 --scales 1,3,5   # a quicker look

Measured on held-out captions (data.generate(split="heldout")), each image scored by the
evaluator (course_lib.evaluator.prompt_adherence):

- prompt adherence on one-object prompts against guidance scale (table + assets/tiny_sd_guidance.png);
  the same starting noise at every scale, so the scales are compared on equal terms;
- the best scale, its per-attribute breakdown, and adherence without guidance (scale 1);
- attribute binding on two-object prompts ("a red circle ... and a blue square ..."), at every scale:
  how often both objects come out right, and how often colours land on the wrong object;
- the wall time of one 16-image batch, 20 steps with guidance;
- a grid of samples for a handful of prompts (assets/tiny_sd_samples.png).

Results go to artifacts/ (assets/, the README's figures, with --write-assets): bench_tiny_sd.json; ``--update-card`` also stores them in weights/unet.json.
"""

from __future__ import annotations

import argparse
import textwrap
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import add_run_args, set_up  # noqa: E402
from course_lib import data  # noqa: E402
from course_lib.evaluator import load_evaluator, prompt_adherence  # noqa: E402
from course_lib.tiny_sd import load_tiny_sd  # noqa: E402

BARS = {"single_object_best": 0.95}
GRID_PROMPTS = [
    "a large red circle in the centre",
    "a small blue square in the top left",
    "a large yellow triangle in the bottom right on a grey background",
    "the top right has a small purple circle",
    "large green square, bottom left",
    "a small red triangle in the top left and a large blue circle in the bottom right",
]


def generate_all(pipe, captions, scale, steps, sampler, seed, batch=128):
    """Images for every caption; image i always starts from the same noise, whatever the scale."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(captions), 4, 8, 8, generator=g)
    out = []
    for s in range(0, len(captions), batch):
        out.append(pipe.generate(captions[s:s + batch], num_steps=steps, guidance_scale=scale, sampler=sampler,
                                 latents=noise[s:s + batch], generator=torch.Generator().manual_seed(seed + s)))
    return torch.cat(out)


def binding(evaluator, images, captions):
    """Two-object prompts: per image, are both objects right, and did a colour go to the wrong object?"""
    pred = evaluator.predict(images)
    swapped = 0
    for b, text in enumerate(captions):
        objs = data.parse_caption(text)["objects"]
        p = [data.POSITIONS.index(o["position"]) for o in objs]
        c = [data.COLOURS.index(o["colour"]) for o in objs]
        got = [int(pred["colour"][b, q]) for q in p]
        swapped += got[0] == c[1] and got[1] == c[0] and c[0] != c[1]
    return swapped / len(captions)


def component_bars(pipe, evaluator, n, seed, figure_path):
    """Re-measure the VAE, CLIP and evaluator bars on fresh held-out scenes (not the ones in the cards)."""
    from course_lib.evaluator import agreement, attribute_accuracy
    from course_lib.metrics import clip_metrics, reconstruct, ssim
    from course_lib.vae import psnr

    scenes = data.generate(max(n, 256), seed=seed + 2, split="heldout")
    x = scenes.images_float()
    with torch.no_grad():
        r = reconstruct(pipe.vae, x)
        clip = clip_metrics(pipe.clip, scenes)
    save_reconstructions(x[:8], r[:8], psnr(r[:8], x[:8]), figure_path)
    return {"n_scenes": len(scenes), "vae_psnr_db": psnr(r, x).mean().item(), "vae_ssim": ssim(r, x),
            "vae_evaluator_agreement": agreement(evaluator, x, r),
            "evaluator_accuracy": attribute_accuracy(evaluator, x, scenes), "clip": clip}


def save_reconstructions(x, r, db, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(x), figsize=(1.6 * len(x), 3.6))
    for j in range(len(x)):
        for row, img in enumerate((x[j], r[j])):
            axes[row, j].imshow(((img.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
            axes[row, j].set_xticks([])
            axes[row, j].set_yticks([])
        axes[1, j].set_xlabel(f"{db[j]:.1f} dB", fontsize=8)
    axes[0, 0].set_ylabel("original", fontsize=8)
    axes[1, 0].set_ylabel("VAE 64x64x3 -> 8x8x4 -> 64x64x3", fontsize=7)
    fig.suptitle("Tiny SD's VAE on held-out scenes (PSNR under each reconstruction)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timing(pipe, steps, scale, repeats=3):
    prompts = (GRID_PROMPTS * 3)[:16]
    pipe.generate(prompts[:2], num_steps=2, guidance_scale=scale)  # warm-up
    times = []
    for r in range(repeats):
        t = time.perf_counter()
        pipe.generate(prompts, num_steps=steps, guidance_scale=scale, generator=torch.Generator().manual_seed(r))
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def save_plot(rows_single, rows_two, rows_early, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["scale"] for r in rows_single], [100 * r["adherence"] for r in rows_single], "o-", label="one object")
    if rows_early:
        ax.plot([r["scale"] for r in rows_early], [100 * r["adherence"] for r in rows_early], "^-",
                label="one object, early U-Net (1000 steps)")
    if rows_two:
        ax.plot([r["scale"] for r in rows_two], [100 * r["adherence"] for r in rows_two], "s--",
                label="two objects (binding)")
    ax.axhline(100 * BARS["single_object_best"], color="grey", lw=0.8, ls=":", label="bar: 95%")
    ax.set_xlabel("guidance scale w")
    ax.set_ylabel("prompt adherence (%)")
    ax.set_title("Tiny SD: prompt adherence vs classifier-free guidance")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_grid(pipe, scale, steps, path, seeds=4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    for s in range(seeds):
        images.append(pipe.generate(GRID_PROMPTS, num_steps=steps, guidance_scale=scale,
                                    generator=torch.Generator().manual_seed(100 + s)))
    fig, axes = plt.subplots(seeds, len(GRID_PROMPTS), figsize=(2.0 * len(GRID_PROMPTS), 2.1 * seeds + 0.8))
    for s in range(seeds):
        for j, prompt in enumerate(GRID_PROMPTS):
            ax = axes[s, j]
            ax.imshow(((images[s][j].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if s == 0:
                ax.set_title(textwrap.fill(prompt, 24), fontsize=7)
        axes[s, 0].set_ylabel(f"seed {100 + s}", fontsize=7)
    fig.suptitle(f"Tiny SD samples: DDIM {steps} steps, guidance {scale:g} (rows: seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    # this script's own options (the shared ones are common.add_run_args): alike in shape only to bench_controlnet.py's
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="held-out captions per measurement (one-object and two-object)")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps")
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--scales", default="1,2,3,4,5,6,7,8,9,10", help="guidance scales to sweep")
    add_run_args(ap, card="unet")
    args = ap.parse_args(argv)
    assets, device = set_up(args)
    scales = [float(s) for s in args.scales.split(",")]

    pipe = load_tiny_sd(device=device, weights_dir=args.weights)
    evaluator = load_evaluator(weights_dir=args.weights, device=device)
    single = data.generate(args.n, seed=args.seed, split="heldout", two_object_fraction=0.0).captions
    two = data.generate(args.n, seed=args.seed + 1, split="heldout", two_object_fraction=1.0).captions
    t_start = time.time()

    print(f"# Tiny SD benchmark: {args.n} held-out captions per row, {args.sampler} {args.steps} steps, "
          f"torch threads {torch.get_num_threads()}\n")
    print("## Models (from their model cards)\n")
    print("| model | parameters | file | steps | training wall time | device | load average at end |")
    print("|---|---:|---:|---:|---:|---|---:|")
    total_bytes = 0
    for name, model in (("evaluator", evaluator), ("vae", pipe.vae), ("clip", pipe.clip), ("unet", pipe.unet)):
        c = model.card
        total_bytes += c["file_bytes"]
        print(f"| {name} | {c['num_parameters'] / 1e6:.2f}M | {c['file_bytes'] / 2**20:.1f} MiB | {c['steps']} | "
              f"{c['wall_time_s'] / 60:.1f} min | {c['device']} ({c.get('torch_threads')} threads) | "
              f"{c.get('load_average_at_end')} |")
    print(f"| total | | {total_bytes / 2**20:.1f} MiB (bar: <= 30 MB) | | | | |\n")
    comp = component_bars(pipe, evaluator, args.n, args.seed, assets / "tiny_sd_vae_reconstructions.png")
    ev, ag, cl = comp["evaluator_accuracy"], comp["vae_evaluator_agreement"], comp["clip"]
    print(f"## Components, re-measured on {comp['n_scenes']} fresh held-out scenes\n")
    print("| model | measure | value | bar | |")
    print("|---|---|---:|---:|---|")
    comp_rows = [
        ("VAE", "reconstruction PSNR", comp["vae_psnr_db"], 28.0, "dB"),
        ("VAE", "reconstruction SSIM", comp["vae_ssim"], None, ""),
        ("VAE", "evaluator reads the same attributes (whole scene)", ag["scene"], 0.98, "%"),
        ("CLIP", "zero-shot caption retrieval top-1, batches of 64", cl["image_to_text_top1"], 0.90, "%"),
        ("CLIP", "... counting only the image's own caption", cl["image_to_text_top1_strict"], None, "%"),
        ("CLIP", "text -> image top-1 (own image only)", cl["text_to_image_top1_strict"], None, "%"),
    ] + [("CLIP", f"zero-shot {k} accuracy", v, None, "%") for k, v in cl["per_attribute_zero_shot"].items()] + [
        ("evaluator", f"{k} accuracy on real scenes", v, 0.99 if k != "scene" else None, "%") for k, v in ev.items()]
    comp_ok = True
    for model, what, value, bar, unit in comp_rows:
        shown = f"{value:.2f} dB" if unit == "dB" else (f"{100 * value:.1f}%" if unit == "%" else f"{value:.3f}")
        bar_s = "" if bar is None else (f">= {bar:g} dB" if unit == "dB" else f">= {100 * bar:g}%")
        verdict = "" if bar is None else ("PASS" if value >= bar else "FAIL")
        comp_ok &= verdict != "FAIL"
        print(f"| {model} | {what} | {shown} | {bar_s or 'reported'} | {verdict} |")
    print()
    print("## One-object prompts: adherence against guidance scale\n")
    print("| guidance | adherence | position | shape | colour | size | background | extra objects |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for w in scales:
        r = prompt_adherence(generate_all(pipe, single, w, args.steps, args.sampler, args.seed), single, evaluator)
        pa = r["per_attribute"]
        rows.append({"scale": w, "adherence": r["adherence"], "per_attribute": pa, "extra_objects": r["extra_objects"]})
        print(f"| {w:g} | {100 * r['adherence']:.1f}% | " + " | ".join(f"{100 * pa[k]:.1f}%" for k in
              ("position", "shape", "colour", "size", "background")) + f" | {100 * r['extra_objects']:.1f}% |", flush=True)
    best = max(rows, key=lambda r: r["adherence"])
    no_guidance = next((r for r in rows if r["scale"] == 1.0), None)

    early_rows = []
    if (Path(args.weights or ROOT / "weights") / "unet_early.json").exists():
        early = load_tiny_sd(weights_dir=args.weights, unet="unet_early")
        print(f"\n## One-object prompts, early U-Net (the same run after {early.unet.card['steps']} steps): "
              "where guidance matters\n")
        print("| guidance | adherence | position | shape | colour | size | background | extra objects |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for w in scales:
            r = prompt_adherence(generate_all(early, single, w, args.steps, args.sampler, args.seed), single, evaluator)
            pa = r["per_attribute"]
            early_rows.append({"scale": w, "adherence": r["adherence"], "per_attribute": pa,
                               "extra_objects": r["extra_objects"]})
            print(f"| {w:g} | {100 * r['adherence']:.1f}% | " + " | ".join(f"{100 * pa[k]:.1f}%" for k in
                  ("position", "shape", "colour", "size", "background")) + f" | {100 * r['extra_objects']:.1f}% |",
                  flush=True)

    print("\n## Two-object prompts (attribute binding)\n")
    print("| guidance | both objects right | position | shape | colour | size | colours swapped |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    two_rows = []
    for w in scales:
        images = generate_all(pipe, two, w, args.steps, args.sampler, args.seed + 1)
        r = prompt_adherence(images, two, evaluator)
        pa = r["per_attribute"]
        two_rows.append({"scale": w, "adherence": r["adherence"], "per_attribute": pa,
                         "colour_swapped": binding(evaluator, images, two)})
        print(f"| {w:g} | {100 * r['adherence']:.1f}% | " + " | ".join(f"{100 * pa[k]:.1f}%" for k in
              ("position", "shape", "colour", "size")) + f" | {100 * two_rows[-1]['colour_swapped']:.1f}% |", flush=True)

    median_s, times = timing(pipe, 20, best["scale"])
    save_plot(rows, two_rows, early_rows, assets / "tiny_sd_guidance.png")
    save_grid(pipe, best["scale"], args.steps, assets / "tiny_sd_samples.png")

    best_two = next(r for r in two_rows if r["scale"] == best["scale"])
    best_binding = max(two_rows, key=lambda r: r["adherence"])
    print("\n## Bars\n")
    print("| measure | value | bar | |")
    print("|---|---:|---:|---|")
    ok = best["adherence"] >= BARS["single_object_best"]
    print(f"| one-object adherence at best guidance ({best['scale']:g}) | {100 * best['adherence']:.1f}% | >= 95% | "
          f"{'PASS' if ok else 'FAIL'} |")
    if no_guidance:
        gap = best["adherence"] - no_guidance["adherence"]
        print(f"| one-object adherence without guidance (scale 1) | {100 * no_guidance['adherence']:.1f}% | lower | "
              f"{100 * gap:.1f} points lower |")
    early_gap = None
    if early_rows:
        e1 = next(r for r in early_rows if r["scale"] == 1.0) if any(r["scale"] == 1.0 for r in early_rows) else None
        eb = max(early_rows, key=lambda r: r["adherence"])
        if e1:
            early_gap = eb["adherence"] - e1["adherence"]
            print(f"| early U-Net: scale 1 vs best ({eb['scale']:g}) | {100 * e1['adherence']:.1f}% vs "
                  f"{100 * eb['adherence']:.1f}% | clearly lower | {100 * early_gap:.1f} points lower |")
    print(f"| two-object adherence (binding) at guidance {best['scale']:g} | {100 * best_two['adherence']:.1f}% | reported | |")
    print(f"| colours swapped between the two objects | {100 * best_two['colour_swapped']:.1f}% | reported | |")
    print(f"| two-object adherence at its own best guidance ({best_binding['scale']:g}) | "
          f"{100 * best_binding['adherence']:.1f}% | reported | |")
    for k, v in best["per_attribute"].items():
        print(f"| per attribute at best guidance: {k} | {100 * v:.1f}% | reported | |")
    print(f"| 16 images, 20 DDIM steps, guidance {best['scale']:g} | {median_s:.2f} s (median of 3: "
          f"{', '.join(f'{t:.2f}' for t in times)}) | seconds | |")
    print(f"\nplot: {assets / 'tiny_sd_guidance.png'}   samples: {assets / 'tiny_sd_samples.png'}   "
          f"benchmark time: {time.time() - t_start:.0f}s")

    results = {"components": comp, "components_pass": comp_ok, "early_unet_single_object": early_rows,
               "early_unet_guidance_gain": early_gap, "n_captions": args.n, "sampler": args.sampler, "steps": args.steps, "seed": args.seed,
               "torch_threads": torch.get_num_threads(), "single_object": rows, "two_object": two_rows,
               "best_scale": best["scale"], "best_single_object_adherence": best["adherence"],
               "no_guidance_adherence": no_guidance["adherence"] if no_guidance else None,
               "batch16_20steps_seconds": median_s, "batch16_20steps_all": times,
               "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
               "passes": {"single_object_best>=0.95": ok, "components": comp_ok}}
    (assets / "bench_tiny_sd.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.update_card:
        card_path = Path(args.weights or ROOT / "weights") / "unet.json"
        card = json.loads(card_path.read_text())
        lists = ("single_object", "two_object", "components", "early_unet_single_object")
        card["metrics"] = {"benchmark": {k: v for k, v in results.items() if k not in lists},
                           "adherence_by_guidance": {str(r["scale"]): r["adherence"] for r in rows},
                           "two_object": two_rows}
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        early_path = card_path.with_name("unet_early.json")
        if early_rows and early_path.exists():
            early_card = json.loads(early_path.read_text())
            early_card["metrics"] = {"adherence_by_guidance": {str(r["scale"]): r["adherence"] for r in early_rows},
                                     "n_captions": args.n, "sampler": args.sampler, "steps": args.steps}
            early_path.write_text(json.dumps(early_card, indent=2) + "\n")
    return 0 if ok and comp_ok else 1


if __name__ == "__main__":
    sys.exit(main())
