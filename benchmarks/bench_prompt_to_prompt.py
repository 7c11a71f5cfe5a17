"""Benchmark of prompt-to-prompt editing (Hertz et al. 2022) against regenerating from the same noise.

    python benchmarks/bench_prompt_to_prompt.py                  # the full benchmark (about 5 minutes, 1 thread)
    python benchmarks/bench_prompt_to_prompt.py --n 24 --steps 10   # a quicker look
    python benchmarks/bench_prompt_to_prompt.py --write-assets   # also the README's figures and JSON in assets/

On held-out scenes (data.generate(split="heldout"), one- and two-object scenes): the source prompt is the
template caption (data.template_caption) of every object's size, colour, shape and position; the target swaps
one word of the first object, in turn its colour ("red" -> "blue"), its shape ("circle" -> "square") or its
size ("large" -> "small"), to a value drawn at random from the other training values. Source and target are
generated together from the same noise (prompt_to_prompt.edit), with the target's cross-attention maps
replaced by the source's for the first cross_replace fraction of the DDIM steps; cross_replace = 0 is simply
regenerating from the same noise with the new prompt. The evaluator reads the source and the target images:

- **edit success**: the edited object of the target (matched to the target prompt, evaluator.match_prompt)
  has the new value;
- **preservation**: every object read in the SOURCE image is paired with the target object covering most of
  its pixels, and each of its shape, colour, size and position (the edited object's changed attribute aside)
  is read the same; the fraction of those checks that hold, and of the scenes where all hold ("kept");
- **edited and kept**: both at once, per scene: the edit a user wanted;
- pixel level: IoU of the object masks the evaluator finds in the two images (all objects together; 32 x 32
  grid), and edge F1 between the two images' Canny edges (edges.canny_edges, 1 px tolerance).

Rows: cross_replace 0, 0.2, 0.4, 0.6, 0.8, 1.0 (the trade-off curve), and variants: self-attention replaced too
for the first 40% or 80% of the steps (the paper's self_replace_steps), and both halves of guidance edited instead
of the conditional half only. The defaults (48 edits, 20 steps, 10 settings) took 5.4 minutes on one thread of a
2-core machine shared with other work (load average 4 to 5). Results: bench_prompt_to_prompt.json and
prompt_to_prompt.png (the curve and an example grid), in artifacts/, or in assets/ with --write-assets.
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
from course_lib import data, edges  # noqa: E402
from course_lib.evaluator import load_evaluator, match_prompt  # noqa: E402
from course_lib.prompt_to_prompt import edit  # noqa: E402
from course_lib.tiny_sd import load_tiny_sd  # noqa: E402

FRACTIONS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
VARIANTS = [  # (label, cross_replace, self_replace, halves)
    ("cross 0.4 + self 0.4", 0.4, 0.4, "cond"), ("cross 0.8 + self 0.4", 0.8, 0.4, "cond"),
    ("cross 0.8 + self 0.8", 0.8, 0.8, "cond"), ("cross 0.8, both halves", 0.8, 0.0, "both"),
]
EDIT_KINDS = ("colour", "shape", "size")
VALUES = {"colour": data.TRAIN_COLOURS, "shape": data.TRAIN_SHAPES, "size": data.SIZES}
KEPT = ("shape", "colour", "size", "position")


def make_edits(scenes: data.Scenes, n: int, seed: int) -> list[dict]:
    """``n`` edits of one- and two-object scenes, cycling through colour, shape and size swaps."""
    rng = random.Random(seed)
    out = []
    for i in range(len(scenes)):
        truth = scenes.attributes(i)
        if len(truth["objects"]) > 2:
            continue
        objs = [{k: o[k] for k in KEPT} for o in truth["objects"]]
        kind = EDIT_KINDS[len(out) % len(EDIT_KINDS)]
        new = rng.choice([v for v in VALUES[kind] if v != objs[0][kind]])
        target_objs = [dict(objs[0], **{kind: new})] + objs[1:]
        src = data.template_caption({"objects": objs, "background": None})
        tgt = data.template_caption({"objects": target_objs, "background": None})
        if len(src.split()) != len(tgt.split()):  # an article that changes with the word ("a" / "an")
            continue
        out.append({"scene": i, "kind": kind, "old": objs[0][kind], "new": new, "source": src, "target": tgt,
                    "wanted": target_objs, "source_wanted": objs})
        if len(out) == n:
            break
    return out


def mask_iou(a: list[dict], b: list[dict]) -> float:
    ma = torch.zeros(32, 32, dtype=torch.bool)
    mb = torch.zeros(32, 32, dtype=torch.bool)
    for o in a:
        ma |= o["pixels"]
    for o in b:
        mb |= o["pixels"]
    union = int((ma | mb).sum())
    return 1.0 if union == 0 else int((ma & mb).sum()) / union


def score(edits: list[dict], src_read: list[list[dict]], tgt_read: list[list[dict]], f1: torch.Tensor) -> dict:
    """Edit success, preservation against the source image, and pixel-level agreement, over ``edits``."""
    success = kept_checks = checks = kept_scenes = joint = 0
    ious = []
    by_kind = {k: [0, 0, 0] for k in EDIT_KINDS}  # success, kept, n
    for e, so, to in zip(edits, src_read, tgt_read):
        pick, _ = match_prompt(e["wanted"][:1], to)
        ok = pick[0] is not None and to[pick[0]][e["kind"]] == e["new"]
        # the source image's reading of the edited object: the read object that best matches the source prompt
        src_pick, _ = match_prompt(e["source_wanted"][:1], so)
        all_kept = True
        for j, obj in enumerate(so):
            overlap = [int((t["pixels"] & obj["pixels"]).sum()) for t in to]
            best = max(range(len(to)), key=lambda q: overlap[q]) if to and max(overlap) > 0 else None
            for name in KEPT:
                if j == src_pick[0] and name == e["kind"]:
                    continue
                same = best is not None and to[best][name] == obj[name]
                checks += 1
                kept_checks += same
                all_kept &= same
        all_kept &= len(to) == len(so)  # nothing added or lost
        success += ok
        kept_scenes += all_kept
        joint += ok and all_kept
        ious.append(mask_iou(so, to))
        by_kind[e["kind"]][0] += ok
        by_kind[e["kind"]][1] += all_kept
        by_kind[e["kind"]][2] += 1
    n = len(edits)
    return {"edit_success": success / n, "preserved_attributes": kept_checks / max(checks, 1),
            "kept": kept_scenes / n, "edited_and_kept": joint / n, "mask_iou": sum(ious) / n,
            "edge_f1": float(f1.mean()),
            "by_kind": {k: {"edit_success": s / max(c, 1), "kept": kp / max(c, 1), "n": c}
                        for k, (s, kp, c) in by_kind.items()}}


def save_figure(rows: list[dict], examples: dict, edits: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [r for r in rows if r["self_replace"] == 0 and r["halves"] == "cond"]
    xs = [r["cross_replace"] for r in curve]
    show = list(examples)  # column labels
    picks = []
    for kind in EDIT_KINDS:
        picks += [i for i, e in enumerate(edits) if e["kind"] == kind][:2]
    fig = plt.figure(figsize=(4 + 1.3 * (len(show) + 1), max(4.2, 1.25 * len(picks))))
    grid = fig.add_gridspec(len(picks), len(show) + 2, width_ratios=[3.2, 0.3] + [1] * len(show))
    ax = fig.add_subplot(grid[:, 0])
    for key, label in (("edit_success", "edit success"), ("kept", "others kept (scene)"),
                       ("edited_and_kept", "edited and kept"), ("mask_iou", "object-mask IoU"),
                       ("edge_f1", "edge F1 (Canny)")):
        ax.plot(xs, [r[key] for r in curve], marker="o", label=label)
    ax.set_xlabel("cross_replace: fraction of steps with\nthe source's cross-attention maps")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{len(edits)} edits; x = 0 is regenerating", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    for r, i in enumerate(picks):
        for c, label in enumerate(show):
            a = fig.add_subplot(grid[r, c + 2])
            a.imshow(((examples[label][i] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy())
            a.set_xticks([]), a.set_yticks([])
            if r == 0:
                a.set_title(label, fontsize=8)
            if c == 0:
                a.set_ylabel(f"{edits[i]['old']}\n-> {edits[i]['new']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=48, help="edits (held-out one- and two-object scenes)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    ap.add_argument("--batch", type=int, default=24, help="edits per batch")
    add_run_args(ap, card="unet")
    args = ap.parse_args(argv)
    if args.update_card:
        raise SystemExit("--update-card: this benchmark has no model card of its own")
    assets, device = set_up(args)
    t0 = time.time()
    sd = load_tiny_sd(device=device, weights_dir=args.weights)
    evaluator = load_evaluator(weights_dir=args.weights, device=device)
    heldout = data.generate(2000, seed=0, split="heldout")  # the held-out scenes of the training command
    edits = make_edits(heldout, args.n, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(sd.latent_shape(len(edits)), generator=g)
    counts = ", ".join(f"{sum(e['kind'] == k for e in edits)} {k}" for k in EDIT_KINDS)
    print(f"# Prompt-to-prompt benchmark: {len(edits)} edits of held-out scenes ({counts}), DDIM {args.steps} steps, "
          f"guidance {args.guidance:g}, torch threads {torch.get_num_threads()}\n")

    settings = [(f"cross {c:g}", c, 0.0, "cond") for c in FRACTIONS] + VARIANTS
    rows, examples, source_read, source_images = [], {}, None, None
    for label, cross, self_frac, halves in settings:
        src_parts, tgt_parts = [], []
        for s in range(0, len(edits), args.batch):
            part = edits[s:s + args.batch]
            r = edit(sd, [e["source"] for e in part], [e["target"] for e in part], noise[s:s + len(part)],
                     num_steps=args.steps, guidance_scale=args.guidance, cross_replace=cross,
                     self_replace=self_frac, halves=halves)
            src_parts.append(r.source.cpu())
            tgt_parts.append(r.target.cpu())
        target = torch.cat(tgt_parts)
        if source_images is None:  # the source images are the same in every row: read them once
            source_images = torch.cat(src_parts)
            source_read = evaluator.predict(source_images)["objects"]
            src_edges = edges.canny_edges(source_images)
            examples["source"] = source_images
        f1 = edges.edge_f1(edges.canny_edges(target), src_edges)["f1"]
        row = {"setting": label, "cross_replace": cross, "self_replace": self_frac, "halves": halves,
               **score(edits, source_read, evaluator.predict(target)["objects"], f1)}
        rows.append(row)
        if label in ("cross 0", "cross 0.4", "cross 0.8", "cross 0.8 + self 0.4"):
            examples["regenerate" if cross == 0 else label] = target
        print(f"  {label:24s} done ({time.time() - t0:.0f}s)", flush=True)

    # The source images themselves: how often the evaluator reads the source prompt's object where asked.
    src_ok = sum(match_prompt(e["source_wanted"][:1], so)[1] == len(KEPT) for e, so in zip(edits, source_read))
    print(f"\nSource images with the edited object read exactly as the source prompt says: {src_ok}/{len(edits)}\n")
    head = (f"{'setting':24s} {'edit ok':>8s} {'attrs kept':>10s} {'all kept':>9s} {'edited+kept':>11s} "
            f"{'mask IoU':>9s} {'edge F1':>8s}   " + "  ".join(f"{k} ok/kept" for k in EDIT_KINDS))
    print(head)
    print("-" * len(head))
    for r in rows:
        kinds = "  ".join(f"{pct(r['by_kind'][k]['edit_success'])}/{pct(r['by_kind'][k]['kept'])}" for k in EDIT_KINDS)
        print(f"{r['setting']:24s} {pct(r['edit_success']):>8s} {pct(r['preserved_attributes']):>10s} "
              f"{pct(r['kept']):>9s} {pct(r['edited_and_kept']):>11s} {r['mask_iou']:9.3f} {r['edge_f1']:8.3f}   "
              f"{kinds}")
    print("\n'cross 0' is regenerating from the same noise with the new prompt. 'attrs kept': the source image's "
          "objects' other attributes read the same in the target; 'all kept': every one, and no object added or "
          "lost; 'edited+kept': the edit took and everything else stayed.")

    save_figure(rows, examples, edits, assets / "prompt_to_prompt.png")
    results = {"rows": rows, "edits": [{k: e[k] for k in ("kind", "old", "new", "source", "target")} for e in edits],
               "source_read_as_prompted": src_ok / len(edits), "n_edits": len(edits), "steps": args.steps,
               "guidance_scale": args.guidance, "seed": args.seed, "torch_threads": torch.get_num_threads(),
               "load_average_at_end": round(os.getloadavg()[0], 2), "wall_time_s": round(time.time() - t0, 1)}
    (assets / "bench_prompt_to_prompt.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nFigure: {assets / 'prompt_to_prompt.png'}; results: {assets / 'bench_prompt_to_prompt.json'} "
          f"({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
