"""Saving and loading the course's trained models: safetensors for tensors, JSON for everything else.

Every shipped model is two files in ``weights/``:

- ``<name>.safetensors``: the tensors, nothing else. safetensors is a flat header plus raw bytes;
  reading it cannot run code, unlike ``torch.load`` of a pickle (which can run anything an
  attacker put in the file). The course never unpickles.
- ``<name>.json``: the model card. The config that rebuilds the architecture, the data seed,
  training steps, a loss summary, the measured metrics, wall time, device, library versions,
  and the SHA-256 of the tensor file (so a damaged or swapped file is caught before use).

Loading happens only in the explicit ``load_*`` functions below; constructors never touch disk.
Anything wrong (missing file, damaged file, config or tensors that do not fit the architecture)
raises ``WeightsError`` (a ``ValueError``) or ``FileNotFoundError`` with a message that says
what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"  # the shipped weights
CARD_VERSION = 1
_TRAIN_COMMAND = {"evaluator": "evaluator", "vae": "vae", "clip": "clip", "unet": "unet", "inpaint_unet": "inpaint_unet",
                  "flow_unet": "flow_unet", "lcm_unet": "lcm_unet"}


def retrain_hint(name: str) -> str:
    """How to get a missing or damaged weight file back."""
    if name in _TRAIN_COMMAND:
        how = f"Re-create it with `python -m course_lib.train --only {_TRAIN_COMMAND[name]}`"
    else:
        how = "Re-create it with the training command of the model that wrote it"
    return how + " (or restore the shipped file with `git checkout weights/`)."

C = TypeVar("C")
M = TypeVar("M", bound=nn.Module)


class WeightsError(ValueError):
    """A weight file or model card that cannot be used: damaged, mismatched or of the wrong kind."""


def library_versions() -> dict:
    """Versions worth recording in a model card."""
    import numpy
    import safetensors

    from . import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "course_lib": __version__, "platform": sys.platform}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _paths(name: str, weights_dir: str | Path | None) -> tuple[Path, Path]:
    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    return d / f"{name}.safetensors", d / f"{name}.json"


def save_model(model: nn.Module, name: str, config: Any, card: dict, weights_dir: str | Path | None = None,
               dtype: torch.dtype = torch.float32) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` (config + ``card`` + checksum). Returns the tensor file's path.

    ``card`` holds what training knows (data seed, steps, losses, metrics, wall time, device).
    Floating tensors are stored as ``dtype`` (float32 by default).
    """
    from safetensors.torch import save

    tensor_path, card_path = _paths(name, weights_dir)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
             for k, v in model.state_dict().items()}
    tensor_path.write_bytes(_canonical_header(save(state, metadata={"name": name, "format": "pt"})))
    full_card = {
        "name": name,
        "card_version": CARD_VERSION,
        "architecture": type(model).__name__,
        "config": dataclasses.asdict(config),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "file_bytes": tensor_path.stat().st_size,
        "sha256": _sha256(tensor_path),
        "stored_dtype": str(dtype).replace("torch.", ""),
        **card,
    }
    if "versions" not in full_card:
        full_card["versions"] = library_versions()
    card_path.write_text(json.dumps(full_card, indent=2, default=_json_default) + "\n")
    return tensor_path


def save_tensors(state: dict[str, torch.Tensor], name: str, config: dict, card: dict,
                 weights_dir: str | Path | None = None) -> Path:
    """Write tensors that are not one module's state dict (an adapter in the format another library reads: a
    LoRA file for diffusers' ``load_lora_weights``, a textual-inversion embedding) as ``<name>.safetensors``, with a
    model card ``<name>.json`` (``config``: what rebuilds or applies them; checksum as for ``save_model``)."""
    from safetensors.torch import save

    tensor_path, card_path = _paths(name, weights_dir)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tensor_path.write_bytes(_canonical_header(save(state, metadata={"name": name, "format": "pt"})))
    full_card = {"name": name, "card_version": CARD_VERSION, "config": config,
                 "num_parameters": sum(v.numel() for v in state.values()), "file_bytes": tensor_path.stat().st_size,
                 "sha256": _sha256(tensor_path), **card}
    if "versions" not in full_card:
        full_card["versions"] = library_versions()
    card_path.write_text(json.dumps(full_card, indent=2, default=_json_default) + "\n")
    return tensor_path


def _canonical_header(raw: bytes) -> bytes:
    """The same safetensors file with its JSON header written with sorted keys.

    safetensors lays the tensor bytes out in a fixed order but writes the header's metadata in
    hash order, which changes from run to run; sorting it makes a retrained model's file
    bit-identical, so its sha256 in the model card is reproducible too. The layout is
    8 bytes (little-endian header length), the JSON header padded with spaces to a multiple of 8,
    then the tensor bytes, which are kept as they are.
    """
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to a model card")


def read_card(name: str, weights_dir: str | Path | None = None) -> dict:
    """The model card of ``name`` as a dict (no tensors are read)."""
    tensor_path, card_path = _paths(name, weights_dir)
    if not card_path.exists():
        raise FileNotFoundError(f"no model card {card_path}. " + retrain_hint(name))
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"model card {card_path} is not valid JSON ({err}). " + retrain_hint(name)) from err
    if not isinstance(card, dict) or "config" not in card or card.get("name") != name:
        raise WeightsError(f"{card_path} is not a model card for {name!r} (it needs 'name' and 'config'). "
                           + retrain_hint(name))
    return card


