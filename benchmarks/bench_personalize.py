"""Benchmark of personalisation (lesson 10): textual inversion, LoRA at several ranks, DreamBooth with and without
prior preservation, all teaching the tiny SD the shape "heart", which no training picture showed.

    python benchmarks/bench_personalize.py                 # the shipped adapters (a few minutes on 2 CPU cores)
    python benchmarks/bench_personalize.py --n 16 --ordinary 16   # a quicker look

Every shipped adapter in ``weights/`` (written by ``python3 course.py train --only personalize``, see
``personalize.train_adapters``) is loaded into a fresh copy of the shipped tiny SD and measured the same way:

- **new-concept adherence**: ``--n`` held-out one-object captions of the concept (``personalize.heldout_prompts``),
  with the concept's word replaced by the method's word ("<heart>" for textual inversion, the rare identifier "sks"
  for LoRA and DreamBooth), scored by the evaluator against the captions with the real word: "concept read" (the
  object's shape, or colour, is the concept) and "all attributes" (prompt adherence: every named attribute right);
- **forgetting**: prompt adherence on ``--ordinary`` held-out one-object captions of the training world, against
  the shipped model's own;
- trainable parameters and CPU time from the model cards (the training runs, one thread).

DreamBooth without prior preservation is not shipped (a second fine-tuned U-Net would not fit the weights budget):
it is retrained here with its card's settings (``--skip-retrain`` reads its card's numbers instead).
Every generation uses DDIM 20 steps, guidance 5, the same generator seed.
Figure: personalize_samples.png (the same prompts and noise through each method). Results: bench_personalize.json.
In artifacts/, or assets/ with --write-assets.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_run_args, set_up  # noqa: E402
from course_lib import data, personalize as P  # noqa: E402
from course_lib.clip import UnknownWordsWarning  # noqa: E402
from course_lib.evaluator import load_evaluator  # noqa: E402
from course_lib.tiny_sd import load_tiny_sd  # noqa: E402
from course_lib.viz.plotting import to_uint8  # noqa: E402
from course_lib.weights import read_card  # noqa: E402


def save_samples(rows: list[tuple[str, torch.Tensor]], prompts: list[str], path: Path) -> None:
    fig, axes = plt.subplots(len(rows), len(prompts), figsize=(1.5 * len(prompts), 1.7 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c, im in enumerate(to_uint8(images)):
            ax = axes[r, c]
            ax.imshow(im)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(textwrap.fill(prompts[c], 22), fontsize=6)
        axes[r, 0].set_ylabel(textwrap.fill(label, 18), fontsize=7)
    fig.suptitle("The same held-out prompts of hearts and the same noise through each method", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="held-out prompts of the concept per method")
    ap.add_argument("--ordinary", type=int, default=96, help="ordinary held-out prompts (forgetting)")
    ap.add_argument("--skip-retrain", action="store_true",
                    help="read DreamBooth-without-prior's numbers from the card instead of retraining it")
    add_run_args(ap, card="dreambooth_unet")
    args = ap.parse_args(argv)
    if args.n < 1 or args.ordinary < 1:
        ap.error("--n and --ordinary must be positive")
    assets, device = set_up(args)
    t0 = time.time()
    warnings.simplefilter("ignore", UnknownWordsWarning)  # "sks" is unknown on purpose
    evaluator = load_evaluator(weights_dir=args.weights, device=device)

    def fresh():
        return load_tiny_sd(device=device, weights_dir=args.weights)

    tc = P.PersonalizeTraining()
    concept = tc.lora_concept
    show = P.heldout_prompts(concept, 8, seed=args.seed)
    base = fresh()
    rows, samples = [], []

    def add(method: str, sd, word: str, trainable: int, seconds: float, concept_: str = concept, sample: bool = True,
            **extra):
        m = P.measure(sd, evaluator, concept_, word, args.n, args.ordinary, args.seed)
        rows.append({"method": method, "concept": concept_, "word": word, "trainable": trainable,
                     "seconds": seconds, **m, **extra})
        if sample and concept_ == concept:
            samples.append((method.split(" (")[0], sd.generate(P.with_word(show, concept, word),
                                                               generator=torch.Generator().manual_seed(args.seed))))
        print(f"  {method}: {concept_} read {m['concept_read']:.0%}, all attributes {m['concept_adherence']:.0%}, "
              f"ordinary {m['ordinary_adherence']:.0%} ({time.time() - t0:.0f}s)", flush=True)

    print(f"# Personalisation benchmark: {args.n} held-out prompts of the concept, {args.ordinary} ordinary prompts, "
          f"DDIM 20, guidance 5, torch threads {torch.get_num_threads()}\n", flush=True)
    add("shipped model, the word itself (unknown token)", base, concept, 0, 0.0)
    for c in tc.ti_concepts:
        sd = fresh()
        token = P.load_textual_inversion_file(sd, f"ti_{c}", args.weights)
        card = read_card(f"ti_{c}", args.weights)
        if c != concept:
            add(f"the word '{c}' itself, shipped model", base, c, 0, 0.0, concept_=c)
        add(f"textual inversion ({c})", sd, token, card["num_parameters"], card["wall_time_s"], concept_=c)
    for r, suffix in [(r, "") for r in tc.lora_ranks] + [(tc.lora_prior_rank, "_prior")]:
        sd = fresh()
        name = P.lora_name(concept, r) + suffix
        P.load_lora_file(sd.unet, name, args.weights)
        card = read_card(name, args.weights)
        add(f"LoRA rank {r}" + (" + prior preservation" if suffix else ""), sd, P.TRIGGER, card["num_parameters"],
            card["wall_time_s"], sample=(r == tc.lora_prior_rank), rank=r, prior=bool(suffix))
    db_card = read_card("dreambooth_unet", args.weights)
    if args.skip_retrain:
        m = db_card["without_prior_preservation"]
        rows.append({"method": "DreamBooth, no prior preservation (model card)", "concept": concept, "word": P.TRIGGER,
                     "trainable": m["trainable"], "seconds": m["seconds"], "concept_read": m["concept_read"],
                     "concept_adherence": m["concept_adherence"], "ordinary_adherence": m["ordinary_adherence"],
                     "measured_on": f"{m['n_concept_prompts']} / {m['n_ordinary_prompts']} prompts (card)"})
    else:
        sd = fresh()
        scenes = P.concept_scenes(concept, db_card["n_images"], db_card["data_seed"])
        r = P.dreambooth(sd, scenes, concept, P.TRIGGER, None, 1.0, db_card["steps"], db_card["lr"],
                         db_card["batch_size"], tc.seed)
        add("DreamBooth, no prior preservation (retrained here)", sd, P.TRIGGER, r.trainable, r.seconds)
    sd = fresh()
    sd.unet = P.load_dreambooth_unet(args.weights, device)
    add("DreamBooth + prior preservation", sd, P.TRIGGER, db_card["num_parameters"], db_card["wall_time_s"])

    before = rows[0]["ordinary_adherence"]
    print("\n| method | word | trainable parameters | CPU time | concept read | all attributes right | "
          "ordinary prompts right | forgetting (points lost) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        row["forgetting"] = before - row["ordinary_adherence"]
        secs = f"{row['seconds']:.0f} s" if row["seconds"] else "-"
        print(f"| {row['method']} | `{row['word']}` | {row['trainable']:,} | {secs} | "
              f"{row['concept_read']:.0%} | {row['concept_adherence']:.0%} | {row['ordinary_adherence']:.0%} | "
              f"{100 * row['forgetting']:.0f} |")
    save_samples(samples, [P.with_word([p], concept, "*")[0] for p in show], assets / "personalize_samples.png")
    results = {"rows": rows, "n_concept_prompts": args.n, "n_ordinary_prompts": args.ordinary, "ddim_steps": 20,
               "guidance_scale": 5.0, "seed": args.seed, "concept": concept, "torch_threads": torch.get_num_threads(),
               "wall_time_s": round(time.time() - t0, 1)}
    (assets / "bench_personalize.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nFigure: {assets / 'personalize_samples.png'}; results: {assets / 'bench_personalize.json'} "
          f"({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
