"""The course's procedural world: captioned 64x64 scenes of one to three coloured shapes.

Lesson 0 tours it; every model in the course is trained on it. No download is needed: scenes are
drawn from a seed, all at once with tensor operations, so 50,000 of them take seconds on a CPU.

It is built to be a faithful miniature of the data Stable Diffusion learned from, in the ways that
matter for the lessons:

- **A caption is a distribution, not an image.** Position and size are continuous (a caption names
  only a coarse region of a 3 x 3 grid and a size class), shapes are rotated, each colour word covers
  a range of shades, objects may be striped, backgrounds vary in brightness and gradient, and one to
  three objects may overlap. "A red circle" fits countless images.
- **Captions leave things out**, as real alt text does: colour, size, position, fill and background
  are each named only some of the time, in varied word order, with the words people use (synonyms for
  sizes and positions, British and American spellings, capitals, punctuation).
- **Some concepts are never seen in training.** Two shapes (``heart``, ``moon``) and one colour
  (``brown``) appear only when asked for with ``concepts="all"``: the lesson that teaches the model a
  new concept uses them. The evaluator is trained on every concept, so it can still recognise them.
- **Everything is recorded**: attributes, object masks (the visible pixels of each object), edge
  maps (for ControlNet), and which attributes the caption mentions.

Notation used below::

    N         number of scenes
    K = 3     object slots per scene (an empty slot holds -1)
    H = W = 64
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch.utils.data import Dataset

# --- The vocabulary. An attribute is stored as its index in these tuples. ---------------------------------
SHAPES = ("circle", "square", "triangle", "ring", "star", "cross", "heart", "moon")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "brown")
SIZES = ("small", "medium", "large")
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
FILLS = ("plain", "striped")
BACKGROUNDS = ("white", "grey", "black")
ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS, "fill": FILLS}

# Concepts kept out of the training split: the "new concepts" of the personalisation lesson.
RESERVED_SHAPES = ("heart", "moon")
RESERVED_COLOURS = ("brown",)
TRAIN_SHAPES = tuple(s for s in SHAPES if s not in RESERVED_SHAPES)
TRAIN_COLOURS = tuple(c for c in COLOURS if c not in RESERVED_COLOURS)

COLOUR_RGB = {  # the centre of each colour name; each object varies around it (SHADE_*)
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (235, 210, 35), "green": (40, 165, 60),
    "cyan": (40, 200, 215), "blue": (45, 75, 215), "purple": (135, 50, 170), "pink": (245, 135, 190),
    "brown": (125, 75, 35),
}
BACKGROUND_RGB = {"white": (238, 238, 236), "grey": (128, 128, 130), "black": (28, 28, 32)}

IMAGE_SIZE = 64
MAX_OBJECTS = 3
OBJECT_COUNT_PROBS = (0.6, 0.28, 0.12)  # one, two, three objects
GRID = 3  # positions are the cells of a 3 x 3 grid
CELL = IMAGE_SIZE / GRID
# Radius (half-extent, pixels) of each size class: gaps of 1.8 px between classes keep the words
# unambiguous to the eye, to the evaluator and to the U-Net (with gaps of 1.2 px the U-Net drew the right size class
# only about two times in three).
SIZE_RANGES = {"small": (6.5, 7.6), "medium": (9.4, 10.6), "large": (12.4, 14.0)}
CELL_MARGIN = 2.0  # a centre lies at least this far inside its grid cell ...
EDGE_MARGIN = 7.0  # ... and this far from the image border
MAX_ROTATION = math.radians(30)  # shapes turn by up to +-30 degrees (a square never becomes a diamond)
SHADE_BRIGHTNESS = (0.85, 1.1)  # each object's colour: base x brightness ...
SHADE_CHANNEL = 14  # ... + a per-channel offset of up to this much (uint8 units)
STRIPE_PERIOD = 6.0  # pixels; striped objects alternate their colour and a darker shade of it
STRIPE_DARK = 0.55
BACKGROUND_BRIGHTNESS = 14  # +- uint8 units per scene
BACKGROUND_GRADIENT = 18  # up to this much brighter on one side than the other

Split = Literal["train", "heldout"]
Concepts = Literal["train", "all"]
_SPLIT_STREAM = {"train": 0, "heldout": 1}

# --- The words captions use, and the words each attribute value can be written with. --------------------
SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("medium", "medium-sized", "mid-sized"),
              "large": ("large", "big", "huge")}
_V = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}
_CORNER_FORMS = ("{v} {h}", "{v}-{h}", "{v} {h} corner")
POSITION_WORDS = {  # bare forms ("top left"); phrases add "in the" / "at the" / "on the"
    **{f"{v} {h}": tuple(f.format(v=vv, h=h) for vv in _V[v] for f in _CORNER_FORMS)
       for v in ("top", "bottom") for h in ("left", "right")},
    "top": ("top", "top edge"), "bottom": ("bottom", "bottom edge"),
    "left": ("left", "left side"), "right": ("right", "right side"),
    "centre": ("centre", "center", "middle"),
}
POSITION_PREPOSITIONS = {"top left": ("in", "at"), "top right": ("in", "at"), "bottom left": ("in", "at"),
                         "bottom right": ("in", "at"), "top": ("at", "along"), "bottom": ("at", "along"),
                         "left": ("on", "at"), "right": ("on", "at"), "centre": ("in", "at")}
BACKGROUND_WORDS = {"white": ("white",), "grey": ("grey", "gray"), "black": ("black",)}
FILL_WORDS = {"plain": ("plain", "solid"), "striped": ("striped", "stripy")}
COLOUR_VERBS = ("coloured", "colored")  # "a circle coloured red" (British and American)
ARTICLES = ("a", "one", "")  # "an" before a vowel is written automatically
OBJECT_JOINERS = (" and ", ", ", " with ", "; ")
BACKGROUND_PHRASES = (" on a {bg} background", " against a {bg} background", " on {bg}",
                      ", {bg} background", " with a {bg} backdrop")
ENDINGS = ("", "", "", ".", ".", "!")

# How often a caption names each attribute (shape is always named: it is the noun).
MENTION_PROBS = {"colour": 0.85, "size": 0.5, "position": 0.5, "striped": 0.8, "plain": 0.1, "background": 0.3}
N_OBJECT_TEMPLATES = 4


@dataclass
class Scenes:
    """A batch of scenes and everything known about them.

    images:     (N, 3, 64, 64) uint8 RGB
    edges:      (N, 1, 64, 64) bool, the inner boundary of every visible object
    masks:      (N, K, 64, 64) bool, the visible pixels of object slot k (all False for an empty slot)
    shape, colour, size, position, fill: (N, K) long, index into SHAPES etc.; -1 for an empty slot
    background: (N,) long, index into BACKGROUNDS
    n_objects:  (N,) long, 1 to 3 (the first n slots are filled)
    centre:     (N, K, 2) float, (x, y) in pixels;  radius, rotation: (N, K) float (pixels, radians)
    mentioned:  {"colour"|"size"|"position"|"fill": (N, K) bool, "background": (N,) bool}: what the caption names
    captions:   list of N strings
    """

    images: torch.Tensor
    edges: torch.Tensor
    masks: torch.Tensor
    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    position: torch.Tensor
    fill: torch.Tensor
    background: torch.Tensor
    n_objects: torch.Tensor
    centre: torch.Tensor
    radius: torch.Tensor
    rotation: torch.Tensor
    mentioned: dict = field(default_factory=dict)
    captions: list = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]

    def attributes(self, i: int) -> dict:
        """Everything true of scene ``i``, as words: {"objects": [{"shape", "colour", "size", "position",
        "fill"}, ...], "background": word}."""
        objects = [{name: vocab[int(getattr(self, name)[i, k])] for name, vocab in ATTRIBUTES.items()}
                   for k in range(int(self.n_objects[i]))]
        return {"objects": objects, "background": BACKGROUNDS[int(self.background[i])]}

    def described(self, i: int) -> dict:
        """What the caption of scene ``i`` says: ``attributes(i)`` with the unsaid attributes left out
        (the same dict ``parse_prompt(captions[i])`` returns)."""
        truth = self.attributes(i)
        objects = []
        for k, obj in enumerate(truth["objects"]):
            said = {"shape": obj["shape"]}
            for name in ("colour", "size", "position", "fill"):
                if bool(self.mentioned[name][i, k]):
                    said[name] = obj[name]
            objects.append(said)
        return {"objects": objects, "background": truth["background"] if bool(self.mentioned["background"][i]) else None}

    def images_float(self) -> torch.Tensor:
        """Images as float32 in [-1, 1], the range the VAE works in."""
        return to_float(self.images)

    def select(self, idx) -> "Scenes":
        """The scenes at ``idx`` (a slice, a list or a long/bool tensor), as a new ``Scenes``."""
        if isinstance(idx, slice):
            rows = list(range(len(self)))[idx]
        else:
            t = torch.as_tensor(idx)
            rows = (t.nonzero().squeeze(1) if t.dtype == torch.bool else t.long()).tolist()
        index = torch.tensor(rows, dtype=torch.long)
        tensors = {name: getattr(self, name)[index] for name in
                   ("images", "edges", "masks", "shape", "colour", "size", "position", "fill", "background",
                    "n_objects", "centre", "radius", "rotation")}
        return Scenes(**tensors, mentioned={k: v[index] for k, v in self.mentioned.items()},
                      captions=[self.captions[r] for r in rows])


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_uint8.float() / 127.5 - 1.0


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _indices(words: Sequence[str], vocab: Sequence[str], what: str) -> torch.Tensor:
    for w in words:
        if w not in vocab:
            raise ValueError(f"unknown {what} {w!r}; the world knows {vocab}")
    return torch.tensor([vocab.index(w) for w in words])


# --- Drawing attributes ----------------------------------------------------------------------------------
def sample_attributes(n: int, seed: int = 0, split: Split = "train", concepts: Concepts = "train",
                      object_counts: Sequence[float] = OBJECT_COUNT_PROBS) -> dict:
    """Draw the attributes of ``n`` scenes (a dict of tensors; see ``Scenes`` for their meaning).

    ``concepts="train"`` uses only TRAIN_SHAPES and TRAIN_COLOURS; ``"all"`` every shape and colour.
    ``object_counts``: probabilities of one, two and three objects.
    """
    _check_choice("split", split, _SPLIT_STREAM)
    _check_choice("concepts", concepts, ("train", "all"))
    probs = torch.tensor([float(p) for p in object_counts])
    if probs.numel() != MAX_OBJECTS or (probs < 0).any() or not math.isclose(float(probs.sum()), 1.0, abs_tol=1e-6):
        raise ValueError(f"object_counts must be {MAX_OBJECTS} probabilities (one, two, three objects) summing to 1, "
                         f"got {tuple(object_counts)}")
    g = torch.Generator().manual_seed(int(seed) * 2 + _SPLIT_STREAM[split])  # held-out: its own stream
    shapes = _indices(TRAIN_SHAPES if concepts == "train" else SHAPES, SHAPES, "shape")
    colours = _indices(TRAIN_COLOURS if concepts == "train" else COLOURS, COLOURS, "colour")
    k = MAX_OBJECTS
    n_objects = torch.multinomial(probs, n, replacement=True, generator=g) + 1  # (N,)
    shape = shapes[torch.randint(len(shapes), (n, k), generator=g)]
    colour_pick = torch.randint(len(colours), (n, k), generator=g)
    # No two objects of one scene share both shape and colour ("a red circle and a red circle"): move on.
    for j in range(1, k):
        for _ in range(j):
            clash = torch.zeros(n, dtype=torch.bool)
            for i in range(j):
                clash |= (shape[:, i] == shape[:, j]) & (colour_pick[:, i] == colour_pick[:, j])
            colour_pick[:, j] = torch.where(clash, (colour_pick[:, j] + 1) % len(colours), colour_pick[:, j])
    colour = colours[colour_pick]
    size = torch.randint(len(SIZES), (n, k), generator=g)
    position = torch.randint(len(POSITIONS), (n, k), generator=g)
    fill = (torch.rand(n, k, generator=g) < 0.25).long()  # a quarter of the objects are striped
    lo = torch.tensor([SIZE_RANGES[s][0] for s in SIZES])
    hi = torch.tensor([SIZE_RANGES[s][1] for s in SIZES])
    radius = lo[size] + (hi[size] - lo[size]) * torch.rand(n, k, generator=g)
    # Centre: uniform inside its grid cell, away from the cell's borders and the image's.
    col, row = position % GRID, position // GRID
    u = torch.rand(n, k, 2, generator=g)
    cell_lo = torch.stack([col, row], -1) * CELL + CELL_MARGIN
    cell_hi = (torch.stack([col, row], -1) + 1) * CELL - CELL_MARGIN
    cell_lo, cell_hi = cell_lo.clamp(min=EDGE_MARGIN), cell_hi.clamp(max=IMAGE_SIZE - EDGE_MARGIN)
    centre = cell_lo + (cell_hi - cell_lo) * u  # (N, K, 2)
    rotation = (torch.rand(n, k, generator=g) * 2 - 1) * MAX_ROTATION
    shade = torch.empty(n, k, 4).uniform_(0, 1, generator=g)  # brightness, then 3 channel offsets
    stripe_angle = torch.rand(n, k, generator=g) * math.pi
    stripe_phase = torch.rand(n, k, generator=g) * STRIPE_PERIOD
    background = torch.randint(len(BACKGROUNDS), (n,), generator=g)
    bg_light = torch.rand(n, 3, generator=g)  # brightness, gradient strength, gradient direction
    # What the caption will say: one uniform per (scene, slot, attribute), and the phrasing choices.
    mention_u = torch.rand(n, k, 4, generator=g)  # colour, size, position, fill
    background_u = torch.rand(n, generator=g)
    choices = torch.randint(0, 1 << 30, (n, 8), generator=g)  # word choices, one stream per scene
    empty = torch.arange(k)[None, :] >= n_objects[:, None]
    for t in (shape, colour, size, position, fill):
        t[empty] = -1
    radius[empty] = 0.0
    return dict(shape=shape, colour=colour, size=size, position=position, fill=fill, background=background,
                n_objects=n_objects, radius=radius, centre=centre, rotation=rotation, shade=shade,
                stripe_angle=stripe_angle, stripe_phase=stripe_phase, bg_light=bg_light, mention_u=mention_u,
                background_u=background_u, choices=choices)


# --- Drawing pixels ------------------------------------------------------------------------------------------
def shape_masks(shape: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor, rotation: torch.Tensor,
                origin: torch.Tensor | None = None, side: int = IMAGE_SIZE) -> torch.Tensor:
    """Boolean masks (M, side, side) of M shapes, all drawn at once.

    shape (M,) long index into SHAPES; centre (M, 2) pixels (x, y); radius, rotation (M,). ``origin`` (M, 2)
    is the pixel (x, y) of each mask's top-left corner (default: the image's, with side 64).
    Each shape is tested in its own rotated frame (u right, v down), scaled by its radius.
    """
    coords = torch.arange(side, dtype=torch.float32) + 0.5  # pixel centres
    origin = torch.zeros(shape.shape[0], 2) if origin is None else origin.float()
    dx = coords.view(1, 1, -1) + (origin[:, 0] - centre[:, 0]).view(-1, 1, 1)  # (M, 1, W)
    dy = coords.view(1, -1, 1) + (origin[:, 1] - centre[:, 1]).view(-1, 1, 1)  # (M, H, 1)
    cos, sin = torch.cos(rotation).view(-1, 1, 1), torch.sin(rotation).view(-1, 1, 1)
    r = radius.view(-1, 1, 1)
    u = (cos * dx + sin * dy) / r  # (M, H, W), in radii
    v = (-sin * dx + cos * dy) / r
    masks = torch.zeros(shape.shape[0], side, side, dtype=torch.bool)
    for kind, name in enumerate(SHAPES):  # draw each kind only where it is asked for
        sel = (shape == kind).nonzero().squeeze(1)
        if sel.numel():
            masks[sel] = _inside(name, u[sel], v[sel])
    return masks


def _inside(name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Is the point (u, v), in units of the radius, inside the unit shape called ``name``?"""
    if name == "circle":
        return u**2 + v**2 <= 1
    if name == "square":
        return (u.abs() <= 0.85) & (v.abs() <= 0.85)
    if name == "triangle":  # apex up at v = -1, base at v = 0.8
        from_apex = v + 1
        return (from_apex >= 0) & (from_apex <= 1.8) & (u.abs() <= from_apex / 1.8)
    if name == "ring":  # a disc with a hole: inner radius 0.55
        d2 = u**2 + v**2
        return (d2 <= 1) & (d2 >= 0.55**2)
    if name == "star":  # five points, outer radius 1, inner 0.5, one point straight up
        rho, theta = torch.sqrt(u**2 + v**2), torch.atan2(u, -v)  # theta = 0 straight up
        sector = 2 * math.pi / 5
        a = torch.remainder(theta, sector)
        a = torch.minimum(a, sector - a)  # angle from the nearest outer point, in [0, pi/5]
        x, y = rho * torch.cos(a), rho * torch.sin(a)
        px, py = 0.5 * math.cos(math.pi / 5), 0.5 * math.sin(math.pi / 5)  # inner corner
        return (1 - x) * py + (px - 1) * y >= 0  # on the centre's side of the edge (1, 0) -> inner corner
    if name == "cross":  # a plus sign with arms 0.8 wide
        return ((u.abs() <= 0.4) & (v.abs() <= 1)) | ((v.abs() <= 0.4) & (u.abs() <= 1))
    if name == "heart":  # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y up
        x, y = u * 1.15, -v * 1.15 + 0.15
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    if name == "moon":  # a disc with a smaller disc bitten out of its upper right
        return (u**2 + v**2 <= 1) & ((u - 0.45) ** 2 + (v + 0.15) ** 2 > 0.78**2)
    raise ValueError(f"unknown shape {name!r}")