def config_from_card(config_cls: Callable[..., C], card: dict) -> C:
    """Rebuild a config dataclass from a card, rejecting keys the class does not know."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(card["config"]) - fields
    if unknown:
        raise WeightsError(f"model card {card['name']!r} has config keys {sorted(unknown)} that "
                           f"{config_cls.__name__} does not know: the card belongs to another version or model. "
                           + retrain_hint(card["name"]))
    try:
        return config_cls(**card["config"])
    except (TypeError, ValueError) as err:
        raise WeightsError(f"model card {card['name']!r} holds an invalid {config_cls.__name__}: {err}") from err


def read_tensors(name: str, weights_dir: str | Path | None = None, card: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``name``, after checking the file against the checksum in its card."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensor_path, _ = _paths(name, weights_dir)
    card = card if card is not None else read_card(name, weights_dir)
    if not tensor_path.exists():
        raise FileNotFoundError(f"no weight file {tensor_path}. " + retrain_hint(name))
    if tensor_path.read_bytes()[:200].startswith(b"version https://git-lfs"):
        raise WeightsError(f"{tensor_path} is a Git LFS pointer, not the weights: run `git lfs pull`.")
    expected = card.get("sha256")
    if expected is not None and _sha256(tensor_path) != expected:
        raise WeightsError(f"{tensor_path} does not match the checksum in its model card: the file is damaged "
                           "or belongs to another training run. " + retrain_hint(name))
    try:
        return load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{tensor_path} is not a readable safetensors file ({err}). " + retrain_hint(name)) from err


def load_state_into(model: M, state: dict[str, torch.Tensor], name: str) -> M:
    """Copy ``state`` into ``model``, insisting that every key and shape matches exactly."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("wrong shapes " + ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                                                     for k in wrong[:5]))
        raise WeightsError(f"the weights of {name!r} do not fit the architecture its card describes ("
                           + "; ".join(parts) + "). " + retrain_hint(name))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model


def load_model(name: str, config_cls: Callable[..., C], build: Callable[[C], M], weights_dir: str | Path | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> M:
    """Card -> config -> ``build(config)`` -> checked tensors -> eval-mode model on ``device``/``dtype``."""
    card = read_card(name, weights_dir)
    config = config_from_card(config_cls, card)
    model = build(config)
    load_state_into(model, read_tensors(name, weights_dir, card), name)
    model.eval().requires_grad_(False)
    model.card = card  # the card travels with the model: metrics, data seed, versions
    return model.to(device=device, dtype=dtype)


# --- One explicit loader per shipped model. -------------------------------------------------------

def load_vae(weights_dir=None, device=None, dtype=None):
    """The course's trained VAE (``weights/vae.*``)."""
    from .vae import VAE, VAEConfig

    return load_model("vae", VAEConfig, VAE, weights_dir, device, dtype)


def load_clip(weights_dir=None, device=None, dtype=None):
    """The course's trained CLIP, both towers (``weights/clip.*``)."""
    from .clip import CLIP, CLIPConfig

    return load_model("clip", CLIPConfig, CLIP, weights_dir, device, dtype)


def load_unet(weights_dir=None, device=None, dtype=None):
    """The course's trained conditional U-Net (``weights/unet.*``)."""
    from .unet import UNet, UNetConfig

    return load_model("unet", UNetConfig, UNet, weights_dir, device, dtype)


def load_flow_unet(weights_dir=None, device=None, dtype=None):
    """Lesson 11's flow-matching U-Net (``weights/flow_unet.*``): the U-Net's architecture trained as a rectified
    flow (prediction_type "flow_prediction"); sample it with ``flow_sd.FlowSD``."""
    from .unet import UNet, UNetConfig

    model = load_model("flow_unet", UNetConfig, UNet, weights_dir, device, dtype)
    if model.config.prediction_type != "flow_prediction":
        raise WeightsError(f"flow_unet's card says prediction_type={model.config.prediction_type!r}, not "
                           "'flow_prediction'. " + retrain_hint("flow_unet"))
    return model


def load_lcm_unet(weights_dir=None, device=None, dtype=None):
    """Lesson 11's latent consistency model (``weights/lcm_unet.*``): the U-Net distilled for 1-4 step sampling with
    ``lcm.LCMSD``; ``model.distilled_guidance`` is the guidance scale its card says was folded into it."""
    from .unet import UNet, UNetConfig

    model = load_model("lcm_unet", UNetConfig, UNet, weights_dir, device, dtype)
    model.distilled_guidance = float(read_card("lcm_unet", weights_dir)["guidance_scale"])
    return model


def load_inpaint_unet(weights_dir=None, device=None, dtype=None):
    """The course's inpainting U-Net (``weights/inpaint_unet.*``): the U-Net's architecture with 9 input channels,
    cat([noisy latent, mask, masked image latent]) as SD's inpainting model; lesson 9, ``course_lib.inpainting``."""
    from .unet import UNet, UNetConfig

    model = load_model("inpaint_unet", UNetConfig, UNet, weights_dir, device, dtype)
    if model.config.in_channels != 9:
        raise WeightsError(f"inpaint_unet's card says in_channels={model.config.in_channels}; an inpainting U-Net "
                           "takes 9 (latent 4, mask 1, masked image latent 4). " + retrain_hint("inpaint_unet"))
    return model

# The evaluator's and the ControlNet's loaders live beside their models: evaluator.load_evaluator,
# controlnet.load_controlnet.
