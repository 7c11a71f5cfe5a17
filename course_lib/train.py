"""Train every model of the course's tiny Stable Diffusion from scratch, with one command:

    python -m course_lib.train                     # everything, into weights/  (hours on 2 CPU cores: weights/README.md)
    python -m course_lib.train --only vae,clip     # some models (later ones load earlier ones from weights/)
    python -m course_lib.train --quick             # a seconds-long smoke run of tiny models, into runs/quick/

Order matters, as in Stable Diffusion: the evaluator first (it measures the others), then the VAE
(its latents are what diffusion works on), then CLIP (its frozen text tower conditions the U-Net),
then the U-Net, trained on *scaled VAE latents* of the training scenes. The models of the later lessons
(ControlNet, inpainting, lesson 10's adapters, lesson 11's flow U-Net and consistency model) come after it.

Every function here trains one model: seeded, with a tqdm progress bar, and it writes
``<name>.safetensors`` plus a ``<name>.json`` model card (config, data seed, steps, loss summary,
metrics, wall time, device, library versions) through ``course_lib.weights``. The same code runs
on a GPU unchanged (``--device cuda``); timings in the cards say where each model was trained.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from . import data
from .clip import CLIP, CLIPConfig, Tokenizer, contrastive_loss
from .evaluator import (Evaluator, EvaluatorConfig, attribute_accuracy, crop_loss_fn, crop_targets, load_evaluator,
                        loss_fn, prompt_adherence, readable_objects, targets)
from .inpainting import MaskSettings, inpaint_unet_from_base, latent_mask, masked_image, random_masks
from .metrics import clip_metrics, unet_metrics, vae_metrics
from .schedules import add_noise, sd_schedule
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig, compute_scaling_factor
from .weights import WEIGHTS_DIR, library_versions, load_clip, load_unet, load_vae, read_card, save_model

MODELS = ("evaluator", "vae", "clip", "unet", "controlnet", "inpaint_unet", "personalize", "flow_unet", "lcm_unet")
# in training order: each may use the ones before. "personalize" writes lesson 10's adapters
# (personalize.train_adapters): ti_*, lora_*_r*, dreambooth_unet. "flow_unet" (lesson 11) is the U-Net trained as a
# rectified flow; "lcm_unet" (lesson 11) the U-Net distilled into a few-step latent consistency model (course_lib.lcm).


# --- Training settings: one small dataclass per model. ---------------------------------------------

@dataclass
class EvaluatorTraining:
    steps: int = 800  # stage 1 optimiser steps (object-or-not, colour per cell, background)
    batch_size: int = 32  # scenes per stage 1 step (each gives a label to every one of its 32 x 32 cells)
    lr: float = 3e-3  # peak AdamW learning rate of both stages (cosine decay after a short warm-up)
    noise_std: float = 0.08  # max std of Gaussian noise added to inputs, so noisy generations still read
    blur_sigma: float = 1.0  # max std (pixels) of a Gaussian blur applied to half the inputs: decoded images are soft
    crop_steps: int = 3000  # stage 2 optimiser steps (shape, size, fill, centre offset from object crops)
    crop_batch_size: int = 64  # objects per stage 2 step, each cropped from its own (augmented) scene
    crop_jitter: float = 2.0  # the crop centre moves up to this many pixels off the mask's centroid
    seed: int = 0  # initialisation and batch order


@dataclass
class VAETraining:
    steps: int = 3000  # optimiser steps
    batch_size: int = 32  # scenes per step
    crop: int = 32  # train on crops of this side around an object (0: whole images); SD's VAE trained on 256 crops
    full_image_steps: int = 300  # the last steps see whole 64x64 images, as the VAE is used
    lr: float = 2e-3  # peak AdamW learning rate
    kl_weight: float = 1e-6  # weight of the per-image KL sum; tiny, as in SD (it only stops latents drifting)
    seed: int = 0  # initialisation, batch order and the reparameterisation noise


@dataclass
class CLIPTraining:
    steps: int = 1000  # optimiser steps
    batch_size: int = 128  # pairs per step: each image's negatives are the other 127 captions
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.1  # AdamW weight decay, as in CLIP
    twin_pairs: int = 32  # pairs per batch that differ only in one object's shape (data.shape_twins): hard negatives
    n_twins: int = 10_000  # such pairs drawn once, before training
    seed: int = 0


@dataclass
class UNetTraining:
    steps: int = 6000  # optimiser steps
    batch_size: int = 64  # latents per step
    n_scenes: int = 20_000  # training scenes encoded to latents once, before training (a fresh posterior sample each step)
    lr: float = 2e-3  # peak AdamW learning rate
    caption_dropout: float = 0.1  # fraction of captions replaced by "" so the model also learns the unconditional eps
    min_snr_gamma: float | None = 5.0  # Min-SNR loss weighting (Hang et al. 2023); None: plain MSE as in SD
    ema_decay: float = 0.999  # the shipped weights are an exponential moving average of the trained ones
    eval_captions: int = 64  # held-out one-object captions for the model card's quick adherence check
    snapshot_every: int = 1000  # also save the EMA weights every this many steps to runs/unet_snapshots/ (0: never)
    seed: int = 0
    # The learning rate is constant after warm-up (as in DDPM and SD) and the shipped weights are an
    # EMA, so the snapshot at step N equals the result of a run with steps=N: a run can be cut short.


@dataclass
class FlowUNetTraining(UNetTraining):
    """The U-Net's training budget (same steps, batch, scenes, learning rate, EMA, caption dropout), with SD 3's
    objective: rectified flow, velocity target eps - z0, plain MSE (no Min-SNR), noise levels drawn logit-normal."""
    min_snr_gamma: float | None = None  # SD 3 weights the loss through where it samples sigma, not with a weight
    logit_mean: float = 0.0  # sigma = sigmoid(u), u ~ N(logit_mean, logit_std^2): SD 3's eq. 19 with m = 0, s = 1
    logit_std: float = 1.0


@dataclass
class DataSettings:
    n_train: int = 50_000  # training scenes, drawn once and shared by every model
    n_heldout: int = 2_000  # held-out scenes for the metrics in the model cards
    seed: int = 0  # data seed (data.generate)


# --- Small shared helpers. ----------------------------------------------------------------------------

def lr_at(step: int, total: int, peak: float, warmup: int = 100, cosine: bool = True) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak (or constant, with ``cosine=False``)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if not cosine:
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def optimiser_step(opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float,
                   clip_params: Iterable[torch.nn.Parameter] | None = None) -> None:
    """One optimiser step at learning rate ``lr``; with ``clip_params``, their gradient norm is clipped to 1 first."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """Move the EMA copy towards the model, with a warm-up (decay min(decay, (1 + step) / (10 + step))) so that
    the first steps are not dominated by the random initialisation."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - d)


