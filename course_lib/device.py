"""Where tensors live and where randomness comes from.

Every notebook starts by calling ``get_device()`` and seeding once; after that, every random
draw in the course takes an explicit ``torch.Generator`` so that a cell gives the same result
however often, and in whatever order, the cells above it were run.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

DEVICE_ENV = "COURSE_DEVICE"  # set to "cpu", "cuda", "cuda:1" or "mps" to override the choice


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def get_device(prefer: str | None = None) -> torch.device:
    """The device to compute on: ``prefer``, else $COURSE_DEVICE, else cuda, then mps, then cpu.

    An explicit request for a device that is not there raises a ValueError that says so,
    rather than failing later with a cryptic error deep inside a model.
    """
    wanted = prefer if prefer is not None else os.environ.get(DEVICE_ENV, "").strip() or None
    if wanted is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(wanted)
    except RuntimeError as err:
        raise ValueError(f"{wanted!r} is not a device name; use 'cpu', 'cuda', 'cuda:0' or 'mps'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {wanted!r} was requested (via {DEVICE_ENV} or an argument) but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {wanted!r} was requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not _mps_available():
        raise ValueError(f"device {wanted!r} was requested but Apple's MPS backend is not available here")
    return device


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` seeded with ``seed`` on ``device``.

    Draw noise with it (``torch.randn(shape, generator=g)``) instead of the global RNG, so the
    same seed gives the same image every time the cell runs.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and PyTorch's global generators once; returns a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return make_generator(seed)


def randn(shape, generator: torch.Generator, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard-normal noise drawn on the generator's device, then moved to ``device``.

    Drawing on the CPU generator and moving makes the same seed give the same noise on CPU and CUDA,
    which is what lets a learner compare their laptop's image with a GPU's.
    """
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def describe_environment() -> dict:
    """Versions and hardware, for lesson 0's setup check and for model cards."""
    import platform

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(get_device()),
        "cuda_available": torch.cuda.is_available(),
        "mps_available": _mps_available(),
        "cpu_threads": torch.get_num_threads(),
        "colab": in_colab(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for name in ("diffusers", "transformers", "safetensors", "matplotlib", "ipywidgets"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = "not installed"
    return info


def in_colab() -> bool:
    """True inside Google Colab."""
    try:
        import google.colab  # noqa: F401
    except ImportError:
        return False
    return True
