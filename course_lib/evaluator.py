"""The evaluator: a small network that turns "does the image obey its prompt?" into a number.

Lesson 4 (classifier-free guidance), lesson 5 (samplers), lesson 6 (ControlNet) and the benchmarks use
it to *measure* what guidance scale, step count, sampler and control do, instead of asking the learner to
squint at pictures. Its pooled features are also what ``course_lib.fid`` computes FID and KID on.

**How it reads a scene: two stages**, as two-stage detectors do (find regions, then read each region
from a crop: Girshick et al. 2014, "R-CNN"; He et al. 2017, "Mask R-CNN", which also reads each object
with its mask). The world's scenes hold one to three objects anywhere (continuous position, size,
rotation), often overlapping, so a classifier with one output slot per place cannot describe them.

1. **Stage 1 finds the objects and their colours.** A small encoder-decoder (U-Net-like, Ronneberger et
   al. 2015) labels every cell of a 32 x 32 grid (each cell covers 2 x 2 image pixels): is it part of an
   object, and of which colour; pooled features give the background. Colour is a local property, which
   a pixel labeller reads well. ``group_objects`` groups the object cells by colour and 8-connectivity
   (``scipy.ndimage.label``); each group of at least ``MIN_PIXELS`` cells is a candidate object.
2. **Stage 2 reads each object from a crop** (``CropReader``): a 32 x 32 crop of the image centred on
   the group's centroid, with a fourth channel holding the group's mask (which object is meant when
   objects overlap). It predicts the shape, size class and fill, and the offset from the crop centre to
   the object's true centre: the position is the 3 x 3 grid cell of that centre, so a half-hidden object
   (whose visible centroid is off) keeps its position. Shape is a property of the outline, which only a
   view of the whole object shows; a pixel's label cannot.

Two objects of one scene never share both shape and colour (``data.sample_attributes`` makes sure of
it), so groups read as the same (shape, colour) are one object (split in two by an object in front of
it) and are merged.

**Prompt adherence.** ``prompt_adherence`` reads each caption with ``data.parse_prompt`` (the one prompt
parser) and confirms an image when every object of the prompt matches a distinct object in the image
with every attribute the prompt *names* (an unsaid attribute may be anything, as in Stable Diffusion,
where "a red circle" fits countless images), and the background matches when the prompt names one.

**How good a judge it is.** ``attribute_accuracy`` on held-out real scenes (every concept, reserved ones
included): the model card records it, and tests/test_evaluator.py holds it to >= 97% per attribute.
An object that is mostly hidden (less than ``MIN_VISIBLE`` = 30% of its own shape visible) is left out
of those accuracies: a person could not name its shape either.

Outputs::

    stage 1, per image (logits)     object (32, 32); colour (9, 32, 32) over COLOURS; background (3,)
    stage 2, per crop (B, 4, 32, 32) -> shape (8,), size (3,), fill (2,) logits; offset (2,) (x, y) in
                                        units of OFFSET_SCALE pixels
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from .data import (BACKGROUNDS, CELL, COLOURS, FILLS, GRID, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, Scenes,
                   parse_prompt, shape_masks)
from .weights import load_model

HEAD_SIDE = 32  # stage 1 labels a 32 x 32 grid: each cell is 2 x 2 image pixels
CELL_PIXELS = IMAGE_SIZE // HEAD_SIDE
PIXEL_HEADS = {"colour": COLOURS}  # stage 1's per-cell class heads (besides object-or-not)
CROP_HEADS = {"shape": SHAPES, "size": SIZES, "fill": FILLS}  # stage 2's class heads (besides the offset)
OBJECT_ATTRIBUTES = ("shape", "colour", "size", "position", "fill")  # in the order of Scenes.attributes
CROP = 32  # side of stage 2's crops, in image pixels
OFFSET_SCALE = 8.0  # stage 2 regresses the centre offset in units of this many pixels
OBJECT_THRESHOLD = -1.0  # a cell is an object's when its object logit exceeds this (p > 0.27): thin rings and
# small moons otherwise lose cells to the background (chosen on training-split scenes: found 97.8% -> 99.8%)
MIN_PIXELS = 4  # a group of at least this many grid cells (2 x 2 image pixels each) is an object
MIN_VISIBLE = 0.3  # accuracy leaves out objects with less than this fraction of their own shape visible
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity for ndimage.label


@dataclass
class EvaluatorConfig:
    channels: tuple = (16, 32, 64)  # stage 1 encoder widths at 32x32, 16x16, 8x8 (each stage halves the side)
    hidden: int = 16  # stage 1 decoder width (16x16 and 32x32): what the per-cell heads read
    crop_channels: tuple = (32, 48, 96, 128)  # stage 2 widths at 32, 16, 8 and 4 pixels (crops of 32 x 32)
    crop_hidden: int = 128  # stage 2's fully connected width (its pooled crop features)

    def __post_init__(self):
        self.channels, self.crop_channels = tuple(self.channels), tuple(self.crop_channels)
        if len(self.channels) != 3:
            raise ValueError(f"channels must hold 3 widths (for 32, 16 and 8 pixels), got {self.channels}")
        if len(self.crop_channels) != 4:
            raise ValueError(f"crop_channels must hold 4 widths (for 32, 16, 8 and 4 pixels), got {self.crop_channels}")
        if min(self.hidden, self.crop_hidden, *self.channels, *self.crop_channels) < 1:
            raise ValueError(f"widths must be positive, got {self}")


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class CropReader(nn.Module):
    """Stage 2: crops (B, 4, 32, 32) (RGB in [-1, 1] and the object's mask in {0, 1}) -> a dict of
    shape, size, fill logits and the centre offset (B, 2).

    A 3x3 conv at 32 x 32, then three stride-2 stages to 4 x 4 (BatchNorm, ReLU), flattened (the 4 x 4
    layout is kept: it says where the object lies in the crop), one hidden fully connected layer, and the
    heads. The offset is the object's true centre minus the crop centre, in units of ``OFFSET_SCALE`` pixels.
    """

    def __init__(self, config: EvaluatorConfig):
        super().__init__()
        c32, c16, c8, c4 = config.crop_channels
        self.convs = nn.Sequential(_conv(4, c32), _conv(c32, c16, 2), _conv(c16, c8, 2), _conv(c8, c4, 2))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c4 * 16, config.crop_hidden), nn.ReLU())
        self.n_out = sum(len(v) for v in CROP_HEADS.values()) + 2
        self.head = nn.Linear(config.crop_hidden, self.n_out)

    def features(self, crops: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(crops))  # (B, crop_hidden)

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        if crops.dim() != 4 or tuple(crops.shape[1:]) != (4, CROP, CROP):
            raise ValueError(f"stage 2 reads (B, 4, {CROP}, {CROP}) crops (RGB and mask), got {tuple(crops.shape)}")
        out = self.head(self.features(crops))  # (B, n_out)
        logits, i = {}, 0
        for name, vocab in CROP_HEADS.items():
            logits[name] = out[:, i:i + len(vocab)]
            i += len(vocab)
        logits["offset"] = out[:, i:i + 2]  # (B, 2): x, y
        return logits


class Evaluator(nn.Module):
    """Both stages in one module (one safetensors file, one card).

    ``forward(images)``: stage 1 on images (B, 3, 64, 64) in [-1, 1] -> logits object (B, 32, 32), colour
    (B, 9, 32, 32), background (B, 3). ``reader(crops)``: stage 2 (``CropReader``). ``predict`` runs both.

    Stage 1: encoder 64 -> 32 -> 16 -> 8 (two 3x3 convs per stage, BatchNorm, ReLU); the input carries two
    extra channels, the pixel's x and y in [-1, 1] (CoordConv, Liu et al. 2018). Decoder 8 -> 16 -> 32:
    upsample, add the encoder's features of that side (a skip connection through a 1x1 conv, as in a
    feature pyramid), one 3x3 conv. The per-cell heads are 1x1 convs; the background reads the pooled bottleneck.
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
        self.reader = CropReader(cfg)

    def _check(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"the evaluator reads (B, 3, 64, 64) images in [-1, 1], got {tuple(getattr(images, 'shape', ()))}")

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
        """Stage 1's pooled bottleneck features (B, D), D = ``config.channels[-1]``: the average over the
        8 x 8 map.

        What ``course_lib.fid`` computes FID and KID on, as Inception-v3's pooled features are for
        photographs (Heusel et al. 2017). Stage 1 only: a smooth function of the whole image, defined for
        any image (also one where no object is found). Always in eval mode, float32, on the CPU.
        """
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        parts = [self._encode(images[s:s + batch_size].to(p.device, p.dtype))[2].mean((2, 3)).float().cpu()
                 for s in range(0, images.shape[0], batch_size)]
        self.train(was_training)
        return torch.cat(parts)  # (B, D)

    @torch.no_grad()
    def predict_pixels(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Stage 1's hard predictions on the CPU: object bool (B, 32, 32) (logit > ``OBJECT_THRESHOLD``),
        colour long (B, 32, 32), background long (B,). Images are moved to the evaluator's device and dtype."""
        self._check(images)
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        parts = []
        for s in range(0, images.shape[0], batch_size):
            lg = self(images[s:s + batch_size].to(p.device, p.dtype))
            parts.append({"object": (lg["object"] > OBJECT_THRESHOLD).cpu(),
                          "background": lg["background"].argmax(-1).cpu(),
                          **{n: lg[n].argmax(1).cpu() for n in PIXEL_HEADS}})
        self.train(was_training)
        return {k: torch.cat([q[k] for q in parts]) for k in parts[0]}

    @torch.no_grad()
    def read_groups(self, images: torch.Tensor, groups: list[list[dict]], batch_size: int = 512) -> list[list[dict]]:
        """Stage 2: each group of ``group_objects`` read from its crop. Returns the same nesting, each group
        with shape, size, fill, position and ``centre`` (x, y in image pixels) added."""
        flat = [(b, g) for b, gs in enumerate(groups) for g in gs]
        out = [[] for _ in groups]
        if not flat:
            return out
        was_training = self.reader.training
        self.reader.eval()
        p = next(self.parameters())
        masks = torch.stack([g["pixels"] for _, g in flat])  # (M, 32, 32)
        rows = torch.tensor([b for b, _ in flat])
        centre = mask_centroids(masks)  # (M, 2)
        origin = centre.round().long()
        for s in range(0, len(flat), batch_size):
            sl = slice(s, s + batch_size)
            crops = make_crops(images[rows[sl]].float(), upsample_masks(masks[sl]), origin[sl])
            lg = self.reader(crops.to(p.device, p.dtype))
            found = {n: lg[n].argmax(-1).cpu() for n in CROP_HEADS}
            xy = origin[sl].float() + lg["offset"].float().cpu() * OFFSET_SCALE  # (m, 2): the object's centre
            cell = (xy / CELL).floor().long().clamp(0, GRID - 1)
            for j in range(xy.shape[0]):
                b, g = flat[s + j]
                out[b].append({**g, **{n: CROP_HEADS[n][int(found[n][j])] for n in CROP_HEADS},
                               "position": POSITIONS[int(cell[j, 1] * GRID + cell[j, 0])],
                               "centre": tuple(xy[j].tolist())})
        self.reader.train(was_training)
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256, min_pixels: int = MIN_PIXELS) -> dict:
        """Both stages: stage 1's maps (``predict_pixels``) and ``objects``: per image, a list of dicts with
        the five attributes as words, ``pixels`` (bool (32, 32)) and ``centre``, largest first."""
        pred = self.predict_pixels(images, batch_size)
        pred["objects"] = merge_same_objects(self.read_groups(images, group_objects(pred, min_pixels)))
        return pred

    def read_attributes(self, images: torch.Tensor, min_pixels: int = MIN_PIXELS) -> list[dict]:
        """What the evaluator sees, in the format of ``Scenes.attributes``: one dict per image,
        {"objects": [{"shape", "colour", "size", "position", "fill"}, ...] (largest first), "background"}."""
        pred = self.predict(images, min_pixels=min_pixels)
        return [{"objects": [{k: o[k] for k in OBJECT_ATTRIBUTES} for o in objs],
                 "background": BACKGROUNDS[int(pred["background"][b])]}
                for b, objs in enumerate(pred["objects"])]


