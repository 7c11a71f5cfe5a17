"""The evaluator: an attribute classifier that turns "does the image obey the prompt?" into a number.

Lesson 4 (classifier-free guidance) and lesson 5 (samplers) use it to *measure* what guidance
scale, step count and sampler do, instead of asking the learner to squint at pictures.

It is a small CNN trained on real scenes. For each of the 5 positions of the data set it
predicts whether an object is there (occupancy) and, if so, its shape, colour and size; it
also predicts the background. A caption is **confirmed** when, for every object it names, the
evaluator finds an object at that position with that shape, colour and size (and the background
matches, when the caption names one). **Prompt adherence** is the fraction of images whose
caption is confirmed. The classifier itself scores >= 99% per attribute on held-out real scenes
(see its model card), so a miss is the generator's fault, not the judge's.

Output layout per image (logits)::

    occupancy  (5,)     one logit per position: is an object there?
    shape      (5, 3)   per position, over SHAPES        (only trained where an object is)
    colour     (5, 5)   per position, over COLOURS
    size       (5, 2)   per position, over SIZES
    background (2,)     over BACKGROUNDS
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scenes, parse_caption
from .weights import load_model

NP = len(POSITIONS)
HEADS = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}  # per-position categorical heads


@dataclass
class EvaluatorConfig:
    channels: tuple = (16, 32, 64)  # conv widths at 32x32, 16x16, 8x8 (each stage halves the side)
    hidden: int = 128  # width of the fully connected layer that reads the 8x8 feature map

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if len(self.channels) != 3:
            raise ValueError(f"channels must hold 3 widths (for 32, 16 and 8 pixels), got {self.channels}")


class Evaluator(nn.Module):
    """Images (B, 3, 64, 64) in [-1, 1] -> a dict of logits (see the module docstring)."""

    def __init__(self, config: EvaluatorConfig | None = None):
        super().__init__()
        self.config = cfg = config or EvaluatorConfig()
        layers, cin = [], 3
        for c in cfg.channels:
            layers += [nn.Conv2d(cin, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            cin = c
        self.features = nn.Sequential(*layers)  # (B, C, 8, 8)
        # Flattening (not pooling) keeps *where* things are: positions are part of every caption.
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(cin * 64, cfg.hidden), nn.ReLU())
        self.n_out = NP * (1 + sum(len(v) for v in HEADS.values())) + len(BACKGROUNDS)
        self.head = nn.Linear(cfg.hidden, self.n_out)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dim() != 4 or images.shape[1:] != (3, 64, 64):
            raise ValueError(f"the evaluator reads (B, 3, 64, 64) images in [-1, 1], got {tuple(images.shape)}")
        out = self.head(self.fc(self.features(images.clamp(-1, 1))))  # (B, n_out)
        b, i = out.shape[0], 0
        logits = {"occupancy": out[:, :NP]}
        i = NP
        for name, vocab in HEADS.items():
            k = NP * len(vocab)
            logits[name] = out[:, i:i + k].view(b, NP, len(vocab))  # (B, positions, classes)
            i += k
        logits["background"] = out[:, i:]
        return logits

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Hard predictions: occupancy bool (B, 5); shape/colour/size long (B, 5); background long (B,)."""
        was_training = self.training
        self.eval()
        parts = []
        for s in range(0, images.shape[0], batch_size):
            lg = self(images[s:s + batch_size])
            parts.append({"occupancy": lg["occupancy"] > 0, "background": lg["background"].argmax(-1),
                          **{n: lg[n].argmax(-1) for n in HEADS}})
        self.train(was_training)
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def read_attributes(self, images: torch.Tensor) -> list[dict]:
        """What the evaluator sees, in the format of ``Scenes.attributes``: one dict per image."""
        pred = {k: v.cpu() for k, v in self.predict(images).items()}
        out = []
        for b in range(pred["background"].shape[0]):
            objects = [{"shape": SHAPES[int(pred["shape"][b, p])], "colour": COLOURS[int(pred["colour"][b, p])],
                        "size": SIZES[int(pred["size"][b, p])], "position": POSITIONS[p]}
                       for p in range(NP) if pred["occupancy"][b, p]]
            out.append({"objects": objects, "background": BACKGROUNDS[int(pred["background"][b])]})
        return out


def targets(scenes: Scenes) -> dict[str, torch.Tensor]:
    """Per-position training targets from scene attributes (-1 where a position is empty)."""
    n = len(scenes)
    t = {"occupancy": torch.zeros(n, NP), "background": scenes.background.clone()}
    for name in HEADS:
        t[name] = torch.full((n, NP), -1, dtype=torch.long)
    rows = torch.arange(n)
    for k in range(scenes.position.shape[1]):
        here = scenes.position[:, k] >= 0
        r, p = rows[here], scenes.position[here, k]
        t["occupancy"][r, p] = 1.0
        for name in HEADS:
            t[name][r, p] = getattr(scenes, name)[here, k]
    return t


