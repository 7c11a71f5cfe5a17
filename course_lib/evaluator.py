"""The evaluator: a small network that turns "does the image obey its prompt?" into a number.

Lesson 4 (classifier-free guidance), lesson 5 (samplers), lesson 6 (ControlNet) and the benchmarks use
it to *measure* what guidance scale, step count, sampler and control do, instead of asking the learner to
squint at pictures. Its pooled features are also what ``course_lib.fid`` computes FID and KID on.

**How it reads a scene.** The world's scenes hold one to three objects anywhere (continuous position,
size, rotation), often overlapping. A classifier with one output slot per place cannot describe that, so
the evaluator labels *pixels*, as a segmentation network does (a small U-Net-like encoder-decoder in the
spirit of Ronneberger et al. 2015, "U-Net"), and objects are read from the labelled pixels:

- for every pixel of a 32 x 32 grid (each cell covers 2 x 2 image pixels): is it part of an object, and
  if so the object's shape, colour, size class, fill and **position**, where position is the 3 x 3 grid
  cell of the *centre* of the object the pixel belongs to (so a half-hidden object keeps its position);
- for the whole image: the background (from pooled features).

``read_attributes`` groups the object pixels by their (shape, colour) reading; each group of at least
``MIN_PIXELS`` pixels is one object, and its size, fill and position are the majority vote of its
pixels. Two objects of one scene never share both shape and colour (``data.sample_attributes`` makes
sure of it), so the grouping is unambiguous on real scenes.

**Prompt adherence.** ``prompt_adherence`` reads each caption with ``data.parse_prompt`` (the one prompt
parser) and confirms an image when every object of the prompt matches a distinct object in the image
with every attribute the prompt *names* (an unsaid attribute may be anything, as in Stable Diffusion,
where "a red circle" fits countless images), and the background matches when the prompt names one.

**How good a judge it is.** ``attribute_accuracy`` on held-out real scenes (every concept, reserved ones
included): the model card records it, and tests/test_evaluator.py holds it to >= 97% per attribute.
An object that is mostly hidden (less than ``MIN_VISIBLE`` = 30% of its own shape visible) is left out
of those accuracies: a person could not name its shape either.

Output layout per image (logits)::

    object      (32, 32)       is this pixel part of an object?
    shape       (8, 32, 32)    per pixel, over SHAPES      (trained only on object pixels)
    colour      (9, 32, 32)    over COLOURS
    size        (3, 32, 32)    over SIZES
    fill        (2, 32, 32)    over FILLS
    position    (9, 32, 32)    over POSITIONS: the grid cell of the centre of the pixel's object
    background  (3,)           over BACKGROUNDS
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import (BACKGROUNDS, COLOURS, FILLS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, Scenes,
                   parse_prompt, shape_masks)
from .weights import load_model

HEAD_SIDE = 32  # the per-pixel heads work on a 32 x 32 grid: each cell is 2 x 2 image pixels
PIXEL_HEADS = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "fill": FILLS, "position": POSITIONS}
OBJECT_ATTRIBUTES = ("shape", "colour", "size", "position", "fill")  # in the order of Scenes.attributes
MIN_PIXELS = 4  # a (shape, colour) group of at least this many head pixels (2 x 2 image pixels each) is an object
MIN_VISIBLE = 0.3  # accuracy leaves out objects with less than this fraction of their own shape visible


@dataclass
class EvaluatorConfig:
    channels: tuple = (32, 64, 128)  # encoder widths at 32x32, 16x16, 8x8 (each stage halves the side)
    hidden: int = 32  # decoder width (16x16 and 32x32): what the per-pixel heads read

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if len(self.channels) != 3:
            raise ValueError(f"channels must hold 3 widths (for 32, 16 and 8 pixels), got {self.channels}")
        if self.hidden < 1 or min(self.channels) < 1:
            raise ValueError(f"widths must be positive, got channels={self.channels}, hidden={self.hidden}")


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Evaluator(nn.Module):
    """Images (B, 3, 64, 64) in [-1, 1] -> a dict of logits (see the module docstring).

    Encoder 64 -> 32 -> 16 -> 8 (two 3x3 convs per stage, BatchNorm, ReLU); the input carries two extra
    channels, the pixel's x and y in [-1, 1] (CoordConv, Liu et al. 2018), because position is part of
    every caption. Decoder 8 -> 16 -> 32: upsample, add the encoder's features of that side (a skip
    connection through a 1x1 conv, as in a feature pyramid), one 3x3 conv. The heads are 1x1 convs.
    """

    def __init__(self, config: EvaluatorConfig | None = None):
        super().__init__()
        self.config = cfg = config or EvaluatorConfig()
        c32, c16, c8 = cfg.channels
        self.enc32 = nn.Sequential(_conv(3 + 2, c32, 2), _conv(c32, c32))  # (B, c32, 32, 32)
        self.enc16 = nn.Sequential(_conv(c32, c16, 2), _conv(c16, c16))  # (B, c16, 16, 16)
        self.enc8 = nn.Sequential(_conv(c16, c8, 2), _conv(c8, c8))  # (B, c8, 8, 8): the bottleneck
        self.lateral8 = nn.Conv2d(c8, cfg.hidden, 1)
        self.lateral16 = nn.Conv2d(c16, cfg.hidden, 1)
        self.lateral32 = nn.Conv2d(c32, cfg.hidden, 1)
        self.dec16 = _conv(cfg.hidden, cfg.hidden)
        self.dec32 = _conv(cfg.hidden, cfg.hidden)
        self.n_pixel_out = 1 + sum(len(v) for v in PIXEL_HEADS.values())
        self.pixel_head = nn.Conv2d(cfg.hidden, self.n_pixel_out, 1)
        self.background_head = nn.Linear(c8, len(BACKGROUNDS))

    def _check(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"the evaluator reads (B, 3, 64, 64) images in [-1, 1], got {tuple(images.shape)}")

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._check(images)
        b = images.shape[0]
        ramp = torch.linspace(-1, 1, IMAGE_SIZE, device=images.device, dtype=images.dtype)
        coords = torch.stack([ramp.view(1, -1).expand(IMAGE_SIZE, -1), ramp.view(-1, 1).expand(-1, IMAGE_SIZE)])  # (2, H, W): x, y
        x = torch.cat([images.clamp(-1, 1), coords.expand(b, -1, -1, -1)], 1)  # (B, 5, 64, 64)
        f32 = self.enc32(x)
        f16 = self.enc16(f32)
        return f32, f16, self.enc8(f16)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f32, f16, f8 = self._encode(images)
        up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
        d16 = self.dec16(up(self.lateral8(f8)) + self.lateral16(f16))  # (B, hidden, 16, 16)
        d32 = self.dec32(up(d16) + self.lateral32(f32))  # (B, hidden, 32, 32)
        out = self.pixel_head(d32)  # (B, n_pixel_out, 32, 32)
        logits, i = {"object": out[:, 0]}, 1
        for name, vocab in PIXEL_HEADS.items():
            logits[name] = out[:, i:i + len(vocab)]  # (B, classes, 32, 32)
            i += len(vocab)
        logits["background"] = self.background_head(f8.mean((2, 3)))
        return logits

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Pooled bottleneck features (B, D), D = ``config.channels[-1]``: the average over the 8 x 8 map.

        What ``course_lib.fid`` computes FID and KID on, as Inception-v3's pooled features are for
        photographs (Heusel et al. 2017). Always computed in eval mode, in float32, on the CPU output.
        """
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        parts = [self._encode(images[s:s + batch_size].to(p.device, p.dtype))[2].mean((2, 3)).float().cpu()
                 for s in range(0, images.shape[0], batch_size)]
        self.train(was_training)
        return torch.cat(parts)  # (B, D)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Hard per-pixel predictions on the CPU: object bool (B, 32, 32); shape, colour, size, fill,
        position long (B, 32, 32); background long (B,). Images are moved to the evaluator's device and dtype."""
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        parts = []
        for s in range(0, images.shape[0], batch_size):
            lg = self(images[s:s + batch_size].to(p.device, p.dtype))
            parts.append({"object": (lg["object"] > 0).cpu(), "background": lg["background"].argmax(-1).cpu(),
                          **{n: lg[n].argmax(1).cpu() for n in PIXEL_HEADS}})
        self.train(was_training)
        return {k: torch.cat([q[k] for q in parts]) for k in parts[0]}

    def read_attributes(self, images: torch.Tensor, min_pixels: int = MIN_PIXELS) -> list[dict]:
        """What the evaluator sees, in the format of ``Scenes.attributes``: one dict per image,
        {"objects": [{"shape", "colour", "size", "position", "fill"}, ...] (largest first), "background"}."""
        pred = self.predict(images)
        return [{"objects": [{k: v for k, v in o.items() if k != "pixels"} for o in objs],
                 "background": BACKGROUNDS[int(pred["background"][b])]}
                for b, objs in enumerate(group_objects(pred, min_pixels))]


