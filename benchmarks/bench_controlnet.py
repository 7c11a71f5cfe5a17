"""Benchmark of the edge ControlNet: does the tiny SD follow an edge map, and does it still follow the prompt?

    python benchmarks/bench_controlnet.py                 # the full benchmark (a few minutes on 2 CPU cores)
    python benchmarks/bench_controlnet.py --n 64          # a quicker look
    python benchmarks/bench_controlnet.py --update-card   # also store the results in weights/controlnet.json

On held-out scenes (data.generate(split="heldout")), each generated from its own caption with its own
edge map as the control (caption and control agree), and again from the caption alone with the same
starting noise:

- edge adherence: F1 between the control edges and the generated image's edges, an edge pixel counting
  as matched when one of the other map lies within 1 px (chessboard distance: the 3x3 neighbourhood).
  The generated image's edges are read with Canny on every colour channel (edges.canny_edges, sigma 1),
  which finds a rendered scene's own edge map with F1 1.0 at this tolerance; the table also gives 2 px
  and the data set's own edge definition applied to the palette-quantised image (edges.quantised_edges);
- prompt adherence: the evaluator's verdict on every captioned attribute (course_lib.evaluator);
- the ceiling: the same F1 for the VAE's reconstructions of the real held-out images;
- the control drawn the other way: Canny maps of the held-out scenes as controls instead of their own
  edge maps;
- control strength (conditioning scale) and guidance end, swept on a subset;
- Canny maps of real photographs (skimage.data), resized to 64x64, as controls; and two controls at once.
Bars (issue 6): edge F1 with control >= 0.7; prompt adherence with control within 5 points of without.
Figures: assets/controlnet_samples.png (controls next to generations), assets/controlnet_scale.png.
Results: bench_controlnet.json. All in artifacts/, or in assets/ (the README's figures) with --write-assets.
"""

from __future__ import annotations

import argparse
import textwrap
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import add_run_args, set_up  # noqa: E402
from course_lib import data, edges  # noqa: E402
from course_lib.controlnet import generate_with_control, load_controlnet  # noqa: E402
from course_lib.evaluator import load_evaluator, prompt_adherence  # noqa: E402
from course_lib.metrics import EDGE_TOLERANCE, control_metrics, reconstruct, subset  # noqa: E402
from course_lib.tiny_sd import load_tiny_sd  # noqa: E402

BARS = {"edge_f1_with_control": 0.70, "max_adherence_drop": 0.05}
PHOTOS = {  # photograph -> a prompt for it (the tiny SD only knows shapes: the control decides the layout)
    "astronaut": "a large purple circle in the centre",
    "camera": "a large blue square in the centre on a grey background",
    "coffee": "a large red circle in the centre on a white background",
    "chelsea": "a large yellow triangle in the centre",
}


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def f1_of(images: torch.Tensor, control: torch.Tensor, tol: int = EDGE_TOLERANCE) -> float:
    return edges.edge_f1(edges.canny_edges(images), control, tol)["f1"].mean().item()


def ceiling(pipe, scenes) -> dict:
    """Edge F1 of the VAE's reconstructions of the real images: what a perfect U-Net could reach."""
    with torch.no_grad():
        recon = reconstruct(pipe.vae, scenes.images_float()).clamp(-1, 1)
    return {"edge_f1_canny": f1_of(recon, scenes.edges), "edge_f1_canny_tol2": f1_of(recon, scenes.edges, 2),
            "edge_f1_quantised": edges.edge_f1(edges.quantised_edges(recon), scenes.edges, EDGE_TOLERANCE)["f1"].mean().item(),
            "real_images_edge_f1_canny": f1_of(scenes.images_float(), scenes.edges)}


