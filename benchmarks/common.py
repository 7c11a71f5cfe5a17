"""What bench_tiny_sd.py and bench_controlnet.py share: their run options and the set-up those options ask for."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from course_lib.device import get_device

ROOT = Path(__file__).resolve().parents[1]


def add_run_args(ap: argparse.ArgumentParser, card: str) -> None:
    """--seed, --threads, --assets, --write-assets, --device, --weights, --update-card (writes weights/<card>.json)."""
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--assets", default=None, help="output folder (default: artifacts/; assets/ with --write-assets)")
    ap.add_argument("--write-assets", action="store_true", help="write the README's figures and results into assets/")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: $COURSE_DEVICE, else the best available)")
    ap.add_argument("--weights", default=None, help="weights folder (default: the shipped weights/)")
    ap.add_argument("--update-card", action="store_true", help=f"store the results in weights/{card}.json")


def set_up(args: argparse.Namespace) -> tuple[Path, torch.device]:
    """Threads as asked; the output folder (created) and the device."""
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    assets = Path(args.assets or ROOT / ("assets" if args.write_assets else "artifacts"))
    assets.mkdir(parents=True, exist_ok=True)
    return assets, get_device(args.device)