def group_objects(pred: dict, min_pixels: int = MIN_PIXELS) -> list[list[dict]]:
    """Objects from per-pixel predictions (``Evaluator.predict``): per image, a list of dicts with the five
    attributes as words and ``pixels``, a bool (32, 32) map of the group, largest group first.

    Object pixels are grouped by their (shape, colour) reading; a group of at least ``min_pixels`` is an
    object; its size, fill and position are the majority vote of its pixels.
    """
    b = pred["object"].shape[0]
    n_keys = len(SHAPES) * len(COLOURS)
    key = (pred["shape"] * len(COLOURS) + pred["colour"]).view(b, -1)  # (B, 1024): one id per (shape, colour)
    key = torch.where(pred["object"].view(b, -1), key, torch.full_like(key, n_keys))  # background: an extra id
    counts = torch.zeros(b, n_keys + 1, dtype=torch.long).scatter_add_(1, key, torch.ones_like(key))  # (B, keys+1)
    votes = {}
    for name in ("size", "position", "fill"):
        c = len(PIXEL_HEADS[name])
        v = torch.zeros(b, (n_keys + 1) * c, dtype=torch.long)
        v.scatter_add_(1, key * c + pred[name].view(b, -1), torch.ones_like(key))
        votes[name] = v.view(b, n_keys + 1, c).argmax(-1)  # (B, keys+1): the majority per group
    out = []
    for i in range(b):
        objs = []
        found = (counts[i, :n_keys] >= min_pixels).nonzero().squeeze(1)
        for k in sorted(found.tolist(), key=lambda k: -int(counts[i, k])):
            objs.append({"shape": SHAPES[k // len(COLOURS)], "colour": COLOURS[k % len(COLOURS)],
                         "size": SIZES[int(votes["size"][i, k])], "position": POSITIONS[int(votes["position"][i, k])],
                         "fill": FILLS[int(votes["fill"][i, k])],
                         "pixels": (key[i] == k).view(HEAD_SIDE, HEAD_SIDE)})
        out.append(objs)
    return out


# --- Training targets and loss. ---------------------------------------------------------------------------

def slot_labels(masks: torch.Tensor) -> torch.Tensor:
    """Which object slot each head pixel shows: (N, K, 64, 64) visible masks -> (N, 32, 32) long, 0 for the
    background and k + 1 for slot k, by majority over each 2 x 2 block (a tie goes to the background)."""
    n, k = masks.shape[:2]
    s = IMAGE_SIZE // HEAD_SIDE
    counts = masks.view(n, k, HEAD_SIDE, s, HEAD_SIDE, s).sum((3, 5))  # (N, K, 32, 32): visible pixels per block
    background = s * s - counts.sum(1, keepdim=True)  # (N, 1, 32, 32)
    return torch.cat([background, counts], 1).argmax(1)  # (N, 32, 32)


def targets(scenes: Scenes, idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-pixel training targets of the scenes at ``idx`` (default: all), from their visible masks and
    attributes: object float (n, 32, 32); each head's class long (n, 32, 32), -1 on the background;
    background long (n,)."""
    idx = torch.arange(len(scenes)) if idx is None else torch.as_tensor(idx)
    labels = slot_labels(scenes.masks[idx])  # (n, 32, 32)
    t = {"object": (labels > 0).float(), "background": scenes.background[idx]}
    flat = labels.view(labels.shape[0], -1)  # (n, 1024)
    for name in PIXEL_HEADS:
        table = torch.cat([torch.full((labels.shape[0], 1), -1), getattr(scenes, name)[idx]], 1)  # (n, 1 + K)
        t[name] = torch.gather(table, 1, flat).view_as(labels)
    return t


def loss_fn(logits: dict, tgt: dict) -> torch.Tensor:
    """Object BCE per pixel + background CE + each attribute head's CE over object pixels (ignore_index=-1)."""
    loss = F.binary_cross_entropy_with_logits(logits["object"], tgt["object"])
    loss = loss + F.cross_entropy(logits["background"], tgt["background"])
    for name in PIXEL_HEADS:
        loss = loss + F.cross_entropy(logits[name], tgt[name], ignore_index=-1)
    return loss


# --- How well it reads: against the truth, or against itself on other images. ------------------------------

def visible_fraction(scenes: Scenes) -> torch.Tensor:
    """(N, K): the visible fraction of each object's own (unoccluded) shape; 0 for an empty slot."""
    n, k = scenes.shape.shape
    filled = scenes.shape.view(-1) >= 0
    full = torch.zeros(n * k, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    if filled.any():
        full[filled] = shape_masks(scenes.shape.view(-1)[filled], scenes.centre.view(-1, 2)[filled],
                                   scenes.radius.view(-1)[filled], scenes.rotation.view(-1)[filled])
    area = full.view(n, k, -1).sum(-1).float()
    return scenes.masks.view(n, k, -1).sum(-1).float() / area.clamp(min=1)


def _compare(reference: list[list[dict]], found: list[list[dict]], ref_bg, found_bg) -> dict:
    """Per attribute, how often ``found`` reads what ``reference`` says, object by object.

    Each reference object (a dict of attributes and ``pixels``) is paired with the found object that
    covers most of its pixels; ``found`` = it has one; an attribute is right when the pair agrees on it
    (a missed object counts as wrong for every attribute). ``extra``: found objects paired with no
    reference object, per image. ``scene``: every object found and right, no extra, background right.
    """
    right = {name: 0 for name in ("found",) + OBJECT_ATTRIBUTES}
    total = extra = scenes_ok = 0
    for refs, objs, rb, fb in zip(reference, found, ref_bg, found_bg):
        used, ok = set(), rb == fb
        for ref in refs:
            if ref.get("counted", True) is False:
                continue
            total += 1
            overlap = [int((o["pixels"] & ref["pixels"]).sum()) for o in objs]
            j = max(range(len(objs)), key=lambda q: overlap[q]) if objs and max(overlap) > 0 else None
            if j is None:
                ok = False
                continue
            used.add(j)
            right["found"] += 1
            for name in OBJECT_ATTRIBUTES:
                same = objs[j][name] == ref[name]
                right[name] += same
                ok &= same
        # An object found where the reference has none (or only an uncounted, mostly hidden one) is extra.
        hidden = [r["pixels"] for r in refs if r.get("counted", True) is False]
        for j, o in enumerate(objs):
            if j not in used and not any(bool((o["pixels"] & h).any()) for h in hidden):
                extra += 1
                ok = False
        scenes_ok += ok
    n = len(reference)
    out = {name: (r / total if total else float("nan")) for name, r in right.items()}
    out["background"] = sum(int(a == b) for a, b in zip(ref_bg, found_bg)) / max(n, 1)
    out["extra_per_image"] = extra / max(n, 1)
    out["scene"] = scenes_ok / max(n, 1)
    out["n_objects"] = total
    return out


def true_objects(scenes: Scenes, min_visible: float = MIN_VISIBLE) -> list[list[dict]]:
    """The objects of each scene as ``_compare`` wants them: attributes as words, ``pixels`` (the head
    grid's label map) and ``counted`` (False when less than ``min_visible`` of the object shows)."""
    labels = slot_labels(scenes.masks)  # (N, 32, 32)
    vis = visible_fraction(scenes)
    out = []
    for i in range(len(scenes)):
        objs = scenes.attributes(i)["objects"]
        out.append([dict(o, pixels=labels[i] == k + 1, counted=bool(vis[i, k] >= min_visible))
                    for k, o in enumerate(objs)])
    return out


@torch.no_grad()
def attribute_accuracy(evaluator: Evaluator, images: torch.Tensor, scenes: Scenes,
                       min_visible: float = MIN_VISIBLE) -> dict[str, float]:
    """Instance-level accuracy against the true attributes of ``scenes`` (``images`` are theirs, or
    something made from them, such as VAE reconstructions).

    Objects with less than ``min_visible`` of their own shape visible are left out. ``found``: the
    fraction of the other objects the evaluator finds; ``shape`` ... ``fill``: the fraction read right (a
    missed object is wrong); ``background`` per image; ``extra_per_image``: objects read where there is
    none; ``scene``: the fraction of images read entirely right.
    """
    pred = evaluator.predict(images)
    truth = true_objects(scenes, min_visible)
    return _compare(truth, group_objects(pred), scenes.background.tolist(), pred["background"].tolist())


@torch.no_grad()
def agreement(evaluator: Evaluator, images_a: torch.Tensor, images_b: torch.Tensor) -> dict[str, float]:
    """How often the evaluator reads the same objects from two sets of images (e.g. originals and their
    VAE reconstructions): ``images_a``'s reading is the reference; same keys as ``attribute_accuracy``."""
    pa, pb = evaluator.predict(images_a), evaluator.predict(images_b)
    return _compare(group_objects(pa), group_objects(pb), pa["background"].tolist(), pb["background"].tolist())


def load_evaluator(weights_dir: str | Path | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> Evaluator:
    """The course's trained evaluator (``weights/evaluator.*``; safetensors, nothing unpickled).

    The same arguments, in the same order, as ``weights.load_vae`` and the other loaders:
    ``load_evaluator(device=device)`` in the lessons.
    """
    return load_model("evaluator", EvaluatorConfig, Evaluator, weights_dir, device, dtype)


# --- Prompt adherence. ----------------------------------------------------------------------------------

def parse_captions(captions) -> list[dict]:
    """``data.parse_prompt`` of every caption; a caption it cannot read raises a ValueError naming it."""
    if isinstance(captions, str) or not isinstance(captions, (list, tuple)):
        raise ValueError(f"captions must be a list of strings (one per image), got {type(captions).__name__}")
    out = []
    for i, text in enumerate(captions):
        try:
            out.append(parse_prompt(text))
        except (ValueError, TypeError) as err:
            raise ValueError(f"caption {i} ({text!r}) cannot be scored: {err}") from err
    return out


def match_prompt(wanted: list[dict], objects: list[dict]) -> tuple[list[int | None], int]:
    """Pair each prompt object with a distinct read object so that as many named attributes as possible
    agree. Returns (for each prompt object, the index of its read object or None; the number of named
    attributes that agree). Ties go to the larger read objects (``objects`` come largest first)."""
    slots = list(range(len(objects))) + [None] * len(wanted)
    best, best_score = [None] * len(wanted), -1
    for pick in itertools.permutations(slots, len(wanted)):
        score = sum(objects[p].get(name) == value for w, p in zip(wanted, pick) if p is not None
                    for name, value in w.items())
        if score > best_score:
            best, best_score = list(pick), score
    return best, best_score


@torch.no_grad()
def prompt_adherence(images: torch.Tensor, captions: list[str], evaluator: Evaluator) -> dict:
    """Score ``images`` (B, 3, 64, 64) in [-1, 1] against the ``captions`` they were generated from.

    ``evaluator``: ``load_evaluator()``; the images are moved to its device and dtype. Each caption is read
    with ``data.parse_prompt`` (a caption it cannot read raises a ValueError). An image is **confirmed**
    when every object of its caption is matched to a distinct object in the image that has every attribute
    the caption names (unsaid attributes are free), and the background matches when the caption names one.

    Returns a dict:
      ``adherence``: the fraction of confirmed images;
      ``per_attribute``: for shape, colour, size, position, fill, background, the fraction of the times the
      caption names it that the best-matching object (``match_prompt``) has it;
      ``binding``: for captions of two or more objects, ``bound`` (every object right with its own
      attributes, the background aside) beside ``present`` (each named attribute value read on *some*
      object): the gap is attributes drawn on the wrong object; ``n`` such captions;
      ``extra_objects``: the fraction of images with more objects than the caption names;
      ``confirmed``: the per-image booleans (list); ``n``: the number of images.
    """
    if not isinstance(evaluator, Evaluator):
        raise ValueError(f"prompt_adherence(images, captions, evaluator) needs the Evaluator third "
                         f"(load_evaluator() gives it), got {type(evaluator).__name__}")
    wanted_all = parse_captions(captions)
    if not isinstance(images, torch.Tensor) or images.shape[0] != len(captions):
        raise ValueError(f"got {getattr(images, 'shape', [None])[0]} images but {len(captions)} captions")
    pred = evaluator.predict(images)
    read = group_objects(pred)
    counts = {k: [0, 0] for k in OBJECT_ATTRIBUTES + ("background",)}  # [right, named]
    confirmed, extra, bound, present, n_multi = [], 0, 0, 0, 0
    for b, want in enumerate(wanted_all):
        objs, wanted = read[b], want["objects"]
        pick, _ = match_prompt(wanted, objs)
        ok = True
        for w, p in zip(wanted, pick):
            for name, value in w.items():
                right = p is not None and objs[p][name] == value
                counts[name][0] += right
                counts[name][1] += 1
                ok &= right
        all_objects = ok
        if want["background"] is not None:
            right = BACKGROUNDS[int(pred["background"][b])] == want["background"]
            counts["background"][0] += right
            counts["background"][1] += 1
            ok &= right
        if len(wanted) >= 2:
            n_multi += 1
            bound += all_objects
            present += all(any(o[name] == value for o in objs) for w in wanted for name, value in w.items())
        extra += len(objs) > len(wanted)
        confirmed.append(bool(ok))
    n = len(captions)
    return {
        "adherence": sum(confirmed) / max(n, 1),
        "per_attribute": {k: (r / t if t else float("nan")) for k, (r, t) in counts.items()},
        "binding": {"bound": bound / n_multi if n_multi else float("nan"),
                    "present": present / n_multi if n_multi else float("nan"), "n": n_multi},
        "extra_objects": extra / max(n, 1),
        "confirmed": confirmed,
        "n": n,
    }


def entropy_bits(values: list, n_classes: int) -> tuple[float, float]:
    """The entropy (bits) of the empirical distribution of ``values``, and the same divided by
    log2(``n_classes``), its largest possible value (1.0: spread evenly over every class)."""
    if not values:
        return float("nan"), float("nan")
    counts = torch.tensor([values.count(v) for v in set(values)], dtype=torch.float64)
    p = counts / counts.sum()
    h = float(-(p * p.log2()).sum())
    return h, h / math.log2(n_classes)