def loss_fn(logits: dict, tgt: dict) -> torch.Tensor:
    """Occupancy BCE + background CE + per-position CE where an object is (ignore_index=-1)."""
    loss = F.binary_cross_entropy_with_logits(logits["occupancy"], tgt["occupancy"])
    loss = loss + F.cross_entropy(logits["background"], tgt["background"])
    for name in HEADS:
        loss = loss + F.cross_entropy(logits[name].flatten(0, 1), tgt[name].flatten(), ignore_index=-1)
    return loss


@torch.no_grad()
def attribute_accuracy(evaluator: Evaluator, images: torch.Tensor, scenes: Scenes) -> dict[str, float]:
    """Per-attribute accuracy against the true attributes of ``scenes``.

    occupancy over all 5 positions of every image; shape/colour/size over occupied positions;
    background per image; ``scene`` = every one of those right at once.
    """
    pred = {k: v.cpu() for k, v in evaluator.predict(images).items()}
    tgt = targets(scenes)
    return _match(pred, {**tgt, "occupancy": tgt["occupancy"] > 0})


def _match(pred: dict, ref: dict) -> dict[str, float]:
    """Per attribute, how often ``pred`` reads what ``ref`` says, over the positions occupied in ``ref``;
    ``scene``: the fraction of images where everything matches."""
    occ = ref["occupancy"]
    out = {"occupancy": (pred["occupancy"] == occ).float().mean().item()}
    scene_ok = (pred["occupancy"] == occ).all(1) & (pred["background"] == ref["background"])
    for name in HEADS:
        right = (pred[name] == ref[name]) | ~occ
        out[name] = right[occ].float().mean().item()
        scene_ok &= right.all(1)
    out["background"] = (pred["background"] == ref["background"]).float().mean().item()
    out["scene"] = scene_ok.float().mean().item()
    return out


@torch.no_grad()
def agreement(evaluator: Evaluator, images_a: torch.Tensor, images_b: torch.Tensor) -> dict[str, float]:
    """How often the evaluator reads the same attributes from two sets of images (e.g. originals vs
    VAE reconstructions). Per attribute over positions occupied in ``images_a``; ``scene`` = all agree."""
    pa = {k: v.cpu() for k, v in evaluator.predict(images_a).items()}
    pb = {k: v.cpu() for k, v in evaluator.predict(images_b).items()}
    return _match(pb, pa)


def load_evaluator(weights_dir: str | Path | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> Evaluator:
    """The course's trained attribute classifier (``weights/evaluator.*``; safetensors, nothing unpickled).

    The same arguments, in the same order, as ``weights.load_vae`` and the other loaders:
    ``load_evaluator(device=device)`` in the lessons.
    """
    return load_model("evaluator", EvaluatorConfig, Evaluator, weights_dir, device, dtype)


@torch.no_grad()
def prompt_adherence(images: torch.Tensor, captions: list[str], evaluator: Evaluator) -> dict:
    """Score generated ``images`` (B, 3, 64, 64) in [-1, 1] against the ``captions`` they were generated from.

    ``evaluator``: ``load_evaluator()``. The images are moved to its device and dtype (a float16
    pipeline's images are scored like any other). Returns a dict:
      ``adherence``: fraction of images whose every captioned attribute is confirmed;
      ``per_attribute``: fraction of captioned objects whose position is occupied ("position") and,
      separately, whose shape / colour / size is read correctly at that position; "background"
      over captions that name one;
      ``extra_objects``: fraction of images with an object where the caption put none;
      ``confirmed``: the per-image booleans (list), ``n``: number of images.
    """
    if not isinstance(evaluator, Evaluator):
        raise ValueError(f"prompt_adherence(images, captions, evaluator) needs the Evaluator third "
                         f"(load_evaluator() gives it), got {type(evaluator).__name__}")
    if images.shape[0] != len(captions):
        raise ValueError(f"got {images.shape[0]} images but {len(captions)} captions")
    p = next(evaluator.parameters())
    pred = {k: v.cpu() for k, v in evaluator.predict(images.to(p.device, p.dtype)).items()}
    counts = {k: [0, 0] for k in ("position", "shape", "colour", "size", "background")}  # [right, total]
    confirmed, extra = [], 0
    for b, text in enumerate(captions):
        want = parse_caption(text)
        ok, wanted_positions = True, set()
        for obj in want["objects"]:
            p = POSITIONS.index(obj["position"])
            wanted_positions.add(p)
            here = bool(pred["occupancy"][b, p])
            counts["position"][0] += here
            counts["position"][1] += 1
            ok &= here
            for name, vocab in HEADS.items():
                right = here and int(pred[name][b, p]) == vocab.index(obj[name])
                counts[name][0] += right
                counts[name][1] += 1
                ok &= right
        if want["background"] is not None:
            right = int(pred["background"][b]) == BACKGROUNDS.index(want["background"])
            counts["background"][0] += right
            counts["background"][1] += 1
            ok &= right
        extra += any(bool(pred["occupancy"][b, p]) for p in range(NP) if p not in wanted_positions)
        confirmed.append(bool(ok))
    n = len(captions)
    return {
        "adherence": sum(confirmed) / max(n, 1),
        "per_attribute": {k: (r / t if t else float("nan")) for k, (r, t) in counts.items()},
        "extra_objects": extra / max(n, 1),
        "confirmed": confirmed,
        "n": n,
    }
