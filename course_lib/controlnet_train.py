"""Train the course's edge ControlNet on the frozen tiny Stable Diffusion. Lesson 6 shows the result.

    python -m course_lib.controlnet_train            # into weights/ (about 7 minutes on one CPU thread)
    python -m course_lib.controlnet_train --quick    # a seconds-long smoke run of a tiny model, into runs/quick/

It needs the trained VAE, CLIP and U-Net in the same folder (``python -m course_lib.train``).
One step (Zhang et al. 2023, eq. 3: the diffusion loss, now also conditioned on the control c):

    z0 = scaling_factor * (mean + std * n)        a fresh posterior sample of a pre-encoded scene
    t ~ U{0..999}, eps ~ N(0, I), z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps
    down, mid = controlnet(z_t, t, text, c)       c: the scene's edge map (sometimes its Canny map)
    loss = |eps - unet(z_t, t, text, down, mid)|^2   (Min-SNR weighted, as the U-Net was trained)

Only the ControlNet learns; the U-Net, VAE and text encoder stay frozen, so whatever the base model
could do it still can (scale 0 gives back its images exactly). Latents, text states and edge maps
are computed once before training, as the U-Net's training does. Some controls are Canny maps of
the scene instead of its own edge map, so that Canny maps of photographs work as controls too.

Two settings decide whether anything is learnt in a few minutes. Half the captions are dropped
(the paper's 50%): with the caption gone, only the edges say what to draw, so the control carries
a strong training signal. And the learning rate is 3e-3: at 1e-3, 1500 steps left edge F1 at the
base model's level. Even so, edge F1 stays flat for the first few hundred steps and then jumps
within ~200 steps to ~0.99 (the paper's "sudden convergence"); the card's ``edge_f1_curve`` shows it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import data, edges
from .clip import CLIP
from .controlnet import ControlNet, ControlNetConfig
from .evaluator import load_evaluator
from .metrics import control_metrics, quick_edge_f1, subset, unsaid_layout_adherence
from .schedules import sd_schedule
from .train import DataSettings, EncodedScenes, LossLog, batches, lr_at, min_snr_loss, optimiser_step
from .unet import UNet
from .vae import VAE
from .weights import WEIGHTS_DIR, library_versions, load_clip, load_unet, load_vae, read_card, save_model

@dataclass
class ControlNetTraining:
    steps: int = 1200  # optimiser steps (edge F1 jumps from the base model's level to ~0.99 somewhere in steps 300-800)
    batch_size: int = 64  # latents per step
    n_scenes: int = 10_000  # training scenes pre-encoded once (latents, text states, edge maps)
    n_canny: int = 1_000  # of those, how many also get a Canny map (skimage's Canny costs ~10 ms a scene)
    canny_fraction: float = 0.3  # share of controls drawn from the Canny map instead of the scene's edge map
    lr: float = 3e-3  # AdamW learning rate, constant after warm-up (the paper: 1e-5 for SD's copy; 1e-3 is too slow here)
    caption_dropout: float = 0.5  # captions replaced by "", as in the paper: the edges alone must then tell what to draw
    min_snr_gamma: float | None = 5.0  # Min-SNR weighting, as the U-Net was trained (None: plain MSE)
    eval_scenes: int = 64  # held-out scenes for the model card's quick edge-F1 and adherence check
    curve_every: int = 100  # also measure edge F1 on a few held-out scenes every this many steps (0: never)
    curve_scenes: int = 16  # held-out scenes for that learning curve (10 DDIM steps each: a few seconds)
    seed: int = 0  # initialisation of the control encoder, batch order, noise


def quick_training() -> ControlNetTraining:
    """A few steps on a few scenes: for smoke tests of the command (seconds)."""
    return ControlNetTraining(steps=5, batch_size=8, n_scenes=256, n_canny=32, eval_scenes=4, curve_every=0)


def train_controlnet(scenes: data.Scenes, heldout: data.Scenes, data_cfg: DataSettings = DataSettings(),
                     tc: ControlNetTraining | None = None, config: ControlNetConfig | None = None,
                     out_dir: str | Path = WEIGHTS_DIR, device="cpu", vae: VAE | None = None, clip: CLIP | None = None,
                     unet: UNet | None = None, quiet: bool = False,
                     pipeline: Callable[[VAE, CLIP, UNet], Any] | None = None) -> ControlNet:
    """Train a ControlNet on the scenes' edge maps against the frozen U-Net in ``out_dir``; save it there.

    config: only ``conditioning_channels`` and ``conditioning_block_channels`` are used; the
    encoder copy always takes the U-Net's own layout and weights (``ControlNet.from_unet``).
    Writes ``controlnet.safetensors`` and its model card ``controlnet.json``.
    pipeline: builds a generating pipeline from (vae, clip, unet), e.g. ``tiny_sd.TinySD.from_models``;
    with it the model card gets the edge-F1 learning curve and the held-out edge and adherence check.
    """
    from tqdm.auto import tqdm

    tc = tc or ControlNetTraining()
    config = config or ControlNetConfig()
    started, cpu_started = time.time(), time.process_time()
    vae = (vae if vae is not None else load_vae(out_dir, device=device)).eval().requires_grad_(False)
    clip = (clip if clip is not None else load_clip(out_dir, device=device)).eval().requires_grad_(False)
    unet = (unet if unet is not None else load_unet(out_dir, device=device)).eval().requires_grad_(False)
    torch.manual_seed(tc.seed)
    g = torch.Generator(device=device).manual_seed(tc.seed)
    gi = torch.Generator().manual_seed(tc.seed)

    # Everything the loop needs, computed once.
    n = min(len(scenes), tc.n_scenes)
    encoded = EncodedScenes.encode(vae, clip, scenes, n, device)
    scene_edges = scenes.edges[:n]  # (N, 1, 64, 64) bool
    n_canny = min(n, tc.n_canny)
    canny = edges.canny_edges(scenes.images[:n_canny]) if n_canny else scene_edges[:0]  # (n_canny, 1, 64, 64)
    prep_s = time.time() - started
    schedule = sd_schedule()
    snr = (schedule.alphas_cumprod / (1 - schedule.alphas_cumprod)).to(device)  # (T,)

    net = ControlNet.from_unet(unet, config.conditioning_channels, config.conditioning_block_channels).train()
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=0.0)
    log = LossLog()
    curve_s = 0.0
    pipe = pipeline(vae, clip, unet) if pipeline is not None else None
    curve_set = subset(heldout, tc.curve_scenes)
    curve = []  # (step, edge F1 with control): ControlNets are known to "suddenly" start following the control
    with tqdm(total=tc.steps, desc="train controlnet", disable=quiet, mininterval=2.0) as bar:
        for step, idx in enumerate(batches(n, tc.batch_size, tc.steps, gi)):
            ctrl = scene_edges[idx]  # (B, 1, 64, 64)
            if n_canny:
                use = (idx < n_canny) & (torch.rand(idx.shape[0], generator=gi) < tc.canny_fraction)
                ctrl = torch.where(use[:, None, None, None], canny[idx.clamp(max=n_canny - 1)], ctrl)
            ctrl = edges.to_control(ctrl).to(device)
            zt, t, eps, context = encoded.noisy_batch(idx, schedule, tc.caption_dropout, g)
            down, mid = net(zt, t, context, ctrl)
            pred = unet(zt, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)
            loss = min_snr_loss(pred, eps, t, snr, tc.min_snr_gamma)
            # the learning rate is constant after warm-up, as for the U-Net
            optimiser_step(opt, loss, lr_at(step, tc.steps, tc.lr, cosine=False), net.parameters())
            log.add(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if pipe is not None and tc.curve_every and ((step + 1) % tc.curve_every == 0 or step + 1 == tc.steps):
                t_curve = time.time()
                curve.append({"step": step + 1, "edge_f1_canny": quick_edge_f1(pipe, net.eval(), curve_set)})
                net.train()
                curve_s += time.time() - t_curve
                bar.write(f"controlnet step {step + 1}: loss {sum(log.values[-100:]) / len(log.values[-100:]):.4f}, "
                          f"edge F1 on {len(curve_set)} held-out scenes {curve[-1]['edge_f1_canny']:.3f}")
    train_s = time.time() - started - prep_s - curve_s
    net.eval().requires_grad_(False)

    metrics = {}
    if pipe is not None and tc.eval_scenes:
        evaluator = load_evaluator(out_dir, device=device) if (Path(out_dir) / "evaluator.json").exists() else None
        sub = subset(heldout, tc.eval_scenes)
        metrics = control_metrics(pipe, net, sub, evaluator, batch=tc.eval_scenes)
        if evaluator is not None:  # prompts without position and size: does the control supply them?
            layout = unsaid_layout_adherence(pipe, net, sub, evaluator, batch=tc.eval_scenes)
            metrics["unsaid_layout"] = {row: {k: layout[row][k] for k in ("position", "size", "adherence_to_truth")}
                                        for row in ("with_control", "without_control")}
        metrics["full_benchmark"] = "benchmarks/bench_controlnet.py --update-card adds the full held-out measurement"
    card = {"data": dataclasses.asdict(data_cfg), "training": dataclasses.asdict(tc), "steps": tc.steps,
            "loss": log.summary(), "metrics": metrics, "wall_time_s": round(time.time() - started, 1),
            "edge_f1_curve": curve,
            "wall_time_breakdown_s": {"pre_encode": round(prep_s, 1), "train": round(train_s, 1),
                                      "learning_curve": round(curve_s, 1),
                                      "evaluate": round(time.time() - started - prep_s - train_s - curve_s, 1)},
            # CPU seconds of this process: on a machine shared with other work, wall time says little; on an
            # otherwise idle machine with N cores, wall time is about cpu_time_s / N.
            "cpu_time_s": round(time.process_time() - cpu_started, 1),
            "device": str(device), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "base_unet_sha256": _card_sha(out_dir, "unet"), "versions": library_versions()}
    save_model(net, "controlnet", net.config, card, out_dir)
    return net


def _card_sha(out_dir, name: str) -> str | None:
    try:
        return read_card(name, out_dir).get("sha256")
    except (FileNotFoundError, ValueError):
        return None


if __name__ == "__main__":
    # The command lives in build_weights.py, beside the one for the other models (see course_lib/train.py).
    from .build_weights import controlnet_main

    controlnet_main()