# --- From stage 1's cells to groups, and from groups to crops. --------------------------------------------

def group_objects(pred: dict, min_pixels: int = MIN_PIXELS) -> list[list[dict]]:
    """Stage 1's candidate objects: per image, a list of {"colour": word, "pixels": bool (32, 32)},
    largest first.

    The object cells of each colour are split into 8-connected groups (``scipy.ndimage.label``); a group
    of at least ``min_pixels`` cells is a candidate. Two touching objects of one colour form one group.
    """
    obj = pred["object"].numpy().astype(bool)
    colour = pred["colour"].numpy()
    out = []
    for i in range(obj.shape[0]):
        groups = []
        for c in np.unique(colour[i][obj[i]]):
            labels, n = ndimage.label(obj[i] & (colour[i] == c), structure=_EIGHT)
            sizes = np.bincount(labels.ravel(), minlength=n + 1)
            for lab in range(1, n + 1):
                if sizes[lab] >= min_pixels:
                    groups.append({"colour": COLOURS[int(c)], "pixels": torch.from_numpy(labels == lab)})
        groups.sort(key=lambda g: -int(g["pixels"].sum()))
        out.append(groups)
    return out


def merge_same_objects(objects: list[list[dict]]) -> list[list[dict]]:
    """Per image, objects read as the same (shape, colour) become one (their pixels joined, the larger
    one's reading kept): no scene holds two such objects, so they are one object split by another in front."""
    out = []
    for objs in objects:
        kept: dict[tuple, dict] = {}
        for o in sorted(objs, key=lambda o: -int(o["pixels"].sum())):
            key = (o["shape"], o["colour"])
            if key in kept:
                kept[key]["pixels"] = kept[key]["pixels"] | o["pixels"]
            else:
                kept[key] = dict(o)
        out.append(sorted(kept.values(), key=lambda o: -int(o["pixels"].sum())))
    return out


