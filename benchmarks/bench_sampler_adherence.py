"""Prompt adherence against step count, for each sampler and guidance scale, on the course's tiny SD.

    .venv/bin/python benchmarks/bench_sampler_adherence.py            # full grid (minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_sampler_adherence.py --quick    # a smoke run
    .venv/bin/python benchmarks/bench_sampler_adherence.py --spacing leading   # SD 1.x's spacing

For every sampler, guidance scale and step count (1 to 50) it generates the same held-out prompts
from the same starting noise and scores the images with the course's evaluator (prompt adherence:
the fraction of images whose every captioned attribute is confirmed). It then reports, per sampler
and scale, the fewest steps from which adherence stays within 2 points of that sampler's own 50-step
adherence. Output: a table on stdout, and adherence.json, adherence.csv, adherence.png in --out
(artifacts/bench_sampler_adherence/ by default; --write-assets: assets/, the figures the README quotes).

It needs the shipped weights (`course_lib.tiny_sd.load_tiny_sd`, `course_lib.evaluator.load_evaluator`);
without them it exits with a message saying so. The default spacing is "trailing", which starts at the
last training timestep: with SD 1.x's "leading" spacing a 1-step sampler starts at t = 1 and cannot
denoise anything (Lin et al. 2023), which would measure the spacing rather than the samplers.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_lib import data  # noqa: E402
from course_lib.device import get_device  # noqa: E402
from course_lib.samplers import SAMPLERS  # noqa: E402

STEPS = [1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50]
SCALES = [1.0, 3.0, 5.0, 7.5]
WITHIN = 0.02  # "within 2 points" of the 50-step adherence


def load_or_exit(device):
    """The tiny SD pipeline, its evaluator and the adherence function, or a clear exit."""
    from course_lib.evaluator import load_evaluator, prompt_adherence
    from course_lib.tiny_sd import load_tiny_sd

    try:
        pipe = load_tiny_sd(device=device)
        evaluator = load_evaluator(device=device)
    except (FileNotFoundError, OSError, ValueError, KeyError) as err:
        raise SystemExit(f"the tiny SD weights could not be loaded ({type(err).__name__}: {err}). "
                         "Train them with the course's training command (see weights/ and the README).")
    return pipe, evaluator, prompt_adherence


@torch.no_grad()
def generate(pipe, prompts, sampler, num_steps, scale, spacing, seed):
    """Prompts -> images: the same starting noise (and sampler noise) for every setting of the grid."""
    return pipe.generate(prompts, num_steps=num_steps, guidance_scale=scale, sampler=sampler, spacing=spacing,
                         generator=torch.Generator().manual_seed(seed))


def steps_to_within(steps, adherence, within=WITHIN):
    """Fewest steps from which adherence stays within `within` of the adherence at the largest step count."""
    final = adherence[-1]
    for k, n in enumerate(steps):
        if all(a >= final - within for a in adherence[k:]):
            return n
    return steps[-1]


def plot(results, steps, scales, samplers, path, title="Tiny SD: prompt adherence against steps, per sampler"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scales), figsize=(4 * len(scales), 3.4), sharey=True, squeeze=False)
    for ax, scale in zip(axes[0], scales):
        for k, name in enumerate(samplers):  # DDPM = Euler ancestral and DDIM ~ Euler overlap: dashes show both
            ax.plot(steps, [100 * a for a in results[name][str(scale)]], marker="os^vD"[k % 5], ms=3.5,
                    ls="-" if k % 2 == 0 else "--", lw=2.2 - 0.3 * k, label=name)
        ax.set_xscale("log")
        ax.set_xticks(steps, [str(n) for n in steps], fontsize=7)
        ax.minorticks_off()
        ax.set_title(f"guidance scale {scale}")
        ax.set_xlabel("sampling steps")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("prompt adherence (%)")
    axes[0][0].set_ylim(-2, 102)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--steps", nargs="+", type=int, default=STEPS)
    p.add_argument("--scales", nargs="+", type=float, default=SCALES)
    p.add_argument("--prompts", type=int, default=128, help="held-out prompts per setting")
    p.add_argument("--objects", type=int, choices=[1, 2, 3], default=1,
                   help="objects per prompt (default 1: binding failures of several objects would blur the "
                        "step-count comparison)")
    p.add_argument("--spacing", choices=["trailing", "leading", "linspace"], default="trailing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: $COURSE_DEVICE, else the best available)")
    p.add_argument("--write-assets", action="store_true", help="write the README's figures into assets/")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 by default: on a busy 2-core machine more threads wait on each other")
    p.add_argument("--out", default=None, help="output folder (default: artifacts/bench_sampler_adherence; "
                   "assets/..., the README's figures, with --write-assets)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 16 prompts, steps 1 5 20 50, scales 1 and 5 (unless given)")
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; explicit options still win
        args.prompts = 16 if args.prompts == p.get_default("prompts") else args.prompts
        args.steps = [1, 5, 20, 50] if args.steps == p.get_default("steps") else args.steps
        args.scales = [1.0, 5.0] if args.scales == p.get_default("scales") else args.scales
    if args.out is None:
        args.out = (ROOT / ("assets" if args.write_assets and not args.quick else "artifacts")
                    / "bench_sampler_adherence")
    args.device = str(get_device(args.device))
    steps = sorted(set(args.steps))
    if steps[0] < 1 or steps[-1] > 1000:
        raise SystemExit("--steps must lie between 1 and 1000")
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe, evaluator, adherence_fn = load_or_exit(args.device)
    counts = tuple(1.0 if k == args.objects else 0.0 for k in (1, 2, 3))
    prompts = data.generate(args.prompts, seed=args.seed, split="heldout", object_counts=counts).captions
    results: dict = {name: {} for name in args.samplers}
    start = time.perf_counter()
    for name in args.samplers:
        for scale in args.scales:
            row = []
            for n in steps:
                images = generate(pipe, prompts, name, n, scale, args.spacing, args.seed)
                row.append(adherence_fn(images, prompts, evaluator)["adherence"])
            results[name][str(scale)] = row
            print(f"{name:<16} scale {scale:<4} " + " ".join(f"{100 * a:5.1f}" for a in row), flush=True)

    print(f"\nadherence (%) by steps {steps}, {len(prompts)} held-out prompts "
          f"({args.objects} object(s) each), spacing {args.spacing}, "
          f"{time.perf_counter() - start:.0f} s")
    head = f"{'sampler':<16}" + "".join(f"{'w=' + str(s):>10}" for s in args.scales)
    print(f"\nsteps to come within {100 * WITHIN:.0f} points of the sampler's own {steps[-1]}-step adherence")
    print(head)
    summary = {}
    for name in args.samplers:
        summary[name] = {str(s): steps_to_within(steps, results[name][str(s)]) for s in args.scales}
        print(f"{name:<16}" + "".join(f"{summary[name][str(s)]:>10}" for s in args.scales))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adherence.json").write_text(json.dumps(
        {"steps": steps, "scales": args.scales, "spacing": args.spacing, "prompts": len(prompts),
         "objects": args.objects,
         "adherence": results, "steps_to_within_2_points": summary}, indent=2))
    with open(out / "adherence.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sampler", "guidance_scale", "steps", "adherence"])
        for name in args.samplers:
            for s in args.scales:
                for n, a in zip(steps, results[name][str(s)]):
                    w.writerow([name, s, n, f"{a:.4f}"])
    plot(results, steps, args.scales, args.samplers, out / "adherence.png",
         f"Tiny SD ({args.spacing} spacing, {len(prompts)} held-out prompts): adherence against steps")
    print(f"\nwrote {out / 'adherence.json'}, {out / 'adherence.csv'}, {out / 'adherence.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
