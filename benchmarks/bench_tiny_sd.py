"""Benchmark of the whole tiny Stable Diffusion: does it learn the world's distribution, and show what the lessons teach?

    python benchmarks/bench_tiny_sd.py                        # the full benchmark (about 15 minutes on 2 CPU cores)
    python benchmarks/bench_tiny_sd.py --n 64 --scales 1,3,5  # a quicker look

Every image is scored by the evaluator (``course_lib.evaluator.prompt_adherence``: does it show what its prompt
names?) and, as a set, by FID and KID on the evaluator's features against held-out real scenes
(``course_lib.fid``), with the floor that real scenes themselves reach at the same set size printed beside it.
Prompts are held-out captions of the world (``data.generate(split="heldout")``): partial, in ordinary words.

1. Models: parameters, file sizes, training steps and wall times (from the model cards).
2. Components re-measured: VAE PSNR (bar 28 dB), the evaluator on real scenes, CLIP retrieval.
3. Guidance: adherence of one-object prompts, per attribute, binding of two- and three-object prompts, FID and
   diversity of the images of one prompt, against the guidance scale (the same noise at every scale).
   Bars: at least 95% at the best scale, at least 10 points less without guidance; diversity falls as the
   scale grows (figure: the fidelity/diversity trade-off).
4. Phrasings: the same one-object prompts written as plain templates and in ordinary words (synonyms,
   spellings, capitals, punctuation), same noise. Bar: within 5 points. Unknown words are named in a warning.
5. Samplers: FID of each sampler at 5, 10 and 50 steps, over two seeds. Bar: at 5 and 10 steps the spread
   between samplers exceeds the spread between seeds; at 50 steps the samplers agree.
6. A grid of samples for a handful of prompts, some leaving attributes unsaid; the time of one batch.

Results go to artifacts/ (assets/, the README's figures, with --write-assets): bench_tiny_sd.json, the figures;
``--update-card`` also stores them in weights/unet.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import textwrap
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import add_run_args, set_up  # noqa: E402
from course_lib import data, fid  # noqa: E402
from course_lib.evaluator import load_evaluator, prompt_adherence  # noqa: E402
from course_lib.tiny_sd import load_tiny_sd  # noqa: E402
from course_lib.weights import WEIGHTS_DIR  # noqa: E402

BARS = {"single_object_best": 0.95, "guidance_gain_points": 10.0, "phrasing_gap_points": 5.0, "vae_psnr_db": 28.0}
GRID_PROMPTS = [
    "a red circle",
    "a large blue square in the top left",
    "a small striped yellow star on a black background",
    "Green triangle, bottom right.",
    "a purple ring and an orange cross",
    "a pink circle in the centre, a cyan square on the left and a red star at the top",
]
DIVERSITY_PROMPTS = ["a red circle", "a blue square", "a small yellow star", "a green triangle on the left",
                     "a large pink ring", "an orange cross and a cyan circle"]
SAMPLERS = ("ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m")
ATTRS = ("shape", "colour", "size", "position", "fill", "background")


def generate_all(pipe, captions, scale, steps, sampler="ddim", seed=0, batch=128):
    """Images for every caption; image i always starts from the same noise, whatever the scale or sampler."""
    noise = torch.randn(pipe.latent_shape(len(captions)), generator=torch.Generator().manual_seed(seed))
    out = []
    for s in range(0, len(captions), batch):
        out.append(pipe.generate(captions[s:s + batch], num_steps=steps, guidance_scale=scale, sampler=sampler,
                                 latents=noise[s:s + batch], generator=torch.Generator().manual_seed(seed + s)))
    return torch.cat(out)


def heldout_prompts(n, seed, objects):
    """``n`` held-out captions of scenes with exactly ``objects`` objects (ordinary, partial phrasing)."""
    counts = tuple(1.0 if k == objects else 0.0 for k in (1, 2, 3))
    return data.generate(n, seed=seed, split="heldout", object_counts=counts)


def pct(x):
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="prompts per measurement")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps for the guidance and phrasing sections")
    ap.add_argument("--scales", default="1,1.5,2,3,4,5,7.5,10", help="guidance scales to sweep (1: no guidance)")
    ap.add_argument("--per-prompt", type=int, default=32, help="images per prompt for the diversity measure")
    ap.add_argument("--sampler-steps", default="5,10,50", help="step counts of the sampler comparison")
    ap.add_argument("--sampler-n", type=int, default=None, help="prompts per sampler, step count and seed (default: --n)")
    ap.add_argument("--skip-samplers", action="store_true", help="skip the sampler comparison (the slowest part)")
    add_run_args(ap, card="unet")
    args = ap.parse_args(argv)
    assets, device = set_up(args)
    weights = Path(args.weights) if args.weights else WEIGHTS_DIR
    scales = [float(s) for s in args.scales.split(",")]
    t_start = time.time()
    pipe = load_tiny_sd(device=device, weights_dir=weights)
    evaluator = load_evaluator(weights_dir=weights, device=device)
    reference = fid.load_reference(weights / "fid_reference.safetensors")
    results = {"n": args.n, "seed": args.seed, "torch_threads": torch.get_num_threads(), "passes": {}}

    print(f"# Tiny SD benchmark: {args.n} prompts per row, torch threads {torch.get_num_threads()}\n")
    print("## 1. Models (from their model cards)\n")
    print("| model | parameters | file | steps | training wall time | threads |")
    print("|---|---:|---:|---:|---:|---:|")
    total = 0
    from course_lib.controlnet import load_controlnet  # noqa: E402 (optional model)
    models = [("evaluator", evaluator), ("vae", pipe.vae), ("clip", pipe.clip), ("unet", pipe.unet)]
    if (weights / "controlnet.json").exists():
        from course_lib.weights import WeightsError  # noqa: E402
        try:
            models.append(("controlnet", load_controlnet(weights)))
        except WeightsError as e:  # e.g. trained on another U-Net: left out of the table, and said so
            print(f"(controlnet left out: {e})\n")
    rows = []
    for name, model in models:
        c = model.card
        total += c["file_bytes"]
        rows.append({"model": name, "parameters": c["num_parameters"], "bytes": c["file_bytes"], "steps": c["steps"],
                     "wall_time_s": c["wall_time_s"]})
        print(f"| {name} | {c['num_parameters'] / 1e6:.2f}M | {c['file_bytes'] / 2**20:.1f} MiB | {c['steps']} | "
              f"{c['wall_time_s'] / 60:.1f} min | {c.get('torch_threads')} |")
    ref_bytes = (weights / "fid_reference.safetensors").stat().st_size
    total += ref_bytes
    print(f"| FID reference statistics | | {ref_bytes / 2**20:.2f} MiB | | | |")
    print(f"| total | | {total / 2**20:.1f} MiB (bar: under 30 MB) | | "
          f"{sum(r['wall_time_s'] for r in rows) / 60:.1f} min (bar: under 60) | |\n")
    results["models"] = rows
    results["weights_mib"] = total / 2**20
    results["passes"]["weights_under_30MB"] = total < 30e6
    results["passes"]["training_under_60min"] = sum(r["wall_time_s"] for r in rows) < 3600

    # --- 2. Components. ---
    from course_lib.evaluator import attribute_accuracy
    from course_lib.metrics import reconstruct, ssim
    from course_lib.vae import psnr

    print("## 2. Components, re-measured on fresh held-out scenes\n")
    real = data.generate(max(args.n, 512), seed=args.seed + 2, split="heldout")
    x = real.images_float()
    with torch.no_grad():
        r = reconstruct(pipe.vae, x)
    vae_db = psnr(r, x).mean().item()
    ev = attribute_accuracy(evaluator, x, real)
    results["components"] = {"vae_psnr_db": vae_db, "vae_ssim": ssim(r, x), "evaluator_on_real": ev,
                             "n_scenes": len(real)}
    results["passes"]["vae_psnr"] = vae_db >= BARS["vae_psnr_db"]
    print(f"| measure | value | bar |\n|---|---:|---:|")
    print(f"| VAE reconstruction PSNR | {vae_db:.2f} dB | >= {BARS['vae_psnr_db']:g} dB "
          f"{'PASS' if results['passes']['vae_psnr'] else 'FAIL'} |")
    print(f"| VAE reconstruction SSIM | {results['components']['vae_ssim']:.3f} | reported |")
    for k, v in ev.items():
        if isinstance(v, float):
            print(f"| evaluator on real scenes: {k} | {pct(v)} | reported |")
    print()

    # --- 3. Guidance. ---
    single = heldout_prompts(args.n, args.seed, 1).captions
    two = heldout_prompts(args.n, args.seed + 1, 2).captions
    three = heldout_prompts(args.n // 2, args.seed + 2, 3).captions
    mixed = data.generate(args.n, seed=args.seed + 3, split="heldout").captions
    floor_feats = evaluator.features(data.generate(args.n, seed=args.seed + 4, split="heldout").images_float())
    fid_floor = fid.fid_to_reference(floor_feats, (reference["mu"], reference["cov"]))
    print(f"## 3. Guidance (DDIM {args.steps} steps; FID of {args.n} images of held-out prompts against "
          f"{reference['n']} real scenes; real scenes themselves: FID {fid_floor:.2f})\n")
    print("| guidance | one object | " + " | ".join(ATTRS) + " | two objects | three objects | FID | "
          "diversity (feature distance) | unsaid position (entropy, normalised) |")
    print("|---:|" + "---:|" * (len(ATTRS) + 6))
    guidance_rows = []
    div_real = _diversity_of_real(evaluator, args.per_prompt)
    for w in scales:
        r1 = prompt_adherence(generate_all(pipe, single, w, args.steps, seed=args.seed), single, evaluator)
        r2 = prompt_adherence(generate_all(pipe, two, w, args.steps, seed=args.seed + 1), two, evaluator)
        r3 = prompt_adherence(generate_all(pipe, three, w, args.steps, seed=args.seed + 2), three, evaluator)
        feats = evaluator.features(generate_all(pipe, mixed, w, args.steps, seed=args.seed + 3))
        f = fid.fid_to_reference(feats, (reference["mu"], reference["cov"]))
        dist, ent = [], []
        for p, prompt in enumerate(DIVERSITY_PROMPTS):
            imgs = generate_all(pipe, [prompt] * args.per_prompt, w, args.steps, seed=args.seed + 100 + p)
            d = fid.diversity(imgs, evaluator, prompt)
            dist.append(d["feature_distance"])
            ent += [v["normalised"] for k, v in d.get("unsaid", {}).items() if k.endswith("position")]
        row = {"scale": w, "one_object": r1["adherence"], "per_attribute": r1["per_attribute"],
               "two_objects": r2["adherence"], "three_objects": r3["adherence"], "fid": f,
               "diversity": statistics.mean(dist), "unsaid_position_entropy": statistics.mean(ent) if ent else None,
               "binding_two": r2.get("binding"), "binding_three": r3.get("binding")}
        guidance_rows.append(row)
        pa = r1["per_attribute"]
        print(f"| {w:g} | {pct(r1['adherence'])} | " + " | ".join(pct(_attr(pa, k)) for k in ATTRS)
              + f" | {pct(r2['adherence'])} | {pct(r3['adherence'])} | {f:.2f} | {row['diversity']:.3f} | "
              f"{row['unsaid_position_entropy'] if ent else float('nan'):.2f} |", flush=True)
    print(f"\nReal scenes fitting the diversity prompts: feature distance {div_real:.3f} (the diversity the world has)\n")
    best = max(guidance_rows, key=lambda r: r["one_object"])
    none = next(r for r in guidance_rows if r["scale"] == 1.0) if 1.0 in scales else None
    gain = 100 * (best["one_object"] - none["one_object"]) if none else None
    falls = _spearman([r["scale"] for r in guidance_rows], [r["diversity"] for r in guidance_rows])
    results.update(guidance=guidance_rows, best_scale=best["scale"], fid_floor=fid_floor, diversity_real=div_real,
                   guidance_gain_points=gain, diversity_rank_correlation=falls)
    results["passes"]["one_object_best>=95%"] = best["one_object"] >= BARS["single_object_best"]
    results["passes"]["guidance_gain>=10_points"] = gain is not None and gain >= BARS["guidance_gain_points"]
    results["passes"]["diversity_falls_with_scale"] = falls < 0 and guidance_rows[-1]["diversity"] < guidance_rows[0]["diversity"]
    save_tradeoff(guidance_rows, div_real, assets / "tiny_sd_guidance.png")

    # --- 4. Phrasings. ---
    scenes = heldout_prompts(args.n, args.seed + 5, 1)
    described = [scenes.described(i) for i in range(len(scenes))]
    template = [data.template_caption(d) for d in described]
    rng = random.Random(args.seed)
    ordinary = [data.caption(d, rng) for d in described]
    shouting = [data.caption(d, random.Random(i), case="upper") + "!" for i, d in enumerate(described)]
    noise_seed = args.seed + 5
    rows_p = {}
    for name, prompts in (("template", template), ("ordinary", ordinary), ("capitals and '!'", shouting)):
        r = prompt_adherence(generate_all(pipe, prompts, best["scale"], args.steps, seed=noise_seed), template, evaluator)
        rows_p[name] = r["adherence"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.generate(["a red circel in the centre"], num_steps=1)
    named = any("circel" in str(w.message) for w in caught)
    gap = 100 * max(abs(rows_p[k] - rows_p["template"]) for k in rows_p)
    print(f"## 4. Phrasings (guidance {best['scale']:g}, DDIM {args.steps}, same noise, scored against what the "
          f"template says)\n")
    print("| phrasing | adherence | example |\n|---|---:|---|")
    for name, prompts in (("template", template), ("ordinary", ordinary), ("capitals and '!'", shouting)):
        print(f"| {name} | {pct(rows_p[name])} | {prompts[0]!r} |")
    print(f"\nLargest gap to the template: {gap:.1f} points (bar: within {BARS['phrasing_gap_points']:g}). "
          f"A typo is named in a warning: {named}\n")
    results.update(phrasings=rows_p, phrasing_gap_points=gap, unknown_word_warned=named)
    results["passes"]["phrasings_within_5_points"] = gap <= BARS["phrasing_gap_points"]
    results["passes"]["unknown_words_named"] = named

    # --- 5. Samplers. ---
    if not args.skip_samplers:
        step_counts = [int(s) for s in args.sampler_steps.split(",")]
        n_s = args.sampler_n or args.n
        prompts_s = mixed[:n_s]
        floor_s = fid_floor if n_s == args.n else fid.fid_to_reference(floor_feats[:n_s], (reference["mu"], reference["cov"]))
        print(f"## 5. Samplers (guidance {best['scale']:g}; FID of {n_s} images against the reference; "
              f"real floor {floor_s:.2f}; seeds 0 and 1)\n")
        print("| steps | " + " | ".join(SAMPLERS) + " | spread between samplers | spread between seeds |")
        print("|---:|" + "---:|" * (len(SAMPLERS) + 2))
        sampler_rows = []
        for steps in step_counts:
            per = {}
            for sampler in SAMPLERS:
                per[sampler] = [fid.fid_to_reference(evaluator.features(
                    generate_all(pipe, prompts_s, best["scale"], steps, sampler, seed=args.seed + 10 * s)),
                    (reference["mu"], reference["cov"])) for s in (0, 1)]
            means = {k: statistics.mean(v) for k, v in per.items()}
            between = max(means.values()) - min(means.values())
            within = statistics.mean(abs(v[0] - v[1]) for v in per.values())
            sampler_rows.append({"steps": steps, "fid": per, "between_samplers": between, "between_seeds": within})
            print(f"| {steps} | " + " | ".join(f"{means[k]:.2f}" for k in SAMPLERS) + f" | {between:.2f} | {within:.2f} |",
                  flush=True)
        few = [r for r in sampler_rows if r["steps"] <= 10]
        many = [r for r in sampler_rows if r["steps"] >= 50]
        results["samplers"] = sampler_rows
        results["sampler_n"], results["sampler_fid_floor"] = n_s, floor_s
        results["passes"]["samplers_differ_at_few_steps"] = all(r["between_samplers"] > r["between_seeds"] for r in few)
        results["passes"]["samplers_agree_at_50"] = all(r["between_samplers"] <= 2 * r["between_seeds"] + floor_s
                                                        for r in many)
        print("\n(at 50 steps \"agree\" means a spread between samplers within twice the seeds' spread plus the real "
              "floor)\n")

    # --- 6. Samples and time. ---
    save_grid(pipe, best["scale"], args.steps, assets / "tiny_sd_samples.png")
    times = []
    for rep in range(3):
        t = time.perf_counter()
        pipe.generate((GRID_PROMPTS * 3)[:16], num_steps=20, guidance_scale=best["scale"],
                      generator=torch.Generator().manual_seed(rep))
        times.append(time.perf_counter() - t)
    results["batch16_20steps_seconds"] = statistics.median(times)
    print(f"## 6. Samples: {assets / 'tiny_sd_samples.png'}; 16 images, 20 DDIM steps with guidance: "
          f"{statistics.median(times):.2f} s (median of 3)\n")
    print("## Bars\n\n| bar | |\n|---|---|")
    for k, v in results["passes"].items():
        print(f"| {k} | {'PASS' if v else 'FAIL'} |")
    print(f"\none object: best scale {best['scale']:g} {pct(best['one_object'])}, without guidance "
          f"{pct(none['one_object']) if none else 'n/a'} (gain {gain:.1f} points); diversity rank correlation with "
          f"scale {falls:.2f}; benchmark time {time.time() - t_start:.0f} s")
    results["load_average"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    (assets / "bench_tiny_sd.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    if args.update_card:
        card_path = weights / "unet.json"
        card = json.loads(card_path.read_text())
        card["metrics"] = {"benchmark": {k: v for k, v in results.items() if k not in ("models",)}}
        card_path.write_text(json.dumps(card, indent=2, default=float) + "\n")
    return 0 if all(results["passes"].values()) else 1


def _attr(per_attribute, name):
    v = per_attribute.get(name)
    return v.get("adherence", v.get("accuracy")) if isinstance(v, dict) else v


def _diversity_of_real(evaluator, per_prompt):
    """Feature distance of real scenes fitting each diversity prompt: what the world itself varies by."""
    pool = data.generate(20_000, seed=7, split="heldout")
    out = []
    for prompt in DIVERSITY_PROMPTS:
        want = data.parse_prompt(prompt)["objects"]
        hits = [i for i in range(len(pool)) if int(pool.n_objects[i]) == len(want) and all(
            any(all(o[k] == v for k, v in w.items()) for o in pool.attributes(i)["objects"]) for w in want)]
        if len(hits) >= 2:
            out.append(fid.diversity(pool.images_float()[hits[:per_prompt]], evaluator)["feature_distance"])
    return statistics.mean(out) if out else float("nan")


def _spearman(a, b):
    ra = {v: i for i, v in enumerate(sorted(a))}
    order = sorted(range(len(b)), key=lambda i: b[i])
    rb = [0] * len(b)
    for rank, i in enumerate(order):
        rb[i] = rank
    n = len(a)
    d2 = sum((ra[x] - y) ** 2 for x, y in zip(a, rb))
    return 1 - 6 * d2 / (n * (n * n - 1)) if n > 1 else 0.0


def save_tradeoff(rows, div_real, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    s = [r["scale"] for r in rows]
    a.plot(s, [100 * r["one_object"] for r in rows], "o-", label="one object")
    a.plot(s, [100 * r["two_objects"] for r in rows], "s--", label="two objects (binding)")
    a.plot(s, [100 * r["three_objects"] for r in rows], "^:", label="three objects")
    a.axhline(95, color="grey", lw=0.8, ls=":")
    a.set_xlabel("guidance scale w")
    a.set_ylabel("prompt adherence (%)")
    a.set_ylim(0, 101)
    a.grid(alpha=0.3)
    a.legend()
    a.set_title("Adherence against guidance")
    b.plot([100 * r["one_object"] for r in rows], [r["diversity"] for r in rows], "o-")
    for r in rows:
        b.annotate(f"w={r['scale']:g}", (100 * r["one_object"], r["diversity"]), fontsize=7)
    b.axhline(div_real, color="grey", lw=0.8, ls=":", label="real scenes")
    b.set_xlabel("one-object adherence (%)")
    b.set_ylabel("diversity of one prompt's images")
    b.grid(alpha=0.3)
    b.legend()
    b.set_title("The fidelity / diversity trade-off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_grid(pipe, scale, steps, path, seeds=4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = [pipe.generate(GRID_PROMPTS, num_steps=steps, guidance_scale=scale,
                            generator=torch.Generator().manual_seed(100 + s)) for s in range(seeds)]
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


if __name__ == "__main__":
    sys.exit(main())