def upsample_masks(masks: torch.Tensor) -> torch.Tensor:
    """(M, 32, 32) grid-cell masks -> (M, 64, 64) image-pixel masks (each cell covers 2 x 2 pixels)."""
    return masks.repeat_interleave(CELL_PIXELS, 1).repeat_interleave(CELL_PIXELS, 2)


def mask_centroids(masks: torch.Tensor) -> torch.Tensor:
    """(M, 32, 32) grid-cell masks -> (M, 2) centroids (x, y) in image pixels (cell j spans pixels 2j, 2j + 1,
    so its centre is at 2j + 1). An empty mask gives the image centre."""
    m = masks.float()
    centres = torch.arange(HEAD_SIDE, dtype=torch.float32) * CELL_PIXELS + CELL_PIXELS / 2  # (32,)
    area = m.sum((1, 2))
    x = (m.sum(1) * centres).sum(1) / area.clamp(min=1)
    y = (m.sum(2) * centres).sum(1) / area.clamp(min=1)
    xy = torch.stack([x, y], 1)  # (M, 2)
    return torch.where(area[:, None] > 0, xy, torch.full_like(xy, IMAGE_SIZE / 2))


def make_crops(images: torch.Tensor, masks: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """Stage 2's input: ``images`` (M, 3, 64, 64) in [-1, 1], ``masks`` (M, 64, 64) bool, ``origin`` (M, 2)
    long, the crop centre (x, y) in image pixels -> (M, 4, 32, 32): image pixels origin - 16 ... origin + 15
    on each axis (the image padded by replicating its border; the mask padded with 0), and the mask."""
    half = CROP // 2
    x = torch.cat([images, masks[:, None].to(images.dtype)], 1)  # (M, 4, 64, 64)
    rgb = F.pad(x[:, :3], (half, half, half, half), mode="replicate")  # (M, 3, 96, 96)
    msk = F.pad(x[:, 3:], (half, half, half, half))  # (M, 1, 96, 96)
    padded = torch.cat([rgb, msk], 1)
    o = origin.long().clamp(0, IMAGE_SIZE)
    r = torch.arange(CROP)
    rows = (o[:, 1:2] + r)[:, :, None]  # (M, 32, 1): padded row = image row + 16
    cols = (o[:, 0:1] + r)[:, None, :]  # (M, 1, 32)
    m = torch.arange(x.shape[0])[:, None, None]
    return padded.permute(0, 2, 3, 1)[m, rows, cols].permute(0, 3, 1, 2).contiguous()  # (M, 4, 32, 32)


# --- Training targets and losses. -------------------------------------------------------------------------

def slot_labels(masks: torch.Tensor) -> torch.Tensor:
    """Which object slot each grid cell shows: (N, K, 64, 64) visible masks -> (N, 32, 32) long, 0 for the
    background and k + 1 for slot k, by majority over each 2 x 2 block (a tie goes to the background)."""
    n, k = masks.shape[:2]
    s = CELL_PIXELS
    counts = masks.view(n, k, HEAD_SIDE, s, HEAD_SIDE, s).sum((3, 5))  # (N, K, 32, 32): visible pixels per block
    background = s * s - counts.sum(1, keepdim=True)  # (N, 1, 32, 32)
    return torch.cat([background, counts], 1).argmax(1)  # (N, 32, 32)


def targets(scenes: Scenes, idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Stage 1's per-cell training targets of the scenes at ``idx`` (default: all), from their visible masks:
    object float (n, 32, 32); colour long (n, 32, 32), -1 on the background; background long (n,)."""
    idx = torch.arange(len(scenes)) if idx is None else torch.as_tensor(idx)
    labels = slot_labels(scenes.masks[idx])  # (n, 32, 32)
    t = {"object": (labels > 0).float(), "background": scenes.background[idx]}
    flat = labels.view(labels.shape[0], -1)  # (n, 1024)
    for name in PIXEL_HEADS:
        table = torch.cat([torch.full((labels.shape[0], 1), -1), getattr(scenes, name)[idx]], 1)  # (n, 1 + K)
        t[name] = torch.gather(table, 1, flat).view_as(labels)
    return t


def loss_fn(logits: dict, tgt: dict) -> torch.Tensor:
    """Stage 1: object BCE per cell + background CE + colour CE over object cells (ignore_index=-1)."""
    loss = F.binary_cross_entropy_with_logits(logits["object"], tgt["object"])
    loss = loss + F.cross_entropy(logits["background"], tgt["background"])
    for name in PIXEL_HEADS:
        loss = loss + F.cross_entropy(logits[name], tgt[name], ignore_index=-1)
    return loss


def readable_objects(scenes: Scenes, min_visible: float = MIN_VISIBLE, min_pixels: int = MIN_PIXELS,
                     chunk: int = 4096) -> torch.Tensor:
    """(M, 2) long (scene, slot) of every object stage 2 trains on: at least ``min_visible`` of its shape
    shows and it covers at least ``min_pixels`` grid cells."""
    out = []
    for s in range(0, len(scenes), chunk):
        part = scenes.select(slice(s, s + chunk))
        cells = torch.stack([(slot_labels(part.masks) == k + 1).sum((1, 2)) for k in range(part.shape.shape[1])], 1)
        ok = (visible_fraction(part) >= min_visible) & (cells >= min_pixels)  # (n, K)
        rows = ok.nonzero()
        out.append(torch.stack([rows[:, 0] + s, rows[:, 1]], 1))
    return torch.cat(out)


def crop_targets(scenes: Scenes, objects: torch.Tensor, images: torch.Tensor, generator: torch.Generator,
                 jitter: float = 2.0, degrade: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage 2's training batch for ``objects`` (B, 2) (scene, slot) rows of ``readable_objects``:
    ``images`` (B, 3, 64, 64) are those scenes' images (augmented as stage 1's are). Returns crops
    (B, 4, 32, 32) and targets shape, size, fill long (B,), offset float (B, 2).

    The mask is the object's grid cells (as stage 1 groups them), dilated or eroded by one cell at random
    (``degrade``), as stage 1's groups are; the crop is centred on its centroid moved by up to ``jitter``
    pixels. The offset target is the true centre minus the crop centre, in units of ``OFFSET_SCALE``.
    """
    scene, slot = objects[:, 0], objects[:, 1]
    b = scene.shape[0]
    masks = slot_labels(scenes.masks[scene]) == (slot + 1)[:, None, None]  # (B, 32, 32)
    if degrade:
        m = masks[:, None].float()
        dilated = F.max_pool2d(m, 3, 1, 1)[:, 0] > 0
        eroded = -F.max_pool2d(-m, 3, 1, 1)[:, 0] > 0
        how = torch.randint(3, (b,), generator=generator)[:, None, None]  # 0 as is, 1 dilated, 2 eroded
        eroded = torch.where(eroded.flatten(1).any(1)[:, None, None], eroded, masks)  # never erode to nothing
        masks = torch.where(how == 1, dilated, torch.where(how == 2, eroded, masks))
    centre = mask_centroids(masks) + (torch.rand(b, 2, generator=generator) * 2 - 1) * jitter
    origin = centre.round().long().clamp(0, IMAGE_SIZE)
    crops = make_crops(images, upsample_masks(masks), origin)
    tgt = {name: getattr(scenes, name)[scene, slot] for name in CROP_HEADS}
    tgt["offset"] = (scenes.centre[scene, slot] - origin.float()) / OFFSET_SCALE  # (B, 2)
    return crops, tgt


def crop_loss_fn(logits: dict, tgt: dict) -> torch.Tensor:
    """Stage 2: CE of shape, size and fill + smooth L1 of the centre offset (Huber, as box regression in
    Fast R-CNN, Girshick 2015)."""
    loss = F.smooth_l1_loss(logits["offset"], tgt["offset"])
    for name in CROP_HEADS:
        loss = loss + F.cross_entropy(logits[name], tgt[name])
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
    return _compare(truth, pred["objects"], scenes.background.tolist(), pred["background"].tolist())


@torch.no_grad()
def agreement(evaluator: Evaluator, images_a: torch.Tensor, images_b: torch.Tensor) -> dict[str, float]:
    """How often the evaluator reads the same objects from two sets of images (e.g. originals and their
    VAE reconstructions): ``images_a``'s reading is the reference; same keys as ``attribute_accuracy``."""
    pa, pb = evaluator.predict(images_a), evaluator.predict(images_b)
    return _compare(pa["objects"], pb["objects"], pa["background"].tolist(), pb["background"].tolist())


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
    read = pred["objects"]
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

