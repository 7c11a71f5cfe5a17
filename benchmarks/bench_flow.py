"""Lesson 11's benchmark: DDPM against flow matching at equal network evaluations, and few-step sampling by distillation.

    python benchmarks/bench_flow.py                    # the full benchmark (about 20 minutes on 2 CPU cores)
    python benchmarks/bench_flow.py --n 64 --nfe 1,4,20   # a quicker look

Two U-Nets of the same architecture, trained on the same latents and text states with the same steps, batch and
learning rate (``weights/unet``: DDPM noise prediction; ``weights/flow_unet``: SD 3's rectified flow), each sampled
with its first-order ODE solver at the same guidance scale: DDIM ("trailing" timesteps, so that 1 and 2 steps start
from pure noise) and Euler on the flow ODE (diffusers' FlowMatchEulerDiscreteScheduler schedule). One network
evaluation (NFE) = one step = one batched pass over [unconditional, conditional] for both, so NFE is fair.

1. Models: parameters, file sizes, training steps and times (from the model cards).
2. Equal NFE, 1 to 50: FID (evaluator features, against the held-out reference; the real-scene floor beside it) of
   held-out prompts, and one-object adherence. Figure: both against NFE. The flow model is also shown with SD 3's
   shift 3.
3. Straightness of the sampling paths at 50 steps: |end - start| / path length, 1 = a straight line. DDIM's path is
   mapped into the flow's coordinates first (x / (sqrt(ab) + sqrt(1 - ab)) at noise share sqrt(1-ab) / (sqrt(ab) +
   sqrt(1-ab)): the same marginals up to scale), so both are measured in one space.
4. Distillation: the latent consistency model (``weights/lcm_unet``) at 1, 2 and 4 steps (one unguided pass each)
   against its teacher, the DDPM U-Net, at 20 DDIM steps (40 passes) and at the same few steps. Time per batch.

Results go to artifacts/ (assets/ with --write-assets): bench_flow.json, flow_vs_ddpm.png, lcm_samples.png.
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
from course_lib import data, fid, flow  # noqa: E402
from course_lib.evaluator import load_evaluator, prompt_adherence  # noqa: E402
from course_lib.flow_sd import load_flow_sd  # noqa: E402
from course_lib.lcm import load_lcm_sd  # noqa: E402
from course_lib.schedules import make_timesteps  # noqa: E402
from course_lib.tiny_sd import DEFAULT_GUIDANCE, load_tiny_sd  # noqa: E402
from course_lib.weights import WEIGHTS_DIR  # noqa: E402

GRID_PROMPTS = ["a red circle", "a large blue square in the top left", "a small striped yellow star",
                "Green triangle, bottom right.", "a purple ring and an orange cross"]


def generate_all(make, captions, seed, batch=128):
    """Images for every caption from ``make(captions, latents, generator)``; caption i always gets the same noise."""
    noise = torch.randn(len(captions), 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    return torch.cat([make(captions[s:s + batch], noise[s:s + batch], torch.Generator().manual_seed(seed + s))
                      for s in range(0, len(captions), batch)])


def samplers(ddpm, flow_sd, lcm_sd, scale):
    """name -> (nfe -> make function) for every sampler the benchmark compares."""
    return {
        "ddpm_ddim": lambda n: lambda c, z, g: ddpm.generate(c, num_steps=n, guidance_scale=scale, latents=z,
                                                             spacing="trailing", generator=g),
        "ddpm_ddim_leading": lambda n: lambda c, z, g: ddpm.generate(c, num_steps=n, guidance_scale=scale, latents=z,
                                                                     generator=g),
        "flow_euler": lambda n: lambda c, z, g: flow_sd.generate(c, num_steps=n, guidance_scale=scale, latents=z,
                                                                 generator=g),
        "flow_euler_shift3": lambda n: lambda c, z, g: flow_sd.generate(c, num_steps=n, guidance_scale=scale,
                                                                        latents=z, shift=3.0, generator=g),
        "lcm": lambda n: lambda c, z, g: lcm_sd.generate(c, num_steps=n, latents=z, generator=g),
    }


def measure(make, single, mixed, evaluator, reference, seed):
    t = time.time()
    adherence = prompt_adherence(generate_all(make, single, seed), single, evaluator)
    feats = evaluator.features(generate_all(make, mixed, seed + 1))
    return {"one_object": adherence["adherence"], "per_attribute": adherence["per_attribute"],
            "fid": fid.fid_to_reference(feats, (reference["mu"], reference["cov"])),
            "seconds": time.time() - t}


@torch.no_grad()
def ddim_path(ddpm, prompts, latents, steps, scale):
    """DDIM's latents at every step (trailing timesteps), mapped into the rectified flow's coordinates."""
    timesteps = make_timesteps(steps, 1000, "trailing", steps_offset=1)
    ab = ddpm.schedule.alphas_cumprod
    abs_ = [ab[int(t)] for t in timesteps] + [ab[0]]  # the sampler's last step lands on alpha_bar_0 (SD's setting)
    xs = [latents.float()]
    ddpm.generate(prompts, num_steps=steps, guidance_scale=scale, latents=latents, spacing="trailing",
                  callback=lambda i, t, x, x0: xs.append(x.float()))
    return torch.stack([flow.vp_to_flow(x, a)[0] for x, a in zip(xs, abs_)])


def pct(x):
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=192, help="prompts per measurement (one-object, and mixed for FID)")
    ap.add_argument("--nfe", default="1,2,4,8,16,32,50", help="network evaluations to compare")
    ap.add_argument("--lcm-steps", default="1,2,4", help="LCM step counts")
    ap.add_argument("--straight-n", type=int, default=32, help="prompts for the straightness measure")
    add_run_args(ap, card="flow_unet")
    args = ap.parse_args(argv)
    assets, device = set_up(args)
    weights = Path(args.weights) if args.weights else WEIGHTS_DIR
    nfes = [int(s) for s in args.nfe.split(",")]
    lcm_steps = [int(s) for s in args.lcm_steps.split(",")]
    scale = DEFAULT_GUIDANCE
    t_start = time.time()
    ddpm = load_tiny_sd(device=device, weights_dir=weights)
    flow_sd = load_flow_sd(device=device, weights_dir=weights)
    lcm_sd = load_lcm_sd(device=device, weights_dir=weights)
    evaluator = load_evaluator(weights_dir=weights, device=device)
    reference = fid.load_reference(weights / "fid_reference.safetensors")
    make = samplers(ddpm, flow_sd, lcm_sd, scale)
    results = {"n": args.n, "seed": args.seed, "guidance_scale": scale, "torch_threads": torch.get_num_threads()}

    print(f"# Flow matching against DDPM, and LCM: {args.n} prompts per point, torch threads "
          f"{torch.get_num_threads()}\n\n## 1. Models (from their model cards)\n")
    print("| model | objective | parameters | file | steps x batch | training time | threads |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for name, model, objective in (("unet", ddpm.unet, "DDPM noise prediction (Min-SNR 5)"),
                                   ("flow_unet", flow_sd.unet, "rectified flow, logit-normal sigma"),
                                   ("lcm_unet", lcm_sd.unet, "latent consistency distillation of unet")):
        c = model.card
        t = c.get("training_time_s", c["wall_time_s"])
        rows.append({"model": name, "objective": objective, "parameters": c["num_parameters"],
                     "bytes": c["file_bytes"], "steps": c["steps"], "batch": c["training"]["batch_size"],
                     "training_time_s": t, "threads": c.get("torch_threads")})
        print(f"| {name} | {objective} | {c['num_parameters'] / 1e6:.2f}M | {c['file_bytes'] / 2**20:.1f} MiB | "
              f"{c['steps']} x {c['training']['batch_size']} | {t / 60:.1f} min | {c.get('torch_threads')} |")
    results["models"] = rows

    single = data.generate(args.n, seed=args.seed, split="heldout", object_counts=(1.0, 0.0, 0.0)).captions
    mixed = data.generate(args.n, seed=args.seed + 3, split="heldout").captions
    floor = fid.fid_to_reference(evaluator.features(data.generate(args.n, seed=args.seed + 4,
                                                                  split="heldout").images_float()),
                                 (reference["mu"], reference["cov"]))
    results["fid_floor"] = floor
    print(f"\n## 2. Equal network evaluations (guidance {scale:g}; FID of {args.n} images of held-out prompts "
          f"against {reference['n']} real scenes, real scenes themselves {floor:.2f}; one-object adherence of "
          f"{args.n} prompts)\n")
    compared = ("ddpm_ddim", "flow_euler", "flow_euler_shift3")
    print("| NFE | " + " | ".join(f"{k} FID | {k} one object" for k in compared) + " |")
    print("|---:|" + "---:|---:|" * len(compared))
    curve = []
    for n in nfes:
        row = {"nfe": n}
        for k in compared:
            row[k] = measure(make[k](n), single, mixed, evaluator, reference, args.seed)
        curve.append(row)
        print(f"| {n} | " + " | ".join(f"{row[k]['fid']:.2f} | {pct(row[k]['one_object'])}" for k in compared) + " |",
              flush=True)
    results["equal_nfe"] = curve

    print(f"\n## 3. Straightness of the sampling paths (50 steps, {args.straight_n} prompts; 1 = straight)\n")
    prompts = mixed[:args.straight_n]
    z = torch.randn(len(prompts), 4, 16, 16, generator=torch.Generator().manual_seed(args.seed + 7))
    s_ddpm = flow.straightness(ddim_path(ddpm, prompts, z, 50, scale))
    _, path = flow_sd.generate(prompts, num_steps=50, guidance_scale=scale, latents=z, return_trajectory=True)
    s_flow = flow.straightness(path)
    results["straightness"] = {"n": len(prompts), "steps": 50,
                               "ddpm_ddim": {"mean": s_ddpm.mean().item(), "min": s_ddpm.min().item()},
                               "flow_euler": {"mean": s_flow.mean().item(), "min": s_flow.min().item()}}
    print("| model | mean | lowest |\n|---|---:|---:|")
    for k, s in (("ddpm_ddim", s_ddpm), ("flow_euler", s_flow)):
        print(f"| {k} | {s.mean().item():.3f} | {s.min().item():.3f} |")

    print(f"\n## 4. Distillation: LCM against its teacher (FID and one-object adherence as in 2; seconds for "
          f"16 images on {torch.get_num_threads()} torch thread(s))\n")
    print("| sampler | steps | network passes | FID | one object | seconds / 16 images |")
    print("|---|---:|---:|---:|---:|---:|")
    lcm_rows = []

    def timed(fn):
        fn(GRID_PROMPTS[:1] * 16, torch.zeros(16, 4, 16, 16), torch.Generator().manual_seed(0))  # warm-up
        t = time.time()
        fn(GRID_PROMPTS[:1] * 16, torch.randn(16, 4, 16, 16), torch.Generator().manual_seed(0))
        return time.time() - t

    teacher20 = make["ddpm_ddim_leading"](20)
    for label, fn, steps, passes in ([("teacher (DDIM, guided)", teacher20, 20, 40)]
                                     + [("teacher (DDIM trailing, guided)", make["ddpm_ddim"](s), s, 2 * s)
                                        for s in lcm_steps]
                                     + [("LCM", make["lcm"](s), s, s) for s in lcm_steps]):
        r = measure(fn, single, mixed, evaluator, reference, args.seed)
        r.update(sampler=label, steps=steps, passes=passes, seconds_16=timed(fn))
        lcm_rows.append(r)
        print(f"| {label} | {steps} | {passes} | {r['fid']:.2f} | {pct(r['one_object'])} | {r['seconds_16']:.2f} |",
              flush=True)
    results["distillation"] = lcm_rows
    results["wall_time_s"] = time.time() - t_start
    print(f"\nBenchmark wall time {results['wall_time_s'] / 60:.1f} min")

    (assets / "bench_flow.json").write_text(json.dumps(results, indent=1))
    save_curves(curve, floor, assets / "flow_vs_ddpm.png", args.n, scale)
    save_lcm_grid(ddpm, lcm_sd, lcm_steps, assets / "lcm_samples.png")
    print(f"wrote {assets / 'bench_flow.json'}, {assets / 'flow_vs_ddpm.png'}, {assets / 'lcm_samples.png'}")


def save_curves(curve, floor, path, n, scale):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    nfe = [r["nfe"] for r in curve]
    styles = {"ddpm_ddim": ("DDPM U-Net, DDIM", "C0", "-"), "flow_euler": ("flow U-Net, Euler", "C3", "-"),
              "flow_euler_shift3": ("flow U-Net, Euler, shift 3", "C3", ":")}
    for k, (label, colour, ls) in styles.items():
        axes[0].plot(nfe, [r[k]["fid"] for r in curve], ls, marker="o", color=colour, label=label)
        axes[1].plot(nfe, [100 * r[k]["one_object"] for r in curve], ls, marker="o", color=colour, label=label)
    axes[0].axhline(floor, color="grey", lw=0.8, ls="--", label="real scenes (floor)")
    axes[0].set_ylabel(f"FID ({n} images, evaluator features)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("one-object adherence (%)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(nfe)
        ax.set_xticklabels([str(x) for x in nfe])
        ax.set_xlabel("network evaluations (guided passes)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Same network, same data, same budget: DDPM against rectified flow (guidance {scale:g})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_lcm_grid(ddpm, lcm_sd, lcm_steps, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = torch.randn(len(GRID_PROMPTS), 4, 16, 16, generator=torch.Generator().manual_seed(100))
    rows = [("teacher, DDIM 20\n(40 passes)", ddpm.generate(GRID_PROMPTS, num_steps=20, latents=z))]
    rows += [(f"LCM, {s} step{'s' if s > 1 else ''}\n({s} pass{'es' if s > 1 else ''})",
              lcm_sd.generate(GRID_PROMPTS, num_steps=s, latents=z, generator=torch.Generator().manual_seed(1)))
             for s in lcm_steps]
    fig, axes = plt.subplots(len(rows), len(GRID_PROMPTS), figsize=(2.0 * len(GRID_PROMPTS), 2.0 * len(rows) + 0.6))
    for i, (label, images) in enumerate(rows):
        for j, prompt in enumerate(GRID_PROMPTS):
            ax = axes[i, j]
            ax.imshow(((images[j].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(textwrap.fill(prompt, 22), fontsize=7)
        axes[i, 0].set_ylabel(label, fontsize=7)
    fig.suptitle("Latent consistency distillation: the same starting noise, 1 to 4 steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
