"""Benchmark of inpainting (lesson 9): blending with the ordinary U-Net, with RePaint's resampling, and the
dedicated 9-channel inpainting U-Net, on the same repainting tasks.

    python benchmarks/bench_inpainting.py                  # 64 held-out scenes (a few minutes on 2 CPU cores)
    python benchmarks/bench_inpainting.py --n 16 --steps 10  # a quicker look
    python benchmarks/bench_inpainting.py --update-card    # also store the results in <weights>/inpaint_unet.json

Tasks (``inpainting.edit_tasks``): in each held-out scene (data.generate(split="heldout"), data seed 0) the
largest object's mask, dilated by 2 pixels, is repainted with a prompt that names the object's size and place
and a different colour (even scenes) or a different shape (odd scenes), e.g. "a large blue circle in the top left".
Methods: ``inpaint_blend`` (the ordinary U-Net, known region blended in after every DDIM step), the same with
RePaint's resampling (each step denoised ``--resample`` times, jumping back ``--jumps`` steps), ``inpaint_with_unet``
(the 9-channel inpainting U-Net alone, as diffusers' StableDiffusionInpaintPipeline runs it), and the inpainting
U-Net with the known region blended in as well. Every method starts from the same generator seed.
Measured (``inpainting.measure_inpainting``):

- **preservation**: PSNR of the kept pixels (mask = 0) against the input, after decoding; also against the
  input's VAE round trip, the best a latent-space method can do (row "VAE round trip");
- **adherence**: the evaluator reads the result; the object overlapping the mask most must have the prompt's
  shape and colour (both, and each);
- **seams**: the mean gradient magnitude in a 2-pixel band along the edge of the region the method may change
  (the mask on the 4-pixel latent grid, one pixel inside and one outside), over the same band of the real
  scene. The band lies on the background around the old object, which in the world's scenes is smooth (a
  gentle gradient), so the real scene's value is small; an intensity step between repainted and kept cells,
  or an object cut off at the mask's edge, adds gradient there. 1 means no more edges than the real scene.
  The VAE round trip's own ratio is the floor a latent method starts from (the decoder adds faint texture).

Figure: inpainting_samples.png (inputs with the mask, each method). Results: bench_inpainting.json.
All in artifacts/, or in assets/ (the README's figures) with --write-assets.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import add_run_args, set_up  # noqa: E402
from course_lib import data  # noqa: E402
from course_lib.evaluator import load_evaluator  # noqa: E402
from course_lib.inpainting import (boundary_band, edit_tasks, inpaint_blend, inpaint_with_unet,  # noqa: E402
                                   measure_inpainting, repaint_schedule)
from course_lib.tiny_sd import load_tiny_sd  # noqa: E402
from course_lib.weights import load_inpaint_unet  # noqa: E402


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def run_methods(sd, net, tasks, steps: int, guidance: float, seed: int, resample: int, jumps: list[int],
                batch: int = 32) -> dict:
    """Images and seconds of every method on ``tasks``, in batches of ``batch`` (the same seed for each batch)."""
    methods = {"blend": dict(kind="blend", resample=1, jump_length=1)}
    for j in jumps:
        methods[f"blend + RePaint (r={resample}, j={j})"] = dict(kind="blend", resample=resample, jump_length=j)
    methods["inpainting U-Net"] = dict(kind="unet")
    methods["inpainting U-Net + blend"] = dict(kind="blend", resample=1, jump_length=1, inpaint_unet=True)
    out = {}
    for name, how in methods.items():
        t = time.time()
        images = []
        for i in range(0, len(tasks.prompts), batch):
            sl = slice(i, i + batch)
            g = torch.Generator().manual_seed(seed + i)
            if how["kind"] == "unet":
                images.append(inpaint_with_unet(sd, net, tasks.images[sl], tasks.masks[sl], tasks.prompts[sl], steps,
                                                guidance, g))
            else:
                images.append(inpaint_blend(sd, tasks.images[sl], tasks.masks[sl], tasks.prompts[sl], steps, guidance,
                                            g, resample=how["resample"], jump_length=how["jump_length"],
                                            inpaint_unet=net if how.get("inpaint_unet") else None))
        seq = repaint_schedule(steps, how.get("resample", 1), how.get("jump_length", 1))
        calls = sum(b > a for a, b in zip(seq, seq[1:]))  # guided U-Net passes per image: one per step down
        out[name] = {"images": torch.cat(images), "seconds": round(time.time() - t, 1), "unet_calls": calls}
    return out


def save_samples(tasks, runs: dict, round_trip, path: Path, k: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(k, len(tasks.prompts))
    rows = [("input; edge of the repainted cells", None)] + [(name, r["images"]) for name, r in runs.items()]
    fig, axes = plt.subplots(len(rows), k, figsize=(1.55 * k, 1.65 * len(rows) + 0.5))
    band = boundary_band(tasks.masks[:k])  # (k, 1, 64, 64)
    for r, (label, images) in enumerate(rows):
        for j in range(k):
            ax = axes[r, j]
            if images is None:
                img = tasks.images[j].clone()
                img[:, band[j, 0]] = -1.0 if img.mean() > 0 else 1.0  # the edge of the repainted region, in contrast
                ax.set_title(textwrap.fill(tasks.prompts[j], 22), fontsize=6)
            else:
                img = images[j]
            ax.imshow(((img.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(textwrap.fill(label, 16), fontsize=7)
    fig.suptitle("Inpainting on held-out scenes: the largest object repainted with a new colour or shape", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="held-out scenes (repainting tasks)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    ap.add_argument("--resample", type=int, default=4, help="RePaint: times each step is denoised")
    ap.add_argument("--jumps", default="1,5", help="RePaint jump lengths to compare (comma-separated)")
    add_run_args(ap, card="inpaint_unet")
    args = ap.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        ap.error("--n and --steps must be positive")
    assets, device = set_up(args)
    t0 = time.time()

    sd = load_tiny_sd(device=device, weights_dir=args.weights)
    evaluator = load_evaluator(weights_dir=args.weights, device=device)
    net = load_inpaint_unet(weights_dir=args.weights, device=device)
    heldout = data.generate(max(args.n, 1), seed=0, split="heldout")  # the training command's held-out scenes
    tasks = edit_tasks(heldout, args.n)
    card = net.card
    print(f"# Inpainting benchmark: {len(tasks.prompts)} held-out scenes, the largest object (mask dilated 2 px) "
          f"repainted with a new colour or shape; DDIM {args.steps} steps, guidance {args.guidance:g}, torch threads "
          f"{torch.get_num_threads()}\n")
    print(f"Inpainting U-Net: {card['num_parameters'] / 1e6:.2f}M parameters, fine-tuned from the U-Net for "
          f"{card['steps']} steps in {card['wall_time_s'] / 60:.1f} min on {card['device']} "
          f"({card.get('torch_threads')} threads).\n")

    with torch.no_grad():
        round_trip = sd.vae.decode(sd.vae.encode(tasks.images.to(device)).mean).clamp(-1, 1).cpu()
    runs = run_methods(sd, net, tasks, args.steps, args.guidance, args.seed, args.resample,
                       [int(j) for j in args.jumps.split(",") if j.strip()])
    rows = {"VAE round trip (no repainting)": measure_inpainting(round_trip, tasks, evaluator, round_trip)}
    for name, r in runs.items():
        rows[name] = measure_inpainting(r["images"], tasks, evaluator, round_trip)
        rows[name].update(seconds=r["seconds"], unet_calls_per_image=r["unet_calls"])

    print("| method | U-Net calls | PSNR outside the mask (dB) | outside its latent cells | vs VAE round trip | "
          "adherence in the mask (shape and colour) | shape | colour | seam: band gradient / real scene's |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in rows.items():
        calls = m.get("unet_calls_per_image", "")
        print(f"| {name} | {calls} | {m['psnr_outside_db']:.1f} | {m['psnr_outside_latent_cells_db']:.1f} | "
              f"{m['psnr_outside_vs_round_trip_db']:.1f} | {pct(m['region_adherence'])} | "
              f"{pct(m['region_per_attribute']['shape'])} | {pct(m['region_per_attribute']['colour'])} | "
              f"{m['seam_ratio']:.2f} |")
    real_levels = rows["blend"]["band_gradient_real"] * 127.5
    print(f"\nThe real scenes' band gradient: {real_levels:.2f} 8-bit levels per pixel (the U-Net calls count "
          "guided passes: each is one batched pass over the prompt and the empty prompt).")

    save_samples(tasks, runs, round_trip, assets / "inpainting_samples.png")
    results = {"methods": rows, "n_scenes": len(tasks.prompts), "steps": args.steps, "guidance_scale": args.guidance,
               "resample": args.resample, "seed": args.seed, "mask": "largest object, dilated 2 px; latent mask max-pooled",
               "prompts": tasks.prompts, "torch_threads": torch.get_num_threads(),
               "wall_time_s": round(time.time() - t0, 1)}
    (assets / "bench_inpainting.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.update_card:
        path = Path(args.weights or ROOT / "weights") / "inpaint_unet.json"
        full = json.loads(path.read_text())
        full["metrics"]["benchmark"] = {k: results[k] for k in ("methods", "n_scenes", "steps", "guidance_scale",
                                                                  "resample", "seed", "mask")}
        path.write_text(json.dumps(full, indent=2) + "\n")
    print(f"\nFigure: {assets / 'inpainting_samples.png'}; results: {assets / 'bench_inpainting.json'} "
          f"({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
