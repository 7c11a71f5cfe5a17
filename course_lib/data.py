"""The course's procedural data set: captioned 64x64 scenes of coloured shapes.

Lesson 0 tours it; every model in the course is trained on it. No download is needed:
scenes are drawn from a seed, all at once with tensor operations, so 50,000 of them take
seconds on a laptop CPU.

A scene holds one or two objects on a plain background. Each object has a shape, a colour,
a size and a position, and every word of a caption names one of those attributes, so an
attribute classifier (``course_lib.evaluator``) can check whether a generated image obeys
its prompt. Two-object captions ("a red circle ... and a blue square ...") are how lesson 4
shows attribute binding, a known weakness of Stable Diffusion.

Notation used below::

    N      number of scenes
    K=2    maximum number of objects per scene (slot 1 is empty, -1, in one-object scenes)
    H=W=64 image side
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch.utils.data import Dataset

# --- The vocabulary. Order matters: an attribute is stored as its index in these tuples. ---
SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
BACKGROUNDS = ("white", "grey")
ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}

COLOUR_RGB = {  # uint8 RGB for each colour word
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 170),
}
BACKGROUND_RGB = {"white": (245, 245, 245), "grey": (128, 128, 128)}

IMAGE_SIZE = 64
MAX_OBJECTS = 2
# Centre of each position, in pixels (x, y). The four corners are the centres of the quadrants.
POSITION_XY = {
    "top left": (16, 16),
    "top right": (48, 16),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
    "centre": (32, 32),
}
SIZE_RADIUS = {"small": 6.5, "large": 12.0}  # half-extent of a shape, in pixels
JITTER = 2.0  # each object's centre moves by up to this many pixels, so no two scenes are alike

# Caption templates for one object. {bg} templates also name the background.
OBJECT_PHRASES = (
    "a {size} {colour} {shape} in the {position}",
    "{size} {colour} {shape}, {position}",
    "a {colour} {shape}, {size}, in the {position}",
    "the {position} has a {size} {colour} {shape}",
)
BACKGROUND_PHRASES = ("", " on a {bg} background")
Split = Literal["train", "heldout"]
_SPLIT_STREAM = {"train": 0, "heldout": 1}


@dataclass
class Scenes:
    """A batch of scenes and everything known about them.

    images:     (N, 3, 64, 64) uint8 RGB
    edges:      (N, 1, 64, 64) bool, the inner boundary of every drawn shape
    shape, colour, size, position: (N, 2) long, index into SHAPES etc.; -1 where there is no object
    background: (N,) long, index into BACKGROUNDS
    n_objects:  (N,) long, 1 or 2
    captions:   list of N strings
    """

    images: torch.Tensor
    edges: torch.Tensor
    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    position: torch.Tensor
    background: torch.Tensor
    n_objects: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def attributes(self, i: int) -> dict:
        """The attributes of scene ``i`` as words: {"objects": [{"shape": ..., ...}], "background": ...}."""
        objects = []
        for k in range(int(self.n_objects[i])):
            objects.append({name: vocab[int(getattr(self, name)[i, k])] for name, vocab in ATTRIBUTES.items()})
        return {"objects": objects, "background": BACKGROUNDS[int(self.background[i])]}

    def images_float(self) -> torch.Tensor:
        """Images as float32 in [-1, 1], the range the VAE works in."""
        return to_float(self.images)


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_uint8.float() / 127.5 - 1.0


def _check_split(split: str) -> None:
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be one of {tuple(_SPLIT_STREAM)}, got {split!r}")


def _split_generator(seed: int, split: str) -> torch.Generator:
    # The held-out split is drawn from its own random stream, so it never shares scenes with train.
    g = torch.Generator().manual_seed(int(seed) * 2 + _SPLIT_STREAM[split])
    return g


def sample_attributes(n: int, seed: int = 0, split: Split = "train", two_object_fraction: float = 0.3) -> dict:
    """Draw the attributes of ``n`` scenes. Returns a dict of long tensors (see ``Scenes``)."""
    g = _split_generator(seed, split)
    two = torch.rand(n, generator=g) < two_object_fraction  # (N,)
    n_objects = 1 + two.long()
    shape = torch.randint(len(SHAPES), (n, MAX_OBJECTS), generator=g)
    colour = torch.randint(len(COLOURS), (n, MAX_OBJECTS), generator=g)
    size = torch.randint(len(SIZES), (n, MAX_OBJECTS), generator=g)
    background = torch.randint(len(BACKGROUNDS), (n,), generator=g)
    # One object: any of the 5 positions. Two objects: two different corners, so they never overlap.
    pos_single = torch.randint(len(POSITIONS), (n,), generator=g)
    corners = torch.rand(n, 4, generator=g).argsort(dim=1)[:, :2]  # (N, 2) two distinct corners
    position = torch.where(two[:, None], corners, torch.stack([pos_single, torch.full_like(pos_single, -1)], 1))
    # Two objects of identical description would make "a red circle and a red circle" captions: recolour.
    same = two & (shape[:, 0] == shape[:, 1]) & (colour[:, 0] == colour[:, 1])
    colour[:, 1] = torch.where(same, (colour[:, 1] + 1) % len(COLOURS), colour[:, 1])
    empty = ~two
    for t in (shape, colour, size):
        t[:, 1] = torch.where(empty, torch.full_like(t[:, 1], -1), t[:, 1])
    jitter = (torch.rand(n, MAX_OBJECTS, 2, generator=g) * 2 - 1) * JITTER  # (N, 2, xy)
    phrasing = torch.randint(len(OBJECT_PHRASES), (n, MAX_OBJECTS), generator=g)
    bg_phrase = torch.randint(len(BACKGROUND_PHRASES), (n,), generator=g)
    return dict(shape=shape, colour=colour, size=size, position=position, background=background,
                n_objects=n_objects, jitter=jitter, phrasing=phrasing, bg_phrase=bg_phrase)


def _shape_masks(shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Boolean masks (M, 64, 64) of M shapes, all drawn at once."""
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5  # pixel centres
    y = coords.view(1, -1, 1)  # (1, H, 1)
    x = coords.view(1, 1, -1)  # (1, 1, W)
    dx = x - cx.view(-1, 1, 1)  # (M, 1, W)
    dy = y - cy.view(-1, 1, 1)  # (M, H, 1)
    r = r.view(-1, 1, 1)
    masks = torch.empty(shape.shape[0], IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    for kind in range(len(SHAPES)):  # draw each kind of shape only where it is asked for
        sel = (shape == kind).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        ddx, ddy, rr = dx[sel], dy[sel], r[sel]
        if SHAPES[kind] == "circle":
            m = ddx**2 + ddy**2 <= rr**2
        elif SHAPES[kind] == "square":
            m = (ddx.abs() <= 0.85 * rr) & (ddy.abs() <= 0.85 * rr)
        else:  # upward triangle: apex at (cx, cy - r), base from (cx - r, cy + 0.8r) to (cx + r, cy + 0.8r)
            height = 1.8 * rr
            from_apex = ddy + rr  # 0 at the apex, `height` at the base
            m = (from_apex >= 0) & (from_apex <= height) & (ddx.abs() <= from_apex * (rr / height))
        masks[sel] = m
    return masks


def edge_map(labels: torch.Tensor) -> torch.Tensor:
    """Inner boundary of every region of a label map.

    labels: (N, H, W) uint8, 0 for background and k+1 for object k.
    A pixel is an edge when it belongs to an object and one of its 4 neighbours does not
    belong to the same object (the image border counts as outside).
    """
    padded = torch.nn.functional.pad(labels, (1, 1, 1, 1), value=255)  # (N, H+2, W+2); 255 = outside
    centre = padded[:, 1:-1, 1:-1]
    differs = torch.zeros_like(centre, dtype=torch.bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        differs |= padded[:, dy:dy + IMAGE_SIZE, dx:dx + IMAGE_SIZE] != centre
    return differs & (centre > 0)


def render(attrs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the scenes described by ``attrs``. Returns (images uint8 (N,3,H,W), edges bool (N,1,H,W))."""
    n = attrs["shape"].shape[0]
    bg = torch.tensor([BACKGROUND_RGB[b] for b in BACKGROUNDS], dtype=torch.uint8)
    fg = torch.tensor([COLOUR_RGB[c] for c in COLOURS], dtype=torch.uint8)
    labels = torch.zeros(n, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)  # (N, H, W): 0 background, k+1 object k
    images = bg[attrs["background"]].view(n, 3, 1, 1).expand(n, 3, IMAGE_SIZE, IMAGE_SIZE).clone()  # (N, 3, H, W)
    pos_xy = torch.tensor([POSITION_XY[p] for p in POSITIONS], dtype=torch.float32)  # (5, 2)
    radius = torch.tensor([SIZE_RADIUS[s] for s in SIZES])
    for k in range(MAX_OBJECTS):
        idx = (attrs["shape"][:, k] >= 0).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        centre = pos_xy[attrs["position"][idx, k]] + attrs["jitter"][idx, k]  # (M, 2)
        mask = _shape_masks(attrs["shape"][idx, k], centre[:, 0], centre[:, 1], radius[attrs["size"][idx, k]])
        labels[idx] = torch.where(mask, k + 1, labels[idx])
        colour = fg[attrs["colour"][idx, k]].view(-1, 3, 1, 1)  # (M, 3, 1, 1)
        images[idx] = torch.where(mask[:, None], colour, images[idx])
    return images, edge_map(labels)[:, None]


def caption(attributes: dict, phrasing: Sequence[int] = (0, 0), background_phrase: int = 1) -> str:
    """Write a caption for one scene's attributes (as returned by ``Scenes.attributes``).

    >>> caption({"objects": [dict(shape="circle", colour="red", size="small", position="top left")],
    ...          "background": "white"}, background_phrase=0)
    'a small red circle in the top left'
    """
    parts = [OBJECT_PHRASES[p].format(**obj) for obj, p in zip(attributes["objects"], phrasing)]
    text = " and ".join(parts)
    return text + BACKGROUND_PHRASES[background_phrase].format(bg=attributes["background"])


def generate(n: int, seed: int = 0, split: Split = "train", two_object_fraction: float = 0.3) -> Scenes:
    """Draw ``n`` captioned scenes, deterministically from ``seed`` and ``split``.

    >>> scenes = generate(4, seed=0)
    >>> scenes.images.shape, scenes.images.dtype
    (torch.Size([4, 3, 64, 64]), torch.uint8)
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer number of scenes, got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _check_split(split)
    if not 0.0 <= two_object_fraction <= 1.0:
        raise ValueError(f"two_object_fraction must lie in [0, 1], got {two_object_fraction!r}")
    attrs = sample_attributes(n, seed, split, two_object_fraction)
    images, edges = [], []
    for start in range(0, n, 8192):  # chunks keep memory flat for large n
        chunk = {k: v[start:start + 8192] for k, v in attrs.items()}
        im, ed = render(chunk)
        images.append(im)
        edges.append(ed)
    scenes = Scenes(images=torch.cat(images), edges=torch.cat(edges), captions=[],
                    **{k: attrs[k] for k in ("shape", "colour", "size", "position", "background", "n_objects")})
    scenes.captions = _captions(attrs)
    return scenes


def _captions(attrs: dict) -> list[str]:
    """Captions for a whole batch of attributes (plain Python lists: much faster than tensor indexing)."""
    cols = {name: attrs[name].tolist() for name in ("shape", "colour", "size", "position", "phrasing")}
    n_obj, bg, bgp = attrs["n_objects"].tolist(), attrs["background"].tolist(), attrs["bg_phrase"].tolist()
    out = []
    for i in range(len(n_obj)):
        objects = [{name: vocab[cols[name][i][k]] for name, vocab in ATTRIBUTES.items()} for k in range(n_obj[i])]
        out.append(caption({"objects": objects, "background": BACKGROUNDS[bg[i]]}, cols["phrasing"][i], bgp[i]))
    return out


_POSITION_WORDS = sorted(POSITIONS, key=len, reverse=True)


def parse_caption(text: str) -> dict:
    """Read the attributes a caption asks for: the inverse of ``caption`` for every phrasing.

    Returns {"objects": [{"shape", "colour", "size", "position"}, ...], "background": word or None}.
    Raises ValueError for text that is not a caption of this data set.
    """
    body, background = text.strip(), None
    for word in BACKGROUNDS:
        suffix = f" on a {word} background"
        if body.endswith(suffix):
            body, background = body[: -len(suffix)], word
    objects = []
    for part in body.split(" and "):
        obj = {}
        words = part.replace(",", " ").split()
        rest = " ".join(words)
        for pos in _POSITION_WORDS:
            if pos in rest:
                obj["position"] = pos
                rest = rest.replace(pos, " ")
                break
        for w in rest.split():
            for name, vocab in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES)):
                if w in vocab:
                    if name in obj:
                        raise ValueError(f"caption names two {name}s for one object: {text!r}")
                    obj[name] = w
        missing = {"shape", "colour", "size", "position"} - obj.keys()
        if missing:
            raise ValueError(f"not a caption of the shapes data set (no {sorted(missing)} in {part!r}): {text!r}")
        objects.append(obj)
    return {"objects": objects, "background": background}


def caption_vocabulary() -> list[str]:
    """Every word that can appear in a caption, sorted (the course's own tokeniser uses this)."""
    words = set()
    for template in OBJECT_PHRASES + BACKGROUND_PHRASES:
        words.update(w for w in template.replace(",", " ").split() if not w.startswith("{"))
    for vocab in (SHAPES, COLOURS, SIZES, BACKGROUNDS):
        words.update(vocab)
    for p in POSITIONS:
        words.update(p.split())
    words.add("and")
    return sorted(words)


class ShapesDataset(Dataset):
    """A torch ``Dataset`` over generated scenes.

    Each item is a dict: ``image`` float32 (3, 64, 64) in [-1, 1], ``edges`` float32 (1, 64, 64)
    in {0, 1}, ``caption`` str, ``index`` int. Scenes are drawn once, at construction.
    """

    def __init__(self, n: int, seed: int = 0, split: Split = "train", two_object_fraction: float = 0.3):
        self.scenes = generate(n, seed=seed, split=split, two_object_fraction=two_object_fraction)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"scene index {i} out of range for {len(self)} scenes")
        s = self.scenes
        return {"image": to_float(s.images[i]), "edges": s.edges[i].float(), "caption": s.captions[i], "index": i % len(self)}