class LossLog:
    """Keeps every loss value; summarises them for the model card (first/last 5% means, min, 50-point curve)."""

    def __init__(self):
        self.values: list[float] = []

    def add(self, value: float) -> None:
        self.values.append(float(value))

    def summary(self) -> dict:
        v = self.values
        k = max(1, len(v) // 20)
        chunk = max(1, len(v) // 50)
        curve = [sum(v[i:i + chunk]) / len(v[i:i + chunk]) for i in range(0, len(v), chunk)]
        return {"first": sum(v[:k]) / k, "last": sum(v[-k:]) / k, "min": min(v), "curve_every_steps": chunk,
                "curve": [round(c, 6) for c in curve]}


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` random index batches over ``n`` items (with replacement across batches)."""
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=generator)


def _card(data_cfg: DataSettings, train_cfg, log: LossLog, metrics: dict, started: float, device) -> dict:
    return {"data": dataclasses.asdict(data_cfg), "training": dataclasses.asdict(train_cfg),
            "steps": train_cfg.steps, "loss": log.summary(), "metrics": metrics,
            "wall_time_s": round(time.time() - started, 1), "device": str(device),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            # Other programs sharing the CPU slow training down; the 1-minute load average says how busy it was.
            "load_average_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "versions": library_versions()}


def _bar(total: int, name: str, quiet: bool):
    return tqdm(total=total, desc=f"train {name}", disable=quiet, mininterval=2.0)


# --- 1. The evaluator. -------------------------------------------------------------------------------

def random_blur(x: torch.Tensor, max_sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Blur half of the images with a Gaussian of random std in [0, max_sigma] pixels (5x5 kernel)."""
    if max_sigma <= 0:
        return x
    b = x.shape[0]
    sigma = torch.rand(b, generator=generator) * max_sigma * (torch.rand(b, generator=generator) < 0.5)  # (B,)
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-r[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))  # (B, 5)
    k = k / k.sum(1, keepdim=True)
    kernel = (k[:, :, None] * k[:, None, :]).repeat_interleave(3, 0)[:, None]  # (B*3, 1, 5, 5)
    padded = torch.nn.functional.pad(x.reshape(1, b * 3, *x.shape[2:]), (2, 2, 2, 2), mode="replicate")
    return torch.nn.functional.conv2d(padded, kernel, groups=b * 3).reshape(x.shape)  # (B, 3, H, W)


def augment(x: torch.Tensor, tc: "EvaluatorTraining", generator: torch.Generator) -> torch.Tensor:
    """What generators produce: softened edges (``random_blur``) and a little Gaussian noise."""
    x = random_blur(x, tc.blur_sigma, generator)
    noise = torch.randn(x.shape, generator=generator)
    return x + noise * torch.rand(x.shape[0], 1, 1, 1, generator=generator) * tc.noise_std  # each image its own std


def train_evaluator(scenes: data.Scenes, heldout: data.Scenes, data_cfg: DataSettings = DataSettings(),
                    tc: EvaluatorTraining = EvaluatorTraining(), config: EvaluatorConfig = EvaluatorConfig(),
                    out_dir: str | Path = WEIGHTS_DIR, device="cpu", quiet: bool = False) -> Evaluator:
    """Train both stages of the evaluator on real scenes. ``scenes`` should hold every concept
    (``data.generate(..., concepts="all")``), so the evaluator also knows the reserved shapes and colour.

    Stage 1 labels the cells of whole images (``evaluator.targets``: object-or-not and colour, from the
    scenes' masks; the background). Stage 2 reads crops around single objects (``evaluator.crop_targets``:
    every object with at least ``MIN_VISIBLE`` of its shape visible, its mask degraded as stage 1's groups
    are). Both see the same blur and noise. Card metrics: instance-level held-out accuracy and the
    adherence of held-out scenes to their own captions."""
    started, cpu_started = time.time(), time.process_time()
    torch.manual_seed(tc.seed)
    g = torch.Generator().manual_seed(tc.seed)
    model = Evaluator(config).to(device)
    stage1 = [p for n, p in model.named_parameters() if not n.startswith("reader.")]
    opt = torch.optim.AdamW(stage1, lr=tc.lr, weight_decay=1e-4)
    log = LossLog()
    with _bar(tc.steps, "evaluator stage 1", quiet) as bar:
        for step, idx in enumerate(batches(len(scenes), tc.batch_size, tc.steps, g)):
            x = augment(data.to_float(scenes.images[idx]), tc, g)
            loss = loss_fn(model(x.to(device)), {k: v.to(device) for k, v in targets(scenes, idx).items()})
            optimiser_step(opt, loss, lr_at(step, tc.steps, tc.lr))
            log.add(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    readable = readable_objects(scenes)  # (M, 2): scene, slot
    opt = torch.optim.AdamW(model.reader.parameters(), lr=tc.lr, weight_decay=1e-4)
    crop_log = LossLog()
    with _bar(tc.crop_steps, "evaluator stage 2", quiet) as bar:
        for step, pick in enumerate(batches(len(readable), tc.crop_batch_size, tc.crop_steps, g)):
            objects = readable[pick]
            x = augment(data.to_float(scenes.images[objects[:, 0]]), tc, g)
            crops, tgt = crop_targets(scenes, objects, x, g, jitter=tc.crop_jitter)
            loss = crop_loss_fn(model.reader(crops.to(device)), {k: v.to(device) for k, v in tgt.items()})
            optimiser_step(opt, loss, lr_at(step, tc.crop_steps, tc.lr))
            crop_log.add(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model.eval()
    # Wall time depends on what else runs on the machine; CPU time (all threads) is what training cost.
    train_time, train_cpu = round(time.time() - started, 1), round(time.process_time() - cpu_started, 1)
    metrics = evaluator_metrics(model, heldout, device)
    metrics.update({"training_time_s": train_time, "training_cpu_time_s": train_cpu,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "parameters_stage2": sum(p.numel() for p in model.reader.parameters())})
    card = _card(data_cfg, tc, log, metrics, started, device)
    card["crop_loss"] = crop_log.summary()
    save_model(model, "evaluator", config, card, out_dir)
    return model


def evaluator_metrics(model: Evaluator, heldout: data.Scenes, device="cpu") -> dict:
    """The evaluator card's metrics: instance-level accuracy on ``heldout`` and its adherence to its own captions."""
    held = heldout.images_float().to(device)
    adherence = prompt_adherence(held, heldout.captions, model)
    return {"heldout_accuracy": attribute_accuracy(model, held, heldout),
            "heldout_adherence_to_own_captions": {k: adherence[k] for k in ("adherence", "per_attribute", "binding")},
            "n_heldout": len(heldout)}


# --- 2. The VAE. --------------------------------------------------------------------------------------

def object_crops(scenes: data.Scenes, idx: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A ``size`` x ``size`` crop of each scene around one of its objects, aligned to the 8-pixel latent grid.

    A convolutional autoencoder works the same on a crop as on the whole image, so training on
    crops that contain the shapes (the hard part: edges) and skip most of the flat background
    costs a quarter of the compute per scene. The crop corner moves by -8, 0 or +8 pixels at
    random, so objects are sometimes cut by the crop's border.
    """
    n_side = data.IMAGE_SIZE
    k = (torch.rand(len(idx), generator=generator) * scenes.n_objects[idx]).long()  # which object
    centre = scenes.centre[idx, k]  # (B, 2) x, y in pixels
    shift = (torch.randint(-1, 2, (len(idx), 2), generator=generator) * 8)  # (B, 2)
    corner = ((centre.long() - size // 2) // 8 * 8 + shift).clamp(0, n_side - size)  # (B, 2) x, y
    return torch.stack([scenes.images[i, :, y:y + size, x:x + size]
                        for i, (x, y) in zip(idx.tolist(), corner.tolist())])  # (B, 3, size, size)


def train_vae(scenes: data.Scenes, heldout: data.Scenes, data_cfg: DataSettings = DataSettings(),
              tc: VAETraining = VAETraining(), config: VAEConfig = VAEConfig(), out_dir: str | Path = WEIGHTS_DIR,
              device="cpu", evaluator: Evaluator | None = None, quiet: bool = False) -> VAE:
    """Train the KL autoencoder (L1 + MSE reconstruction + tiny KL), then compute its scaling factor."""
    started = time.time()
    torch.manual_seed(tc.seed)
    g = torch.Generator().manual_seed(tc.seed)
    gd = torch.Generator(device=device).manual_seed(tc.seed)
    config = dataclasses.replace(config)
    model = VAE(config).to(device).to(memory_format=torch.channels_last)  # channels_last: faster convs on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=0.0)
    log = LossLog()
    with _bar(tc.steps, "vae", quiet) as bar:
        for step, idx in enumerate(batches(len(scenes), tc.batch_size, tc.steps, g)):
            images = scenes.images[idx]
            if tc.crop and step < tc.steps - tc.full_image_steps:
                images = object_crops(scenes, idx, tc.crop, g)
            x = data.to_float(images).to(device).contiguous(memory_format=torch.channels_last)
            recon, posterior = model(x, gd)
            rec = (recon - x).abs().mean() + (recon - x).pow(2).mean()
            loss = rec + tc.kl_weight * posterior.kl().mean()
            optimiser_step(opt, loss, lr_at(step, tc.steps, tc.lr), model.parameters())
            log.add(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model = model.to(memory_format=torch.contiguous_format).eval()
    # SD's scaling factor: 1 / std of sampled latents over a sample of training images.
    sample = data.to_float(scenes.images[: min(len(scenes), 4096)]).to(device)
    config.scaling_factor = compute_scaling_factor(model, sample, generator=gd)
    if evaluator is None and (Path(out_dir) / "evaluator.json").exists():
        evaluator = load_evaluator(out_dir, device=device)  # trained first (or alongside): it reads the reconstructions
    metrics = vae_metrics(model, heldout, evaluator, device)
    metrics["scaling_factor"] = config.scaling_factor
    save_model(model, "vae", config, _card(data_cfg, tc, log, metrics, started, device), out_dir)
    return model


# --- 3. CLIP. -----------------------------------------------------------------------------------------

def train_clip(scenes: data.Scenes, heldout: data.Scenes, data_cfg: DataSettings = DataSettings(),
               tc: CLIPTraining = CLIPTraining(), config: CLIPConfig = CLIPConfig(), out_dir: str | Path = WEIGHTS_DIR,
               device="cpu", quiet: bool = False) -> CLIP:
    """Contrastive training of both towers on (scene, caption) pairs."""
    started = time.time()
    torch.manual_seed(tc.seed)
    g = torch.Generator().manual_seed(tc.seed)
    # The embedding table: one row per BPE token of the training captions, stored in the config (and the card).
    tok = Tokenizer.from_captions(scenes.captions, config.context_length)
    config = dataclasses.replace(config, **tok.table())
    ids = tok(scenes.captions)  # (N, L): tokenise once
    if tc.twin_pairs:
        if 2 * tc.twin_pairs > tc.batch_size:
            raise ValueError(f"twin_pairs={tc.twin_pairs} pairs do not fit in a batch of {tc.batch_size}")
        twins = data.shape_twins(tc.n_twins, seed=data_cfg.seed + 1, split="train")
        twin_ids = torch.stack([tok(twins[0].captions), tok(twins[1].captions)], 1)  # (P, 2, L)
        twin_images = torch.stack([twins[0].images, twins[1].images], 1)  # (P, 2, 3, 64, 64)
    model = CLIP(config).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=tc.lr, betas=(0.9, 0.98), eps=1e-6)
    log = LossLog()
    with _bar(tc.steps, "clip", quiet) as bar:
        for step, idx in enumerate(batches(len(scenes), tc.batch_size - 2 * tc.twin_pairs, tc.steps, g)):
            batch_ids, batch_images = ids[idx], scenes.images[idx]
            if tc.twin_pairs:
                pairs = torch.randint(0, tc.n_twins, (tc.twin_pairs,), generator=g)
                batch_ids = torch.cat([batch_ids, twin_ids[pairs].flatten(0, 1)])
                batch_images = torch.cat([batch_images, twin_images[pairs].flatten(0, 1)])
            # Drop the all-padding columns: with causal attention they cannot change the pooled
            # (end-token) embedding, so the loss is the same and the step is cheaper.
            batch_ids = batch_ids[:, : int((batch_ids != tok.pad_id).sum(1).max())]
            logits = model(data.to_float(batch_images).to(device), batch_ids.to(device))
            loss = contrastive_loss(logits)
            optimiser_step(opt, loss, lr_at(step, tc.steps, tc.lr))
            log.add(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", T=f"{1 / model.logit_scale.exp().item():.3f}", refresh=False)
    model.eval()
    metrics = clip_metrics(model, heldout, device)
    metrics["temperature"] = 1.0 / model.logit_scale.exp().item()
    save_model(model, "clip", config, _card(data_cfg, tc, log, metrics, started, device), out_dir)
    return model


# --- 4. The U-Net. ------------------------------------------------------------------------------------

@torch.no_grad()
def encode_scenes(vae: VAE, images_uint8: torch.Tensor, device="cpu", batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every scene, (N, 4, h, w) each, computed once before U-Net training."""
    means, stds = [], []
    for i in range(0, images_uint8.shape[0], batch_size):
        post = vae.encode(data.to_float(images_uint8[i:i + batch_size]).to(device))
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_captions(clip: CLIP, captions: list[str], device="cpu", batch_size: int = 1000):
    """Per-token hidden states of each *distinct* caption, plus an index from scenes to them.

    Returns (states (U, L, width), index (N,) long, empty (1, L, width)) where ``empty`` encodes "",
    the prompt that caption dropout substitutes and that CFG's unconditional branch uses.
    """
    tok = Tokenizer.from_config(clip.config)
    distinct = sorted(set(captions))
    where = {c: i for i, c in enumerate(distinct)}
    states = torch.cat([clip.text(tok(distinct[i:i + batch_size]).to(device)).last_hidden_state
                        for i in range(0, len(distinct), batch_size)])
    empty = clip.text(tok([""]).to(device)).last_hidden_state
    return states, torch.tensor([where[c] for c in captions]), empty


@dataclass
class EncodedScenes:
    """Training scenes encoded once, before a latent-diffusion training loop (U-Net or ControlNet).

    mean, std: the VAE posterior of every scene (N, 4, h, w); scale: the VAE's scaling factor;
    states, caption_index, empty: what ``encode_captions`` returns.
    """

    mean: torch.Tensor
    std: torch.Tensor
    scale: float
    states: torch.Tensor
    caption_index: torch.Tensor
    empty: torch.Tensor

    @classmethod
    def encode(cls, vae: VAE, clip: CLIP, scenes: data.Scenes, n: int, device="cpu") -> "EncodedScenes":
        mean, std = encode_scenes(vae, scenes.images[:n], device)  # (N, 4, h, w) each
        states, caption_index, empty = encode_captions(clip, scenes.captions[:n], device)
        return cls(mean, std, vae.config.scaling_factor, states, caption_index, empty)

    def clean_batch(self, idx: torch.Tensor, caption_dropout: float, g: torch.Generator):
        """(z0, text states) of scenes ``idx``: a fresh posterior sample of each, scaled, and their captions' states
        with a share ``caption_dropout`` replaced by the states of "" (drawn from ``g`` in that order)."""
        device = self.mean.device
        idx = idx.to(device)
        z0 = self.scale * (self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=g,
                                                                        device=device))
        context = self.states[self.caption_index[idx.cpu()].to(device)]  # (B, L, width)
        drop = torch.rand(idx.shape[0], generator=g, device=device) < caption_dropout
        return z0, torch.where(drop[:, None, None], self.empty.expand_as(context), context)

    def noisy_batch(self, idx: torch.Tensor, schedule, caption_dropout: float, g: torch.Generator):
        """One training batch: (z_t, t, eps, text states), every draw from ``g`` in a fixed order.

        z0 is a fresh sample of each scene's posterior, scaled to unit variance; a share
        ``caption_dropout`` of the captions becomes "", so the network also learns the
        unconditional prediction that classifier-free guidance needs.
        """
        z0, context = self.clean_batch(idx, caption_dropout, g)
        device = z0.device
        t = torch.randint(0, schedule.num_train_timesteps, (idx.shape[0],), generator=g, device=device)
        eps = torch.randn(z0.shape, generator=g, device=device)
        return add_noise(z0, eps, t, schedule), t, eps, context

    def flow_batch(self, idx: torch.Tensor, logit_mean: float, logit_std: float, caption_dropout: float,
                   g: torch.Generator):
        """One rectified-flow batch: (z_sigma, sigma, target velocity eps - z0, text states), drawn as ``noisy_batch``
        draws, with sigma = sigmoid(u), u ~ N(logit_mean, logit_std^2) (SD 3's logit-normal sampling)."""
        z0, context = self.clean_batch(idx, caption_dropout, g)
        device = z0.device
        sigma = torch.sigmoid(logit_mean + logit_std * torch.randn(idx.shape[0], generator=g, device=device))  # (B,)
        eps = torch.randn(z0.shape, generator=g, device=device)
        s = sigma[:, None, None, None]
        return (1 - s) * z0 + s * eps, sigma, eps - z0, context


def min_snr_loss(pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, snr: torch.Tensor,
                 gamma: float | None) -> torch.Tensor:
    """Mean over the batch of w_t |eps_hat - eps|^2, with w_t = min(SNR_t, gamma) / SNR_t (Min-SNR-gamma,
    Hang et al. 2023, for eps-prediction); gamma None gives SD's plain MSE. Nearly clean latents (high
    SNR, easy) count less; the noisy steps that decide layout, shape and colour count fully."""
    per_sample = (pred - eps).pow(2).mean(dim=(1, 2, 3))  # (B,)
    if gamma is not None:
        s_t = snr.to(pred.device)[t]
        per_sample = per_sample * s_t.clamp(max=gamma) / s_t
    return per_sample.mean()


def train_unet(scenes: data.Scenes, heldout: data.Scenes, data_cfg: DataSettings = DataSettings(),
               tc: UNetTraining = UNetTraining(), config: UNetConfig | None = None, out_dir: str | Path = WEIGHTS_DIR,
               device="cpu", vae: VAE | None = None, clip: CLIP | None = None, quiet: bool = False,
               pipeline: Callable[[VAE, CLIP, UNet], Any] | None = None) -> UNet:
    """Epsilon-prediction training on scaled VAE latents, conditioned on frozen CLIP text states.

    One step (Ho et al. 2020, Algorithm 1, in latent space as in Rombach et al. 2022):
    z0 = scaling_factor * (mean + std * n)  ->  t ~ U{0..999}, eps ~ N(0, I)
    ->  z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps  ->  loss = w_t |eps - eps_theta(z_t, t, text)|^2
    with w_t = min(SNR_t, gamma) / SNR_t (Min-SNR; w_t = 1, SD's plain MSE, with ``min_snr_gamma=None``).
    Symbols as in the notation block of course_lib/schedules.py.
    10% of captions are replaced by the encoding of "" (caption dropout), so the same network also
    predicts the unconditional noise that classifier-free guidance needs.
    pipeline: builds a generating pipeline from (vae, clip, unet), e.g. ``tiny_sd.TinySD.from_models``;
    with it (and an evaluator in ``out_dir``) the model card gets a quick prompt-adherence check.

    With ``tc`` a ``FlowUNetTraining`` the same loop, data, budget and network learn SD 3's objective instead
    (lesson 11): z_sigma = (1 - sigma) z0 + sigma eps with sigma = sigmoid(u), u ~ N(m, s^2), and
    loss = |v_theta(z_sigma, 1000 sigma, text) - (eps - z0)|^2; it writes ``flow_unet`` (prediction_type
    "flow_prediction"; pass ``flow_sd.FlowSD.from_models`` as ``pipeline``).
    """
    started = time.time()
    flow = isinstance(tc, FlowUNetTraining)
    name = "flow_unet" if flow else "unet"
    vae = vae if vae is not None else load_vae(out_dir, device=device)
    clip = clip if clip is not None else load_clip(out_dir, device=device)
    config = config or UNetConfig(context_dim=clip.config.width)
    if flow:
        config = dataclasses.replace(config, prediction_type="flow_prediction")
    if config.context_dim != clip.config.width:
        raise ValueError(f"UNetConfig.context_dim={config.context_dim} must equal the text width {clip.config.width}")
    torch.manual_seed(tc.seed)
    g = torch.Generator(device=device).manual_seed(tc.seed)
    gi = torch.Generator().manual_seed(tc.seed)
    n = min(len(scenes), tc.n_scenes)
    encoded = EncodedScenes.encode(vae, clip, scenes, n, device)
    schedule = sd_schedule()
    snr = schedule.alphas_cumprod / (1 - schedule.alphas_cumprod)  # (T,) signal-to-noise ratio of each timestep
    model = UNet(config).to(device)
    ema = UNet(config).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=0.0)
    log = LossLog()

    def measure(unet: UNet) -> dict:
        if pipeline is None or not (Path(out_dir) / "evaluator.json").exists():
            return {}
        return unet_metrics(pipeline(vae, clip, unet.eval()), load_evaluator(out_dir, device=device), heldout,
                            n=tc.eval_captions)

    with _bar(tc.steps, name, quiet) as bar:
        for step, idx in enumerate(batches(n, tc.batch_size, tc.steps, gi)):
            if flow:  # SD 3: z_sigma = (1 - sigma) z0 + sigma eps, the network called at timestep 1000 sigma
                zs, sigma, velocity, context = encoded.flow_batch(idx, tc.logit_mean, tc.logit_std, tc.caption_dropout, g)
                loss = (model(zs, sigma * schedule.num_train_timesteps, context) - velocity).pow(2).mean()
            else:
                zt, t, eps, context = encoded.noisy_batch(idx, schedule, tc.caption_dropout, g)
                loss = min_snr_loss(model(zt, t, context), eps, t, snr, tc.min_snr_gamma)
            optimiser_step(opt, loss, lr_at(step, tc.steps, tc.lr, cosine=False), model.parameters())
            ema_update(ema, model, step, tc.ema_decay)
            log.add(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if tc.snapshot_every and (step + 1) % tc.snapshot_every == 0 and step + 1 < tc.steps:
                snap = dataclasses.replace(tc, steps=step + 1)
                m = measure(ema)
                save_model(ema, f"{name}-step{step + 1}", config, _card(data_cfg, snap, log, m, started, device),
                           WEIGHTS_DIR.parent / "runs" / f"{name}_snapshots")  # git-ignored
                bar.write(f"{name} step {step + 1}: loss {sum(log.values[-100:]) / 100:.4f}, quick adherence {m}")
    train_s = round(time.time() - started, 1)
    metrics = measure(ema)
    card = _card(data_cfg, tc, log, metrics, started, device)
    card["training_time_s"] = train_s  # before the card's adherence check
    if flow:  # a second full U-Net: stored in float16 (half the file; loads as float32), as dreambooth_unet is
        card["objective"] = ("rectified flow: v_theta(z_sigma, 1000 sigma) ~ eps - z0, sigma = sigmoid(N(m, s^2)); "
                             "sample with course_lib.flow_sd.FlowSD (Euler on the flow ODE)")
        card["stored_as"] = "float16 (loads as float32); the card's metrics were measured before rounding"
    save_model(ema, name, config, card, out_dir, dtype=torch.float16 if flow else torch.float32)
    return ema


# --- 5. The inpainting U-Net (lesson 9). ----------------------------------------------------------------------

@dataclass
class InpaintUNetTraining:
    steps: int = 500  # optimiser steps, fine-tuning the shipped U-Net (SD 1.5-inpainting: 440k steps from SD 1.2)
    batch_size: int = 32  # latents per step
    n_scenes: int = 5_000  # training scenes pre-encoded once (latents, text states); their masks kept for masking
    lr: float = 1e-3  # peak AdamW learning rate, constant after warm-up (half the U-Net's: it starts trained)
    # conv_in's 5 new input channels start at zero and must grow to the scale of the others (~0.1) within a few
    # hundred steps: they learn at lr times this (at 1x they reached ~0.01 in 200 steps, the model barely used them)
    new_channels_lr_mult: float = 10.0
    caption_dropout: float = 0.1  # captions replaced by "", as for the U-Net: classifier-free guidance needs it
    min_snr_gamma: float | None = 5.0  # Min-SNR weighting, as the U-Net was trained (None: plain MSE)
    # Noisy timesteps count more: the eps error is also weighted by min(1 + 1/SNR_t, cap), EDM's weighting
    # (Karras et al. 2022, lambda(sigma) = (sigma^2 + 1) / sigma^2 on D, i.e. 1 + sigma^2 on eps), capped. Near t = 999
    # the known region's content changes the right eps by only sqrt(SNR) z0 (SNR = 0.005), so a plain eps loss
    # barely rewards reading the masked image there, while the sampler's x0 estimate (error / sqrt(SNR)) depends
    # on it most. None: off (then the loss is the U-Net's own).
    edm_weight_cap: float | None = 20.0
    masks: MaskSettings = dataclasses.field(default_factory=MaskSettings)  # kinds of random mask and their shares
    ema_decay: float = 0.99  # the shipped weights are an EMA over about the last 100 steps (the run is short)
    eval_scenes: int = 32  # held-out scenes for the model card's quick inpainting check
    snapshot_every: int = 100  # also save the EMA weights every this many steps to runs/inpaint_unet_snapshots/
    seed: int = 0


def train_inpaint_unet(scenes: data.Scenes, heldout: data.Scenes, data_cfg: DataSettings = DataSettings(),
                       tc: InpaintUNetTraining | None = None, out_dir: str | Path = WEIGHTS_DIR, device="cpu",
                       vae: VAE | None = None, clip: CLIP | None = None, unet: UNet | None = None, quiet: bool = False,
                       measure: Callable[[UNet], dict] | None = None) -> UNet:
    """Fine-tune a 9-channel inpainting U-Net from the trained U-Net in ``out_dir``, as SD's inpainting model.

    Start: ``inpainting.inpaint_unet_from_base`` (every weight of the U-Net, the 5 new input channels of
    conv_in zero: at step 0 it is the base model). One step (Rombach et al. 2022, section 4.5; the SD
    1.5-inpainting model card: "synthetic masks, in 25% mask everything"):
        z0 = scaling_factor * (mean + std * n); t ~ U{0..999}; z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps
        m ~ random mask (full / rectangle / one object of the scene, dilated / free strokes), 1 = repaint
        c = cat([latent_mask(m), scaling_factor * vae.encode(image * (m < 0.5)).sample()])     (B, 5, 16, 16)
        loss = w_t |eps - eps_theta(cat([z_t, c]), t, text)|^2      w_t: Min-SNR x capped EDM weight, 10% captions ""
    The masked image is encoded at every step (its mask is new each time); the scenes' latents and text
    states are encoded once. conv_in's new channels learn ``new_channels_lr_mult`` times faster than the rest
    (from zero, they must reach the scale of the trained weights within the run). measure: maps the EMA U-Net to the card's metrics (``build_weights`` passes the
    inpainting check of ``inpainting``; the training loop itself never imports the pipeline).
    Writes ``inpaint_unet.safetensors`` and its card ``inpaint_unet.json``.
    """
    tc = tc or InpaintUNetTraining()
    started, cpu_started = time.time(), time.process_time()
    vae = (vae if vae is not None else load_vae(out_dir, device=device)).eval().requires_grad_(False)
    clip = (clip if clip is not None else load_clip(out_dir, device=device)).eval().requires_grad_(False)
    base = (unet if unet is not None else load_unet(out_dir, device=device)).eval()
    torch.manual_seed(tc.seed)
    g = torch.Generator(device=device).manual_seed(tc.seed)
    gi = torch.Generator().manual_seed(tc.seed)
    gm = torch.Generator().manual_seed(tc.seed + 1)  # masks and the masked images' posterior samples
    n = min(len(scenes), tc.n_scenes)
    encoded = EncodedScenes.encode(vae, clip, scenes, n, device)
    images, object_masks, n_objects = scenes.images[:n], scenes.masks[:n], scenes.n_objects[:n]
    prep_s = time.time() - started
    schedule = sd_schedule()
    snr = schedule.alphas_cumprod / (1 - schedule.alphas_cumprod)  # (T,)
    model = inpaint_unet_from_base(base).to(device).train()
    ema = inpaint_unet_from_base(base).to(device).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=0.0)
    # The new channels of conv_in get their own AdamW at a higher rate. Each optimiser sees conv_in's gradient with
    # the other's channels zeroed; AdamW moves an element whose gradient is always 0 by exactly 0 (no weight decay),
    # so the two never touch each other's weights.
    w_in = model.conv_in.weight  # (C, 9, 3, 3)
    base_in = base.config.in_channels
    opt_new = torch.optim.AdamW([w_in], lr=tc.lr * tc.new_channels_lr_mult, weight_decay=0.0)
    log = LossLog()
    snapshots = []
    factor, scale = vae.config.downsample_factor, vae.config.scaling_factor
    with _bar(tc.steps, "inpaint_unet", quiet) as bar:
        for step, idx in enumerate(batches(n, tc.batch_size, tc.steps, gi)):
            zt, t, eps, context = encoded.noisy_batch(idx, schedule, tc.caption_dropout, g)
            m = random_masks(object_masks[idx], n_objects[idx], gm, tc.masks)  # (B, 1, 64, 64), 1 = repaint
            with torch.no_grad():
                post = vae.encode(masked_image(data.to_float(images[idx]), m).to(device))
                z_masked = scale * (post.mean + post.std * torch.randn(post.mean.shape, generator=gm).to(device))
            x_in = torch.cat([zt, latent_mask(m, factor).to(device), z_masked], 1)  # (B, 9, 16, 16)
            pred = model(x_in, t, context)
            if tc.edm_weight_cap is None:
                loss = min_snr_loss(pred, eps, t, snr, tc.min_snr_gamma)
            else:
                w_edm = (1 + 1 / snr.to(pred.device)[t]).clamp(max=tc.edm_weight_cap)  # (B,)
                loss = min_snr_loss(pred * w_edm.sqrt()[:, None, None, None], eps * w_edm.sqrt()[:, None, None, None],
                                    t, snr, tc.min_snr_gamma)
            lr = lr_at(step, tc.steps, tc.lr, cosine=False)
            for o, rate in ((opt, lr), (opt_new, lr * tc.new_channels_lr_mult)):
                for group in o.param_groups:
                    group["lr"] = rate
            opt.zero_grad(set_to_none=True)
            opt_new.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            grad = w_in.grad
            w_in.grad = torch.cat([grad[:, :base_in], torch.zeros_like(grad[:, base_in:])], 1)  # the base's channels
            opt.step()
            w_in.grad = torch.cat([torch.zeros_like(grad[:, :base_in]), grad[:, base_in:]], 1)  # the new channels
            opt_new.step()
            ema_update(ema, model, step, tc.ema_decay)
            log.add(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if tc.snapshot_every and (step + 1) % tc.snapshot_every == 0 and step + 1 < tc.steps:
                snap = dataclasses.replace(tc, steps=step + 1)
                card = _card(data_cfg, snap, log, {}, started, device)
                save_model(ema, f"inpaint_unet-step{step + 1}", ema.config, card,
                           WEIGHTS_DIR.parent / "runs" / "inpaint_unet_snapshots")  # git-ignored
                snapshots.append(step + 1)
                bar.write(f"inpaint_unet step {step + 1}: loss {sum(log.values[-100:]) / len(log.values[-100:]):.4f} "
                          f"({time.time() - started:.0f}s)")
    train_s = time.time() - started - prep_s
    ema.eval()
    metrics = measure(ema) if measure is not None else {}
    card = _card(data_cfg, tc, log, metrics, started, device)
    card.update({"wall_time_breakdown_s": {"pre_encode": round(prep_s, 1), "train": round(train_s, 1),
                                           "evaluate": round(time.time() - started - prep_s - train_s, 1)},
                 "cpu_time_s": round(time.process_time() - cpu_started, 1),
                 "initialised_from": "unet (conv_in's 5 extra input channels zero)",
                 "base_unet_sha256": _sha_or_none(out_dir, "unet"),
                 "input_channels": "cat([z_t (4), latent mask (1, max-pooled), masked image latent (4)])"})
    save_model(ema, "inpaint_unet", ema.config, card, out_dir)
    return ema


def _sha_or_none(out_dir, name: str) -> str | None:
    try:
        return read_card(name, out_dir).get("sha256")
    except (FileNotFoundError, ValueError):
        return None


# --- The command. -------------------------------------------------------------------------------------

def quick_settings() -> dict:
    """Tiny models and a few steps: for smoke tests and for checking the command works (seconds)."""
    return {
        "data": DataSettings(n_train=512, n_heldout=128),
        "evaluator": (EvaluatorTraining(steps=5, batch_size=16, crop_steps=5, crop_batch_size=16),
                      EvaluatorConfig(channels=(8, 8, 8), hidden=16, crop_channels=(8, 8, 8, 8), crop_hidden=16)),
        "vae": (VAETraining(steps=5, batch_size=8, full_image_steps=2),
                VAEConfig(block_channels=(8, 8, 8), layers_per_block=1, norm_groups=4)),  # factor 4, as the real one
        "clip": (CLIPTraining(steps=5, batch_size=16, twin_pairs=4, n_twins=64), CLIPConfig(width=32, layers=1, heads=2, embed_dim=16,
                                                                  image_channels=(8, 8, 8, 8))),
        "unet": (UNetTraining(steps=5, batch_size=8, n_scenes=256, eval_captions=4, snapshot_every=0),
                 UNetConfig(block_channels=(16, 16), layers_per_block=1, heads=2, context_dim=32,
                            time_embed_dim=32, norm_groups=8, ff_mult=1)),
        "flow_unet": (FlowUNetTraining(steps=5, batch_size=8, n_scenes=256, eval_captions=4, snapshot_every=0),
                      UNetConfig(block_channels=(16, 16), layers_per_block=1, heads=2, context_dim=32,
                                 time_embed_dim=32, norm_groups=8, ff_mult=1)),
        "inpaint_unet": (InpaintUNetTraining(steps=5, batch_size=8, n_scenes=256, eval_scenes=4, snapshot_every=0),
                         None),  # its architecture is the U-Net's, with 9 input channels
    }


if __name__ == "__main__":
    # The command lives in build_weights.py: it also measures each model with the inference pipeline,
    # which this module, the training loops, does not import.
    from .build_weights import main

    main()