def edge_map(labels: torch.Tensor) -> torch.Tensor:
    """Inner boundary of every region of a label map.

    labels: (N, H, W) uint8, 0 for background and k+1 for object k. A pixel is an edge when it belongs to
    an object and one of its 4 neighbours does not belong to the same object (the border counts as outside).
    """
    padded = torch.nn.functional.pad(labels, (1, 1, 1, 1), value=255)  # (N, H+2, W+2); 255 = outside
    centre = padded[:, 1:-1, 1:-1]
    differs = torch.zeros_like(centre, dtype=torch.bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        differs |= padded[:, dy:dy + IMAGE_SIZE, dx:dx + IMAGE_SIZE] != centre
    return differs & (centre > 0)


# Each object is drawn in a square window around its centre, wide enough for the largest radius: no shape reaches
# further than 1.2 radii from its centre (a square's corner: 0.85 x sqrt 2). 36 pixels for radius 14.
WINDOW = 2 * math.ceil(1.2 * max(hi for _, hi in SIZE_RANGES.values())) + 2


def render(attrs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw the scenes described by ``attrs`` (from ``sample_attributes``).

    Returns images uint8 (N, 3, H, W), edges bool (N, 1, H, W) and visible masks bool (N, K, H, W).
    Larger objects are drawn first, so a smaller one in front never hides completely behind a larger one.

    Two passes: first a label map (which object slot, if any, each pixel shows), each object drawn only in a
    window around it on a canvas padded by half a window; then the colours, pixel by pixel from the labels.
    """
    n, pad = attrs["shape"].shape[0], WINDOW // 2
    labels = torch.zeros(n, IMAGE_SIZE + 2 * pad, IMAGE_SIZE + 2 * pad, dtype=torch.uint8)
    order = torch.argsort(-attrs["radius"], dim=1, stable=True)  # (N, K): draw the largest first
    win = torch.arange(WINDOW)
    for layer in range(MAX_OBJECTS):
        slot = order[:, layer]  # (N,)
        s = attrs["shape"][torch.arange(n), slot]
        idx = (s >= 0).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        k = slot[idx]
        centre = attrs["centre"][idx, k]  # (M, 2)
        origin = centre.floor() - pad  # (M, 2) window's top-left pixel, in image coordinates
        mask = shape_masks(s[idx], centre, attrs["radius"][idx, k], attrs["rotation"][idx, k], origin, WINDOW)
        rows = (origin[:, 1].long() + pad).view(-1, 1) + win  # (M, w) canvas rows
        cols = (origin[:, 0].long() + pad).view(-1, 1) + win
        at = (idx.view(-1, 1, 1), rows.view(-1, WINDOW, 1), cols.view(-1, 1, WINDOW))  # (M, w, w) index
        labels[at] = torch.where(mask, (k + 1).to(torch.uint8).view(-1, 1, 1), labels[at])
    labels = labels[:, pad:pad + IMAGE_SIZE, pad:pad + IMAGE_SIZE].contiguous()  # (N, H, W): 0 background, k+1 slot k

    # Colours. Background: its base shade, a per-scene brightness and a linear gradient in a random direction.
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5  # pixel centres
    x, y = coords.view(1, 1, -1), coords.view(1, -1, 1)
    base = torch.tensor([BACKGROUND_RGB[b] for b in BACKGROUNDS], dtype=torch.float32)[attrs["background"]]  # (N, 3)
    light = attrs["bg_light"]
    angle = (light[:, 2] * 2 * math.pi).view(-1, 1, 1)
    ramp = (torch.cos(angle) * (x - IMAGE_SIZE / 2) + torch.sin(angle) * (y - IMAGE_SIZE / 2)) / IMAGE_SIZE  # (N, H, W)
    offset = (light[:, 0] * 2 - 1).view(-1, 1, 1) * BACKGROUND_BRIGHTNESS + light[:, 1].view(-1, 1, 1) * BACKGROUND_GRADIENT * ramp
    # Objects: each slot's shade of its colour name; row 0 of the table is the background's (unused) entry.
    fg = torch.tensor([COLOUR_RGB[c] for c in COLOURS], dtype=torch.float32)
    shade = attrs["shade"]  # (N, K, 4)
    brightness = SHADE_BRIGHTNESS[0] + (SHADE_BRIGHTNESS[1] - SHADE_BRIGHTNESS[0]) * shade[..., :1]
    slot_rgb = fg[attrs["colour"].clamp(min=0)] * brightness + (shade[..., 1:] * 2 - 1) * SHADE_CHANNEL  # (N, K, 3)
    table = torch.cat([torch.zeros(n, 1, 3), slot_rgb], 1)  # (N, 1 + K, 3)
    lab = labels.long().view(n, -1)  # (N, H*W)
    rgb = torch.gather(table, 1, lab[..., None].expand(-1, -1, 3))  # (N, H*W, 3), channels last until the end
    # Stripes: the pixel's object's stripe angle and phase, looked up the same way.
    striped_slot = torch.cat([torch.zeros(n, 1, dtype=torch.bool), attrs["fill"] == FILLS.index("striped")], 1)
    striped = torch.gather(striped_slot, 1, lab)  # (N, H*W)
    where = striped.nonzero()  # (P, 2): scene and pixel of every pixel of a striped object
    if where.numel():
        scene, pixel = where[:, 0], where[:, 1]
        slot = lab[scene, pixel] - 1
        ang, phase = attrs["stripe_angle"][scene, slot], attrs["stripe_phase"][scene, slot]
        along = torch.cos(ang) * coords[pixel % IMAGE_SIZE] + torch.sin(ang) * coords[pixel // IMAGE_SIZE] + phase
        dark = torch.remainder(along, STRIPE_PERIOD) < STRIPE_PERIOD / 2
        rgb[scene[dark], pixel[dark]] *= STRIPE_DARK
    background = base.view(n, 1, 3) + offset.view(n, -1, 1)  # (N, H*W, 3)
    images = torch.where(lab[..., None] > 0, rgb, background).round_().clamp_(0, 255).to(torch.uint8)
    images = images.view(n, IMAGE_SIZE, IMAGE_SIZE, 3).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    masks = labels[:, None] == torch.arange(1, MAX_OBJECTS + 1, dtype=torch.uint8).view(1, -1, 1, 1)  # (N, K, H, W)
    return images, edge_map(labels)[:, None], masks


# --- Writing captions --------------------------------------------------------------------------------------
def _article(next_word: str, choice: int) -> str:
    art = ARTICLES[choice % len(ARTICLES)]
    if art == "a" and next_word[:1] in "aeiou":
        return "an"
    return art


def _position_phrase(position: str, rng: random.Random) -> str:
    word = rng.choice(POSITION_WORDS[position])
    return f"{rng.choice(POSITION_PREPOSITIONS[position])} the {word}"


def object_phrase(obj: dict, rng: random.Random) -> str:
    """One object in words. ``obj`` holds the attributes to *say* (shape always; colour, size, position,
    fill when they are to be named), as words. The phrasing is drawn from ``rng``.

    >>> object_phrase({"shape": "circle", "colour": "red"}, random.Random(0)) in ("a red circle", "one red circle",
    ...     "red circle", "a circle coloured red", "a circle colored red", "one circle coloured red",
    ...     "one circle colored red", "circle coloured red", "circle colored red")
    True
    """
    if "shape" not in obj:
        raise ValueError(f"an object phrase needs a shape, got {obj}")
    size = rng.choice(SIZE_WORDS[obj["size"]]) if "size" in obj else ""
    colour = obj.get("colour", "")
    fill = rng.choice(FILL_WORDS[obj["fill"]]) if "fill" in obj else ""
    shape = obj["shape"]
    template = rng.randrange(N_OBJECT_TEMPLATES)
    if template == 3 and not colour:
        template = 0
    pos = obj.get("position")
    if template == 0:  # "a small striped red circle in the top left"
        words = " ".join(w for w in (size, fill, colour, shape) if w)
        text = words + (" " + _position_phrase(pos, rng) if pos else "")
    elif template == 1:  # "a red circle, small, upper left"
        words = " ".join(w for w in (fill, colour, shape) if w)
        tail = [w for w in (size, rng.choice(POSITION_WORDS[pos]) if pos else "") if w]
        text = ", ".join([words] + tail)
    elif template == 2:  # "top left: a small red circle"
        words = " ".join(w for w in (size, fill, colour, shape) if w)
        text = (rng.choice(POSITION_WORDS[pos]) + ": " if pos else "") + words
    else:  # "a small circle coloured red in the middle"
        words = " ".join(w for w in (size, fill, shape) if w) + f" {rng.choice(COLOUR_VERBS)} {colour}"
        text = words + (" " + _position_phrase(pos, rng) if pos else "")
    # The article goes before the noun phrase (after "top left: " in template 2).
    head, sep, noun = text.rpartition(": ") if template == 2 and pos else ("", "", text)
    art = _article(noun, rng.randrange(len(ARTICLES)))
    return head + sep + (f"{art} {noun}" if art else noun)


def caption(described: dict, rng: random.Random | int = 0, case: str | None = None) -> str:
    """Write a caption that says exactly ``described`` (as returned by ``Scenes.described``): the objects'
    named attributes and, when not None, the background. Phrasing, case and ending are drawn from ``rng``
    (a ``random.Random`` or an integer seed) unless ``case`` is given ("lower", "first" or "upper").

    >>> caption({"objects": [{"shape": "circle", "colour": "red"}], "background": None}, case="lower") != ""
    True
    """
    rng = rng if isinstance(rng, random.Random) else random.Random(int(rng))
    objects = described.get("objects") or []
    if not objects:
        raise ValueError("a caption needs at least one object")
    for obj in objects:
        for name, value in obj.items():
            if name not in ATTRIBUTES:
                raise ValueError(f"unknown attribute {name!r}; attributes are {tuple(ATTRIBUTES)}")
            if value not in ATTRIBUTES[name]:
                raise ValueError(f"unknown {name} {value!r}; the world knows {ATTRIBUTES[name]}")
    parts = [object_phrase(o, rng) for o in objects]
    if len(parts) == 1:
        text = parts[0]
    else:
        joiner = rng.choice(OBJECT_JOINERS)
        text = joiner.join(parts[:-1]) + (" and " if joiner == ", " and rng.random() < 0.5 else joiner) + parts[-1]
    bg = described.get("background")
    if bg is not None:
        if bg not in BACKGROUNDS:
            raise ValueError(f"unknown background {bg!r}; the world knows {BACKGROUNDS}")
        text += rng.choice(BACKGROUND_PHRASES).format(bg=rng.choice(BACKGROUND_WORDS[bg]))
    text += rng.choice(ENDINGS)
    case = case or rng.choices(("lower", "first", "upper"), weights=(0.65, 0.3, 0.05))[0]
    if case == "first":
        text = text[:1].upper() + text[1:]
    elif case == "upper":
        text = text.upper()
    elif case != "lower":
        raise ValueError(f"case must be 'lower', 'first' or 'upper', got {case!r}")
    return text


def template_caption(described: dict) -> str:
    """The plain template phrasing of ``described``: "a small red striped circle in the top left and ...,
    on a grey background", lower case, the first word of each attribute's synonyms, no ending.
    Benchmarks compare ordinary phrasings against this one."""
    parts = []
    for obj in described["objects"]:
        words = [SIZE_WORDS[obj["size"]][0] if "size" in obj else "",
                 FILL_WORDS[obj["fill"]][0] if "fill" in obj else "", obj.get("colour", ""), obj["shape"]]
        noun = " ".join(w for w in words if w)
        pos = obj.get("position")
        text = f"{_article(noun, 0)} {noun}"
        if pos:
            text += f" {POSITION_PREPOSITIONS[pos][0]} the {POSITION_WORDS[pos][0]}"
        parts.append(text)
    text = " and ".join(parts)
    if described.get("background"):
        text += f" on a {described['background']} background"
    return text


def _described_batch(attrs: dict) -> list[dict]:
    """What each scene's caption will say, from the mention draws (plain Python lists: fast)."""
    cols = {name: attrs[name].tolist() for name in ("shape", "colour", "size", "position", "fill")}
    mention = attrs["mention_u"].tolist()
    n_obj, bg, bg_u = attrs["n_objects"].tolist(), attrs["background"].tolist(), attrs["background_u"].tolist()
    out = []
    for i in range(len(n_obj)):
        objects = []
        for k in range(n_obj[i]):
            obj = {"shape": SHAPES[cols["shape"][i][k]]}
            m = mention[i][k]
            if m[0] < MENTION_PROBS["colour"]:
                obj["colour"] = COLOURS[cols["colour"][i][k]]
            if m[1] < MENTION_PROBS["size"]:
                obj["size"] = SIZES[cols["size"][i][k]]
            if m[2] < MENTION_PROBS["position"]:
                obj["position"] = POSITIONS[cols["position"][i][k]]
            fill = FILLS[cols["fill"][i][k]]
            if m[3] < MENTION_PROBS[fill if fill == "plain" else "striped"]:
                obj["fill"] = fill
            objects.append(obj)
        out.append({"objects": objects, "background": BACKGROUNDS[bg[i]] if bg_u[i] < MENTION_PROBS["background"] else None})
    return out


def _mentioned(described: list[dict]) -> dict:
    n = len(described)
    flags = {name: torch.zeros(n, MAX_OBJECTS, dtype=torch.bool) for name in ("colour", "size", "position", "fill")}
    for i, d in enumerate(described):
        for k, obj in enumerate(d["objects"]):
            for name in flags:
                flags[name][i, k] = name in obj
    flags["background"] = torch.tensor([d["background"] is not None for d in described], dtype=torch.bool)
    return flags


# --- The data set --------------------------------------------------------------------------------------------
def generate(n: int, seed: int = 0, split: Split = "train", concepts: Concepts = "train",
             object_counts: Sequence[float] = OBJECT_COUNT_PROBS) -> Scenes:
    """Draw ``n`` captioned scenes, deterministically from ``seed``, ``split`` and ``concepts``.

    >>> scenes = generate(4, seed=0)
    >>> scenes.images.shape, scenes.images.dtype, scenes.masks.shape
    (torch.Size([4, 3, 64, 64]), torch.uint8, torch.Size([4, 3, 64, 64]))
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer number of scenes, got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    attrs = sample_attributes(n, seed, split, concepts, object_counts)
    return scenes_from_attributes(attrs)


def scenes_from_attributes(attrs: dict, described: list[dict] | None = None) -> Scenes:
    """Render ``attrs`` (from ``sample_attributes``, possibly edited) and caption it. ``described`` overrides
    what each caption says (for example, every attribute, or none but the shape)."""
    images, edges, masks = [], [], []
    n = attrs["shape"].shape[0]
    for start in range(0, n, 4096):  # chunks keep memory flat for large n
        im, ed, ma = render({k: v[start:start + 4096] for k, v in attrs.items()})
        images.append(im)
        edges.append(ed)
        masks.append(ma)
    described = described if described is not None else _described_batch(attrs)
    if len(described) != n:
        raise ValueError(f"described holds {len(described)} entries for {n} scenes")
    choices = attrs["choices"][:, 0].tolist()
    captions = [caption(d, random.Random(c)) for d, c in zip(described, choices)]
    return Scenes(images=torch.cat(images), edges=torch.cat(edges), masks=torch.cat(masks),
                  **{k: attrs[k] for k in ("shape", "colour", "size", "position", "fill", "background",
                                           "n_objects", "centre", "radius", "rotation")},
                  mentioned=_mentioned(described), captions=captions)


def shape_twins(n: int, seed: int = 0, split: Split = "train", concepts: Concepts = "train") -> tuple[Scenes, Scenes]:
    """``n`` pairs of scenes that differ only in the shape of their first (largest) object: the same colours,
    sizes, positions, rotations, shades and background, and captions worded alike but for that one shape
    word. CLIP training puts such pairs in its batches as hard negatives (as NegCLIP does, Yuksekgonul et
    al. 2023): random batches can be told apart by colour and position alone, so CLIP would learn to ignore
    shape, and the U-Net, which reads CLIP's text states, would never learn to draw it.
    """
    attrs = sample_attributes(n, seed, split, concepts)
    shapes = _indices(TRAIN_SHAPES if concepts == "train" else SHAPES, SHAPES, "shape")
    g = torch.Generator().manual_seed(int(seed) * 2 + _SPLIT_STREAM[split] + 1_000_003)
    first = attrs["shape"][:, 0]
    where = (first.unsqueeze(1) == shapes.unsqueeze(0)).float().argmax(1)  # index of each first shape in ``shapes``
    other = shapes[(where + torch.randint(1, len(shapes), (n,), generator=g)) % len(shapes)]  # always a different shape
    twin = dict(attrs, shape=attrs["shape"].clone())
    twin["shape"][:, 0] = other
    return scenes_from_attributes(attrs), scenes_from_attributes(twin)


# --- Reading prompts: the inverse of ``caption``, shared by the evaluator and the generation checks ---------
WORD = re.compile(r"[a-z]+")


def normalise(text: str) -> list[str]:
    """A prompt as the words CLIP's tokenizer would see: lower case, letters only (punctuation, digits and
    hyphens separate words, as CLIP's pre-tokenizer splits them)."""
    return WORD.findall(text.lower())


def _phrase_table() -> list[tuple[tuple[str, ...], str, str]]:
    """Every multi-word and one-word phrase the captions use: (words, attribute, value), longest first."""
    rows = []
    for value, forms in SIZE_WORDS.items():
        rows += [(tuple(normalise(f)), "size", value) for f in forms]
    for value, forms in POSITION_WORDS.items():
        rows += [(tuple(normalise(f)), "position", value) for f in forms]
    for value, forms in FILL_WORDS.items():
        rows += [(tuple(normalise(f)), "fill", value) for f in forms]
    rows += [((c,), "colour", c) for c in COLOURS] + [((s,), "shape", s) for s in SHAPES]
    return sorted(rows, key=lambda r: -len(r[0]))


PHRASES = _phrase_table()
FILLER_WORDS = frozenset({"a", "an", "one", "the", "in", "at", "on", "along", "and", "with", "against", "coloured",
                          "colored", "background", "backdrop", "corner", "edge", "side"})


def caption_vocabulary() -> list[str]:
    """Every word a caption can contain (after ``normalise``), sorted."""
    words = set(FILLER_WORDS)
    for phrase, _, _ in PHRASES:
        words.update(phrase)
    for forms in BACKGROUND_WORDS.values():
        words.update(forms)
    return sorted(words)


def unknown_words(text: str) -> list[str]:
    """The words of ``text`` that no caption of the world contains, in order of appearance, once each."""
    known, out = set(caption_vocabulary()), []
    for w in normalise(text):
        if w not in known and w not in out:
            out.append(w)
    return out


def parse_prompt(text: str) -> dict:
    """Read what a prompt asks for: {"objects": [{"shape", and any of "colour", "size", "position", "fill"}],
    "background": word or None}. The inverse of ``caption`` for every phrasing it writes.

    The prompt is cut into clauses at commas, semicolons, colons, "and" and "with". In a clause, each shape
    word ends a noun phrase: the attributes before it are its own, the attributes after the clause's last shape
    ("a red circle in the top left") belong to that shape. A clause without a shape describes the object
    before it ("a red circle, small, upper left"), or the next one when it ends in a colon ("top left: a red
    circle") or comes first. Background words (white, grey/gray, black) name the background wherever they stand.

    Raises ValueError for an empty prompt, a prompt without a shape, or one attribute named twice for one
    object. Unknown words are ignored here; ``unknown_words`` lists them.

    >>> parse_prompt("Top-left: a tiny striped red star!")
    {'objects': [{'position': 'top left', 'size': 'small', 'fill': 'striped', 'colour': 'red', 'shape': 'star'}], 'background': None}
    """
    if not isinstance(text, str):
        raise TypeError(f"a prompt is a string, got {type(text).__name__}")
    if not normalise(text):
        raise ValueError(f"the prompt {text!r} holds no words")
    bg_words = {w: value for value, forms in BACKGROUND_WORDS.items() for w in forms}
    background, objects, pending = None, [], {}

    def put(obj: dict, name: str, value: str) -> None:
        if name in obj and obj[name] != value:
            raise ValueError(f"the prompt names two {name}s ({obj[name]!r}, {value!r}) for one object: {text!r}")
        obj[name] = value

    for clause, forward in _clauses(text):
        items, i = [], 0
        while i < len(clause):
            if clause[i] in bg_words:
                if background is not None and background != bg_words[clause[i]]:
                    raise ValueError(f"the prompt names two backgrounds: {text!r}")
                background = bg_words[clause[i]]
                i += 1
                continue
            for phrase, name, value in PHRASES:
                if tuple(clause[i:i + len(phrase)]) == phrase:
                    items.append((name, value))
                    i += len(phrase)
                    break
            else:
                i += 1
        if not any(name == "shape" for name, _ in items):
            target = pending if (forward or not objects) else objects[-1]
            for name, value in items:
                put(target, name, value)
            continue
        current, last_shape = None, max(j for j, (name, _) in enumerate(items) if name == "shape")
        for j, (name, value) in enumerate(items):
            if name == "shape":
                current = {**pending, "shape": value}
                objects.append(current)
                pending = {}
            elif j < last_shape or current is None:  # before a shape of this clause: it is that shape's
                put(pending, name, value)
            else:
                put(current, name, value)
        for name, value in pending.items():  # attributes after the clause's last shape
            put(objects[-1], name, value)
        pending = {}
    if not objects:
        raise ValueError(f"the prompt {text!r} names no shape (the world's shapes: {', '.join(SHAPES)})")
    if pending:
        for name, value in pending.items():
            put(objects[-1], name, value)
    return {"objects": objects, "background": background}


_CLAUSE_TOKENS = re.compile(r"[a-z]+|[,;:]")


def _clauses(text: str) -> list[tuple[list[str], bool]]:
    """Helper of parse_prompt: the prompt's clauses as word lists, each with True when it ends in a colon."""
    out, words = [], []
    for tok in _CLAUSE_TOKENS.findall(text.lower()):
        if tok in (",", ";", ":", "and", "with"):
            if words:
                out.append((words, tok == ":"))
            words = []
        else:
            words.append(tok)
    if words:
        out.append((words, False))
    return out


class ShapesDataset(Dataset):
    """A torch ``Dataset`` over generated scenes.

    Each item is a dict: ``image`` float32 (3, 64, 64) in [-1, 1], ``edges`` float32 (1, 64, 64) in {0, 1},
    ``caption`` str, ``index`` int. Scenes are drawn once, at construction.
    """

    def __init__(self, n: int, seed: int = 0, split: Split = "train", concepts: Concepts = "train"):
        self.scenes = generate(n, seed=seed, split=split, concepts=concepts)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"scene index {i} out of range for {len(self)} scenes")
        s = self.scenes
        return {"image": to_float(s.images[i]), "edges": s.edges[i].float(), "caption": s.captions[i],
                "index": i % len(self)}