def sweep(pipe, net, scenes, evaluator, steps, guidance, seed, values, kind) -> list[dict]:
    """Edge F1 and adherence against conditioning scale (kind="scale") or guidance end (kind="end")."""
    noise = torch.randn(len(scenes), 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    control = edges.to_control(scenes.edges)
    rows = []
    for v in values:
        kw = {"conditioning_scale": v} if kind == "scale" else {"control_guidance_end": v}
        im = generate_with_control(pipe, scenes.captions, control, net, num_steps=steps, guidance_scale=guidance,
                                   latents=noise, generator=torch.Generator().manual_seed(seed), **kw)
        rows.append({kind: v, "edge_f1_canny": f1_of(im, scenes.edges),
                     "prompt_adherence": prompt_adherence(im, scenes.captions, evaluator)["adherence"]})
    return rows


def photo_controls(pipe, net, steps, guidance, seed, scales=(1.0, 2.0)) -> tuple[dict, dict]:
    """Canny maps of real photographs as controls; F1 against the photo's map without control and at ``scales``.

    A photo's edge map is far from the outlines of three shapes that the ControlNet was trained on;
    as with real ControlNets, such a control needs a higher weight to take hold.
    """
    photos = edges.photographs()
    prompts = list(PHOTOS.values())
    raw = {name: photos[name]() for name in PHOTOS}
    control = torch.cat([edges.photo_control(raw[name]) for name in PHOTOS])  # (P, 1, 64, 64)
    noise = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    kw = dict(num_steps=steps, guidance_scale=guidance, latents=noise)
    without = pipe.generate(prompts, generator=torch.Generator().manual_seed(seed), **kw)
    result = {"photos": list(PHOTOS), "prompts": prompts, "rows": [
        {"scale": 0.0, "edge_f1": f1_of(without, control), "edge_f1_tol2": f1_of(without, control, 2)}]}
    images = {}
    for scale in scales:
        images[scale] = generate_with_control(pipe, prompts, edges.to_control(control), net, conditioning_scale=scale,
                                              generator=torch.Generator().manual_seed(seed), **kw)
        result["rows"].append({"scale": scale, "edge_f1": f1_of(images[scale], control),
                               "edge_f1_tol2": f1_of(images[scale], control, 2)})
    return result, {"raw": raw, "control": control, "images": images}


def combined_controls(pipe, net, steps, guidance, seed) -> tuple[dict, dict]:
    """Two controls at once: one object's outline from each of two one-object scenes in different corners."""
    a = data.generate(64, seed=seed + 11, split="heldout", two_object_fraction=0.0)
    pairs, used = [], set()
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            pi, pj = int(a.position[i, 0]), int(a.position[j, 0])
            if pi != pj and 4 not in (pi, pj) and i not in used and j not in used:
                pairs.append((i, j))
                used.update((i, j))
                break
        if len(pairs) == 4:
            break
    ia, ib = [p[0] for p in pairs], [p[1] for p in pairs]
    prompts = []
    for i, j in pairs:
        oa, ob = a.attributes(i)["objects"][0], a.attributes(j)["objects"][0]
        prompts.append(data.caption({"objects": [oa, ob], "background": a.attributes(i)["background"]}, (0, 0), 1))
    ea, eb = a.edges[ia], a.edges[ib]
    noise = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    im = generate_with_control(pipe, prompts, [edges.to_control(ea), edges.to_control(eb)], [net, net],
                               conditioning_scale=[1.0, 1.0], num_steps=steps, guidance_scale=guidance, latents=noise,
                               generator=torch.Generator().manual_seed(seed))
    without = pipe.generate(prompts, num_steps=steps, guidance_scale=guidance, latents=noise,
                            generator=torch.Generator().manual_seed(seed))
    union = ea | eb
    return ({"n": len(prompts), "edge_f1_vs_union": f1_of(im, union), "edge_f1_vs_union_without_control":
             f1_of(without, union), "prompts": prompts},
            {"a": ea, "b": eb, "images": im, "without": without, "prompts": prompts})


def save_samples(pipe, net, scenes, steps, guidance, seed, photo, combo, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(8, len(scenes))  # the first held-out scenes, not picked
    sub = subset(scenes, k)
    noise = torch.randn(k, 4, 8, 8, generator=torch.Generator().manual_seed(seed + 5))
    kw = dict(num_steps=steps, guidance_scale=guidance, latents=noise)
    with_c = generate_with_control(pipe, sub.captions, edges.to_control(sub.edges), net,
                                   generator=torch.Generator().manual_seed(seed), **kw)
    half = generate_with_control(pipe, sub.captions, edges.to_control(sub.edges), net, conditioning_scale=0.5,
                                 generator=torch.Generator().manual_seed(seed), **kw)
    without = pipe.generate(sub.captions, generator=torch.Generator().manual_seed(seed), **kw)

    def show(ax, img, title=None, cmap=None):
        if isinstance(img, torch.Tensor):  # (3, H, W) in [-1, 1] or (1, H, W)
            img = ((img.permute(1, 2, 0) + 1) / 2).clamp(0, 1) if img.shape[0] == 3 else img[0]
            img = img.float().numpy()
        ax.imshow(img, cmap=cmap, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if title:
            ax.set_title(title, fontsize=6)

    n_p, n_c = len(photo["control"]), len(combo["images"])
    cols = max(k, n_p + n_c)
    fig, axes = plt.subplots(8, cols, figsize=(1.55 * cols, 1.65 * 8 + 0.6))
    for ax in axes.flat:
        ax.axis("off")
    for j in range(k):
        show(axes[0, j], 1 - sub.edges[j].float(), textwrap.fill(sub.captions[j], 22), cmap="gray")
        show(axes[1, j], with_c[j])
        show(axes[2, j], half[j])
        show(axes[3, j], without[j])
    scale_hi = max(photo["images"])
    for j, name in enumerate(PHOTOS):
        show(axes[4, j], photo["raw"][name], name, cmap="gray" if photo["raw"][name].ndim == 2 else None)
        show(axes[5, j], 1 - photo["control"][j].float(), "its Canny map, 64x64", cmap="gray")
        show(axes[6, j], photo["images"][1.0][j], textwrap.fill(list(PHOTOS.values())[j], 22))
        show(axes[7, j], photo["images"][scale_hi][j], f"scale {scale_hi:g}")
    for j in range(n_c):
        show(axes[4, n_p + j], 1 - combo["a"][j].float(), "control A", cmap="gray")
        show(axes[5, n_p + j], 1 - combo["b"][j].float(), "control B", cmap="gray")
        show(axes[6, n_p + j], combo["images"][j], textwrap.fill("A + B: " + combo["prompts"][j], 30))
        show(axes[7, n_p + j], combo["without"][j], "without control")
    labels = ["control:\nscene edges", "with control\n(scale 1)", "scale 0.5", "without control\n(same noise)",
              "input", "control", "with control\n(scale 1)", "stronger / none"]
    for r, label in enumerate(labels):
        axes[r, 0].axis("on")
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.suptitle(f"Tiny SD + edge ControlNet, DDIM {steps} steps, guidance {guidance:g}. Rows 1-4: held-out scenes "
                 f"(caption + own edges). Rows 5-8: Canny maps of photographs (left), two controls summed (right)",
                 fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_scale_plot(rows, base, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = [r["scale"] for r in rows]
    ax.plot(xs, [100 * r["edge_f1_canny"] for r in rows], "o-", label="edge F1 (control vs image, 1 px)")
    ax.plot(xs, [100 * r["prompt_adherence"] for r in rows], "s--", label="prompt adherence")
    ax.axhline(100 * BARS["edge_f1_with_control"], color="grey", lw=0.8, ls=":", label="bar: edge F1 70%")
    ax.set_xlabel("conditioning scale (control strength); 0 = the base model")
    ax.set_ylabel("%")
    ax.set_ylim(0, 101)
    ax.set_title(f"Edge ControlNet: control strength on {base} held-out scenes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="held-out scenes for the main table")
    ap.add_argument("--n-sweep", type=int, default=64, help="held-out scenes for the scale and guidance-end sweeps")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    add_run_args(ap, card="controlnet")
    args = ap.parse_args(argv)
    assets, device = set_up(args)
    t0 = time.time()

    pipe = load_tiny_sd(device=device, weights_dir=args.weights)
    evaluator = load_evaluator(weights_dir=args.weights, device=device)
    net = load_controlnet(weights_dir=args.weights, device=device)
    heldout = data.generate(2000, seed=0, split="heldout")  # the held-out scenes of the training command (data seed 0)
    scenes = subset(heldout, args.n)
    card = net.card
    print(f"# Edge ControlNet benchmark: {len(scenes)} held-out scenes, DDIM {args.steps} steps, guidance "
          f"{args.guidance:g}, torch threads {torch.get_num_threads()}\n")
    print(f"ControlNet: {card['num_parameters'] / 1e6:.2f}M parameters, {card['file_bytes'] / 2**20:.1f} MiB, "
          f"{card['steps']} steps in {card['wall_time_s'] / 60:.1f} min on {card['device']} "
          f"({card.get('torch_threads')} threads, load average {card.get('load_average_at_end')}).\n")

    m = control_metrics(pipe, net, scenes, evaluator, num_steps=args.steps, guidance_scale=args.guidance,
                        seed=args.seed)
    canny_controls = edges.canny_edges(scenes.images)
    m_canny = control_metrics(pipe, net, scenes, evaluator, num_steps=args.steps, guidance_scale=args.guidance,
                              seed=args.seed, controls=canny_controls, with_baseline=False)
    top = ceiling(pipe, scenes)
    w, wo, wc = m["with_control"], m["without_control"], m_canny["with_control"]
    print("## Edge adherence and prompt adherence (caption and control agree)\n")
    print("| | edge F1, Canny, 1 px | edge F1, Canny, 2 px | edge F1, quantised, 1 px | prompt adherence |")
    print("|---|---:|---:|---:|---:|")
    print(f"| without control | {pct(wo['edge_f1_canny'])} | {pct(wo['edge_f1_canny_tol2'])} | "
          f"{pct(wo['edge_f1_quantised'])} | {pct(wo['prompt_adherence'])} |")
    print(f"| with control (scene edge map) | {pct(w['edge_f1_canny'])} | {pct(w['edge_f1_canny_tol2'])} | "
          f"{pct(w['edge_f1_quantised'])} | {pct(w['prompt_adherence'])} |")
    print(f"| with control (Canny map of the scene) | {pct(wc['edge_f1_canny'])} | {pct(wc['edge_f1_canny_tol2'])} | "
          f"{pct(wc['edge_f1_quantised'])} | {pct(wc['prompt_adherence'])} |")
    print(f"| ceiling: VAE reconstruction of the real image | {pct(top['edge_f1_canny'])} | "
          f"{pct(top['edge_f1_canny_tol2'])} | {pct(top['edge_f1_quantised'])} | |")
    print(f"\n(F1 scored against the scene's own edge map in every row. Canny on the real images themselves: "
          f"{pct(top['real_images_edge_f1_canny'])}.)\n")
    drop = wo["prompt_adherence"] - w["prompt_adherence"]
    bars = [("edge F1 with control (Canny, 1 px)", w["edge_f1_canny"], f">= {pct(BARS['edge_f1_with_control'])}",
             w["edge_f1_canny"] >= BARS["edge_f1_with_control"]),
            ("prompt adherence: without minus with control", drop, f"<= {pct(BARS['max_adherence_drop'])}",
             drop <= BARS["max_adherence_drop"])]
    print("## Bars\n")
    print("| measure | value | bar | |")
    print("|---|---:|---:|---|")
    for what, value, bar, ok in bars:
        print(f"| {what} | {pct(value)} | {bar} | {'PASS' if ok else 'FAIL'} |")

    sweep_scenes = subset(heldout, args.n_sweep)
    scale_rows = sweep(pipe, net, sweep_scenes, evaluator, args.steps, args.guidance, args.seed,
                       [0.0, 0.25, 0.5, 0.75, 1.0, 1.5], "scale")
    end_rows = sweep(pipe, net, sweep_scenes, evaluator, args.steps, args.guidance, args.seed,
                     [0.2, 0.4, 0.6, 1.0], "end")
    print(f"\n## Control strength (conditioning scale), {len(sweep_scenes)} scenes\n")
    print("| scale | edge F1 | prompt adherence |")
    print("|---:|---:|---:|")
    for r in scale_rows:
        print(f"| {r['scale']:g} | {pct(r['edge_f1_canny'])} | {pct(r['prompt_adherence'])} |")
    print(f"\n## Guidance end (control only during the first fraction of the steps), {len(sweep_scenes)} scenes\n")
    print("| control_guidance_end | edge F1 | prompt adherence |")
    print("|---:|---:|---:|")
    for r in end_rows:
        print(f"| {r['end']:g} | {pct(r['edge_f1_canny'])} | {pct(r['prompt_adherence'])} |")

    photo, photo_fig = photo_controls(pipe, net, args.steps, args.guidance, args.seed)
    combo, combo_fig = combined_controls(pipe, net, args.steps, args.guidance, args.seed)
    print(f"\n## Canny maps of real photographs as controls ({', '.join(photo['photos'])})\n")
    print("| conditioning scale | edge F1 vs the photo's Canny map, 1 px | 2 px |")
    print("|---:|---:|---:|")
    for r in photo["rows"]:
        print(f"| {r['scale']:g}{' (no control)' if r['scale'] == 0 else ''} | {pct(r['edge_f1'])} | "
              f"{pct(r['edge_f1_tol2'])} |")
    print(f"\nTwo controls at once (two one-object scenes' outlines, residuals summed, scale 1 each): edge F1 "
          f"against the union of both outlines {pct(combo['edge_f1_vs_union'])} over {combo['n']} pairs "
          f"({pct(combo['edge_f1_vs_union_without_control'])} without control).\n")

    save_samples(pipe, net, scenes, args.steps, args.guidance, args.seed, photo_fig, combo_fig,
                 assets / "controlnet_samples.png")
    save_scale_plot(scale_rows, len(sweep_scenes), assets / "controlnet_scale.png")
    results = {"main": m, "canny_controls": m_canny["with_control"], "ceiling": top, "bars": {
        "edge_f1_with_control": w["edge_f1_canny"], "edge_f1_bar": BARS["edge_f1_with_control"],
        "adherence_with_control": w["prompt_adherence"], "adherence_without_control": wo["prompt_adherence"],
        "adherence_drop": drop, "adherence_drop_bar": BARS["max_adherence_drop"], "all_pass": all(b[3] for b in bars)},
        "scale_sweep": scale_rows, "guidance_end_sweep": end_rows, "photographs": photo, "two_controls": combo,
        "n_scenes": len(scenes), "steps": args.steps, "guidance_scale": args.guidance, "seed": args.seed,
        "torch_threads": torch.get_num_threads(), "wall_time_s": round(time.time() - t0, 1)}
    (assets / "bench_controlnet.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.update_card:
        path = Path(args.weights or ROOT / "weights") / "controlnet.json"
        full = json.loads(path.read_text())
        full["metrics"]["benchmark"] = {k: results[k] for k in ("main", "canny_controls", "ceiling", "bars",
                                                                  "scale_sweep", "n_scenes", "steps", "guidance_scale")}
        path.write_text(json.dumps(full, indent=2) + "\n")
    print(f"\nFigures: {assets / 'controlnet_samples.png'}, {assets / 'controlnet_scale.png'}; "
          f"results: {assets / 'bench_controlnet.json'} ({time.time() - t0:.0f}s)")
    return 0 if all(b[3] for b in bars) else 1


if __name__ == "__main__":
    sys.exit(main())
