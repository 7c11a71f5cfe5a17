"""Wall time of each course sampler against its diffusers scheduler loop, side by side in one run.

    .venv/bin/python benchmarks/bench_sampler_speed.py                    # small conv model, then no model
    .venv/bin/python benchmarks/bench_sampler_speed.py --models unet      # tiny UNet2DConditionModel + CFG
    .venv/bin/python benchmarks/bench_sampler_speed.py --device cuda

"none" replaces the model by an elementwise function, so that what is timed is the samplers' own
work (coefficients, updates, noise, host syncs); with a real model that work is a small part.

Both sides run the same model on the same noise; the diffusers side is StableDiffusionPipeline's loop
(set_timesteps, init_noise_sigma, scale_model_input, model, step). Runs alternate between the two
sides and the median is reported. ratio = course / diffusers: below 1.0 the course is faster.
The outputs are also compared, so a fast but wrong sampler cannot pass unnoticed.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import HeunDiscreteScheduler  # noqa: E402

from course_lib.device import get_device  # noqa: E402
from course_lib.diffusers_bridge import diffusers_sampling_loop, scheduler_twin, sd_scheduler_config  # noqa: E402
from course_lib.guidance import guided_model  # noqa: E402
from course_lib.samplers import SAMPLERS, unet_model  # noqa: E402
from course_lib.schedules import sd_schedule  # noqa: E402

SD_CONFIG = sd_scheduler_config()

PAIRS = {name: scheduler_twin(name) for name in SAMPLERS}  # sampler -> its diffusers twin


class ConvDenoiser(nn.Module):
    """A small conv net with a sinusoidal timestep embedding: the cost profile of a light denoiser."""

    def __init__(self, channels: int = 4, width: int = 64):
        super().__init__()
        self.width = width
        self.t_proj = nn.Linear(width, width)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.mid = nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.SiLU())
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t, cond=None):
        half = self.width // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=x.device) / half)  # (half,)
        angles = t.float()[:, None] * freqs[None]  # (B, half)
        emb = self.t_proj(torch.cat([angles.sin(), angles.cos()], dim=1).to(x.dtype))  # (B, width)
        h = self.conv_in(x) + emb[:, :, None, None]  # (B, width, H, W)
        return self.conv_out(self.mid(h))


def build_model(kind: str, device, batch: int, size: int):
    """Returns (course model(x, t, cond), the raw callable for the diffusers loop, needs_cfg)."""
    if kind == "none":
        def fn(x, t, cond=None):  # an elementwise stand-in: almost free, so the sampler's own work shows
            return torch.tanh(x)
        return fn, None
    if kind == "conv":
        net = ConvDenoiser().to(device).eval()
        return net, None
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4,
    ).to(device).eval()
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(batch, 8, 32, generator=g).to(device)
    uncond = torch.randn(batch, 8, 32, generator=g).to(device)
    return unet_model(unet), (cond, uncond)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def diffusers_loop(scheduler_cls, config, num_steps, noise, model, texts, scale, seed):
    """StableDiffusionPipeline's denoising loop (with CFG when `texts` = (cond, uncond) is given)."""
    generator = None if scheduler_cls is HeunDiscreteScheduler else torch.Generator(noise.device).manual_seed(seed)
    cond, uncond = (None, None) if texts is None else texts
    return diffusers_sampling_loop(scheduler_cls.from_config(config), num_steps, noise, model, cond, uncond,
                                   guidance_scale=scale, generator=generator)


def course_run(name, num_steps, noise, model, texts, scale, seed):
    make_ts, kwargs = PAIRS[name].timesteps, PAIRS[name].sampler_kwargs
    if texts is not None:
        model = guided_model(model, texts[0], texts[1], scale)
    generator = torch.Generator(noise.device).manual_seed(seed)
    return SAMPLERS[name](model, noise, sd_schedule(), make_ts(num_steps), None, generator=generator, **kwargs)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=["conv", "unet", "none"], default=["conv", "none"])
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: $COURSE_DEVICE, else the best available)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=32, help="latent side (32: a 256-pixel SD image)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for small tensors)")
    p.add_argument("--samplers", nargs="*", default=list(PAIRS), choices=list(PAIRS))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = get_device(args.device)
    worst = 0.0
    for kind in args.models:
        worst = max(worst, run_table(kind, device, args))
    if worst > 1e-4:
        print(f"outputs differ by {worst:.2e}: the comparison is not like for like")
        return 1
    return 0


def run_table(kind, device, args) -> float:
    model, texts = build_model(kind, device, args.batch, args.size)
    scale = 7.5
    noise = torch.randn(args.batch, 4, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    print(f"\nmodel={kind} device={device} steps={args.steps} latents={tuple(noise.shape)} "
          f"cfg={'7.5' if texts else 'off'} repeats={args.repeats} threads={torch.get_num_threads()}")
    print(f"{'sampler':<16} {'course ms':>10} {'diffusers ms':>13} {'ratio':>7} {'max |diff|':>11}")
    worst = 0.0
    for name in args.samplers:
        cls, extra = PAIRS[name].scheduler, PAIRS[name].config
        config = {**SD_CONFIG, **extra}
        run_ours = lambda: course_run(name, args.steps, noise, model, texts, scale, 0)  # noqa: E731
        run_theirs = lambda: diffusers_loop(cls, config, args.steps, noise, model, texts, scale, 0)  # noqa: E731
        run_ours(), run_theirs()  # warm-up
        times, outs = {"ours": [], "theirs": []}, {}
        for r in range(args.repeats):
            order = [("ours", run_ours), ("theirs", run_theirs)]
            for side, fn in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
                dt, outs[side] = timed(fn, device)
                times[side].append(dt)
        diff = (outs["ours"] - outs["theirs"]).abs().max().item()
        worst = max(worst, diff)
        o, t = statistics.median(times["ours"]) * 1e3, statistics.median(times["theirs"]) * 1e3
        print(f"{name:<16} {o:>10.2f} {t:>13.2f} {o / t:>7.2f} {diff:>11.2e}")
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
