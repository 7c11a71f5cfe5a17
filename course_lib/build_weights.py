"""The commands that rebuild ``weights/``: ``python -m course_lib.train`` and ``python -m course_lib.controlnet_train``.

Each trains a model with the loops of ``course_lib.train`` / ``course_lib.controlnet_train`` and
hands them the inference pipeline (``TinySD.from_models``) to measure what they trained: the
prompt-adherence check in the U-Net's model card, the edge-F1 learning curve and held-out check in
the ControlNet's. The training loops never import the pipeline themselves: training sits below
inference, and only this module, the command on top, knows both (tests/test_imports.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch

from . import data
from .clip import CLIPConfig
from .controlnet_train import ControlNetTraining, quick_training, train_controlnet
from .evaluator import EvaluatorConfig, load_evaluator
from .inpainting import quick_inpaint_check
from .tiny_sd import TinySD, load_tiny_sd
from .train import (MODELS, CLIPTraining, DataSettings, EvaluatorTraining, FlowUNetTraining, InpaintUNetTraining,
                    UNetTraining,
                    VAETraining, quick_settings, train_clip, train_evaluator, train_inpaint_unet, train_unet, train_vae)
from .vae import VAEConfig
from .weights import WEIGHTS_DIR


def main(argv: list[str] | None = None) -> None:
    """``python -m course_lib.train``: every model, in training order."""
    parser = argparse.ArgumentParser(description="Train the course's tiny Stable Diffusion from scratch.")
    parser.add_argument("--only", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps, written to runs/quick/")
    parser.add_argument("--out", default=None, help="output folder (default: weights/, or runs/quick/ with --quick)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    wanted = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = set(wanted) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {MODELS}")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    out = Path(args.out) if args.out else (Path("runs/quick") if args.quick else WEIGHTS_DIR)
    s = quick_settings() if args.quick else {"data": DataSettings(), **{m: (None, None) for m in MODELS}}
    dc = s["data"]
    t0 = time.time()
    # The generator's world (CLIP, U-Net, ControlNet) never shows the reserved concepts; the VAE, like SD's, is a
    # codec for any image and the evaluator a judge of every concept, so they see all of them.
    scenes = data.generate(dc.n_train, seed=dc.seed, split="train")
    heldout = data.generate(dc.n_heldout, seed=dc.seed, split="heldout")
    every = ((data.generate(dc.n_train, seed=dc.seed, split="train", concepts="all"),
              data.generate(dc.n_heldout, seed=dc.seed, split="heldout", concepts="all"))
             if {"evaluator", "vae"} & set(wanted) else None)
    twice = " (twice: with and without the reserved concepts)" if every else ""
    print(f"data: {len(scenes)} training and {len(heldout)} held-out scenes{twice} in {time.time() - t0:.1f}s")

    def settings(name, tdefault, cdefault):
        tc, cfg = s[name]
        return tc or tdefault, cfg or cdefault

    common = dict(data_cfg=dc, out_dir=out, device=args.device, quiet=args.quiet)
    evaluator = None
    for name in MODELS:
        if name not in wanted:
            continue
        t = time.time()
        if name == "evaluator":
            tc, cfg = settings(name, EvaluatorTraining(), EvaluatorConfig())
            evaluator = train_evaluator(*every, tc=tc, config=cfg, **common)
        elif name == "vae":
            tc, cfg = settings(name, VAETraining(), VAEConfig())
            train_vae(*every, tc=tc, config=cfg, evaluator=evaluator, **common)
        elif name == "clip":
            tc, cfg = settings(name, CLIPTraining(), CLIPConfig())
            train_clip(scenes, heldout, tc=tc, config=cfg, **common)
        elif name == "unet":
            tc, cfg = settings(name, UNetTraining(), None)
            train_unet(scenes, heldout, tc=tc, config=cfg, pipeline=TinySD.from_models, **common)
        elif name == "flow_unet":  # lesson 11: the U-Net's budget, SD 3's objective
            from .flow_sd import FlowSD

            tc, cfg = settings(name, FlowUNetTraining(), None)
            train_unet(scenes, heldout, tc=tc, config=cfg, pipeline=FlowSD.from_models, **common)
        elif name == "lcm_unet":  # lesson 11: the U-Net in `out` distilled into a few-step consistency model
            from .lcm import LCMTraining, distill_lcm, quick_lcm

            distill_lcm(scenes, heldout, tc=quick_lcm() if args.quick else LCMTraining(), **common)
        elif name == "controlnet":  # the ControlNet trains against the frozen U-Net just written to `out`
            train_controlnet(scenes, heldout, tc=quick_training() if args.quick else None,
                             pipeline=TinySD.from_models, **common)
        elif name == "personalize":  # lesson 10's adapters, on the models in `out`
            from .personalize import PersonalizeTraining, quick_personalize, train_adapters

            train_adapters(lambda: load_tiny_sd(args.device, weights_dir=out), load_evaluator(out, device=args.device),
                           out, quick_personalize() if args.quick else PersonalizeTraining(),
                           log=(lambda _: None) if args.quiet else print)
        else:  # the inpainting U-Net starts from the U-Net in `out`
            tc, _ = settings(name, InpaintUNetTraining(), None)
            train_inpaint_unet(scenes, heldout, tc=tc, measure=inpaint_measure(out, heldout, tc.eval_scenes, args.device),
                               **common)
        print(f"{name}: trained in {time.time() - t:.0f}s -> {out / name}.safetensors")
    print(f"all done in {time.time() - t0:.0f}s")


def inpaint_measure(out: Path, heldout: data.Scenes, n: int, device="cpu"):
    """The inpainting U-Net card's check: ``inpainting.quick_inpaint_check`` on ``n`` held-out scenes, with the
    VAE, CLIP and evaluator in ``out`` (nothing, without an evaluator there)."""
    from .weights import load_clip, load_unet, load_vae

    def measure(unet):
        if not n or not (out / "evaluator.json").exists():
            return {}
        sd = TinySD.from_models(load_vae(out, device=device), load_clip(out, device=device),
                                load_unet(out, device=device))
        return quick_inpaint_check(sd, unet, heldout, load_evaluator(out, device=device), n=n)

    return measure


def controlnet_main(argv: list[str] | None = None) -> None:
    """``python -m course_lib.controlnet_train``: the ControlNet alone, on the models already in the folder."""
    parser = argparse.ArgumentParser(description="Train the edge ControlNet on the frozen tiny Stable Diffusion.")
    parser.add_argument("--quick", action="store_true", help="a few steps, written to runs/quick/ (needs models there: "
                        "python -m course_lib.train --quick)")
    parser.add_argument("--out", default=None, help="folder with vae/clip/unet weights; the ControlNet is written there "
                        "(default: weights/, or runs/quick/ with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: ControlNetTraining.steps)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    out = Path(args.out) if args.out else (Path("runs/quick") if args.quick else WEIGHTS_DIR)
    tc = quick_training() if args.quick else ControlNetTraining()
    if args.steps is not None:
        tc = dataclasses.replace(tc, steps=args.steps)
    dc = DataSettings(n_train=512, n_heldout=128) if args.quick else DataSettings()
    t0 = time.time()
    scenes = data.generate(dc.n_train, seed=dc.seed, split="train")  # the same scenes as python -m course_lib.train
    heldout = data.generate(dc.n_heldout, seed=dc.seed, split="heldout")
    train_controlnet(scenes, heldout, dc, tc, out_dir=out, device=args.device, quiet=args.quiet,
                     pipeline=TinySD.from_models)
    print(f"controlnet: trained in {time.time() - t0:.0f}s -> {out / 'controlnet'}.safetensors")


if __name__ == "__main__":
    main()
