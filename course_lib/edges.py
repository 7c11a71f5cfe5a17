"""Edge maps: the control images of lesson 6 (ControlNet), and how to score how well a picture follows one.

Three ways to draw an edge map (the first two must agree on the scenes):

- **scene edges**: every procedural scene comes with its own edge map (``data.Scenes.edges``,
  built by ``data.edge_map``): the one-pixel inner boundary of every shape. Exact, free, and what
  the tiny ControlNet is trained on.
- **Canny** (Canny 1986; ``skimage.feature.canny``): what ControlNet users run on a real
  photograph. Gaussian blur (``sigma``), gradient, non-maximum suppression, and two thresholds
  with hysteresis. ``canny_edges`` runs it on each colour channel and keeps a pixel that is an
  edge in any of them: a green shape on a grey background has almost the same *brightness* as
  the background, so Canny on the grey-level image alone would lose that outline.
  ``photo_control`` turns any photograph into a 64x64 control: centre-crop, resize, Canny.
- **hand-drawn outlines**: ``polyline_edges`` rasterises lines given as points; ``novel_outlines``
  holds a few (a ring, letters) unlike any training scene, to see what the ControlNet does with them.
- **placed outlines** (lesson 6's "draw or pick an edge map"): a filled region placed at (x, y) with a
  radius, then outlined with the world's own rule (``outline``, which is ``data.edge_map``): one of the
  world's shapes (``shape_mask``, drawn by ``data.shape_masks``, the reserved heart and moon included),
  a polygon from a list of vertices (``polygon_mask``) or ASCII art (``ascii_mask``). Because the region
  is outlined the way every scene is, the edge map looks like the ones the ControlNet was trained on,
  whatever the region's shape.

Scoring a generation against its control (``edge_f1``): precision = share of the generated
image's edge pixels that lie within ``tolerance`` pixels of a control edge; recall = share of
control edge pixels with a generated edge within ``tolerance``; F1 = their harmonic mean. The
distance is the chessboard distance (tolerance 1: anywhere in the 3x3 neighbourhood), computed
with a max-pool as a dilation. The edges of a generated image come from ``canny_edges`` (as
ControlNet papers score Canny control) or from ``quantised_edges``: the data set's own edge
definition (``data.edge_map``) applied to colour regions read from the image.

Stripes are not edges (a scene's edge map outlines objects only), but Canny finds them: on the
rendered scenes themselves Canny's precision drops on striped objects (F1 ~0.95 over all scenes,
~0.98 on scenes without stripes), so the benchmark prints Canny's F1 on the real images as a
ceiling. ``quantised_edges`` is built to ignore stripes and shading: it labels each pixel by its
*chromaticity* (the ratios r : g : b), which neither a colour's shades (brightness x base) nor its
dark stripes (x 0.55) change, and calls a pixel background when it is nearly grey (the world's
backgrounds are white, grey or black).

Every function takes and returns torch tensors: images (B, 3, H, W), uint8 in [0, 255] or float
in [-1, 1] (the course's convention); edge maps (B, 1, H, W) bool.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import data

CONTROL_SIZE = data.IMAGE_SIZE  # the tiny SD draws 64x64 images, so its controls are 64x64 edge maps


def _as_unit_float(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 [0, 255] or float [-1, 1] -> float32 [0, 1] on the CPU."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {got}")
    if images.dtype == torch.uint8:
        return images.detach().cpu().float() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype {images.dtype}")
    return ((images.detach().cpu().float().clamp(-1, 1) + 1) / 2)


def canny_edges(images: torch.Tensor, sigma: float = 1.0, low_threshold: float = 0.1,
                high_threshold: float = 0.2) -> torch.Tensor:
    """Canny edges of a batch of RGB images: an edge in any colour channel is an edge.

    images: (B, 3, H, W) uint8 or float in [-1, 1]. sigma: std of the Gaussian blur, in pixels
    (larger: fewer, smoother edges). Thresholds: hysteresis on the gradient magnitude of the
    [0, 1] image, skimage's defaults. Returns (B, 1, H, W) bool.
    On the procedural scenes it finds every outline of ``scenes.edges`` within 1 pixel (recall ~0.97), and
    the stripes of striped objects too, which are not edges of the scene (tests/test_edges.py measures both).
    """
    from skimage.feature import canny

    if sigma <= 0:
        raise ValueError(f"sigma must be positive (the Gaussian blur in pixels), got {sigma}")
    if not 0 <= low_threshold <= high_threshold:
        raise ValueError(f"need 0 <= low_threshold <= high_threshold, got {low_threshold} and {high_threshold}")
    x = _as_unit_float(images).double().numpy()  # (B, 3, H, W) in [0, 1]
    out = np.zeros((x.shape[0], 1, x.shape[2], x.shape[3]), dtype=bool)
    for b in range(x.shape[0]):
        for c in range(3):
            out[b, 0] |= canny(x[b, c], sigma=sigma, low_threshold=low_threshold, high_threshold=high_threshold)
    return torch.from_numpy(out)


MIN_SPREAD = 20.0  # uint8 units: a pixel whose channels differ by less is grey, i.e. background (scenes: <= 5 and >= 29)


def colour_labels(images: torch.Tensor, min_spread: float = MIN_SPREAD, majority: bool = True) -> torch.Tensor:
    """Label every pixel with the colour name it shows: 0 for background, 1 + index into ``data.COLOURS``.

    A pixel is background when it is nearly grey (largest minus smallest channel < ``min_spread``, in
    uint8 units): every background of the world is. Otherwise it gets the colour name whose base RGB has
    the nearest chromaticity (r, g, b) / (r + g + b): shades and stripes of one colour keep its
    chromaticity, so a striped object is one region. ``majority``: then replace each label by the most
    common label of its 3x3 neighbourhood, which removes the specks a generated image's noise and blur
    leave (on rendered scenes it moves a few corner pixels by one pixel). Returns (B, H, W) long.
    """
    x = _as_unit_float(images) * 255.0  # (B, 3, H, W)
    spread = x.max(1).values - x.min(1).values  # (B, H, W)
    chroma = x / x.sum(1, keepdim=True).clamp(min=1.0)  # (B, 3, H, W), channels summing to 1
    base = torch.tensor([data.COLOUR_RGB[c] for c in data.COLOURS], dtype=torch.float32)  # (P, 3)
    base = base / base.sum(1, keepdim=True)
    dist = ((chroma[:, None] - base[None, :, :, None, None]) ** 2).sum(2)  # (B, P, H, W)
    labels = torch.where(spread >= min_spread, dist.argmin(1) + 1, 0)  # (B, H, W)
    if majority:
        one_hot = F.one_hot(labels, len(data.COLOURS) + 1).permute(0, 3, 1, 2).float()  # (B, 1 + P, H, W)
        votes = F.avg_pool2d(one_hot, 3, stride=1, padding=1, count_include_pad=False)  # (B, 1 + P, H, W)
        labels = votes.argmax(1)  # (B, H, W)
    return labels


def quantised_edges(images: torch.Tensor, majority: bool = True) -> torch.Tensor:
    """The data set's own edge definition applied to any RGB image: ``data.edge_map`` of ``colour_labels``.

    On a rendered scene (``majority=False``) this gives back ``scenes.edges`` exactly, stripes ignored,
    except where two overlapping objects share a colour name (their common boundary is then not seen).
    With the majority filter (default, for generated images) it agrees within one pixel.
    images: (B, 3, 64, 64) uint8 or float in [-1, 1]. Returns (B, 1, 64, 64) bool.
    """
    labels = colour_labels(images, majority=majority)
    if labels.shape[-2:] != (data.IMAGE_SIZE, data.IMAGE_SIZE):
        raise ValueError(f"quantised_edges works on {data.IMAGE_SIZE}x{data.IMAGE_SIZE} images, "
                         f"got {tuple(labels.shape[-2:])}")
    return data.edge_map(labels.to(torch.uint8))[:, None]  # (B, 1, H, W)


def _check_edges(edges: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(edges, torch.Tensor) or edges.dim() != 4 or edges.shape[1] != 1:
        got = tuple(edges.shape) if isinstance(edges, torch.Tensor) else type(edges).__name__
        raise ValueError(f"{name} must be a (B, 1, H, W) edge map, got {got}")
    return edges.detach().cpu() > 0.5 if edges.is_floating_point() else edges.detach().cpu().bool()


def dilate(edges: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow an edge map by ``radius`` pixels (chessboard distance): a max-pool with a (2r+1)^2 window."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    e = _check_edges(edges, "edges")
    if radius == 0:
        return e
    return F.max_pool2d(e.float(), 2 * radius + 1, stride=1, padding=radius) > 0  # (B, 1, H, W)


def edge_f1(generated: torch.Tensor, control: torch.Tensor, tolerance: int = 1) -> dict:
    """Per-image precision, recall and F1 of ``generated`` edges against ``control`` edges.

    generated, control: (B, 1, H, W) edge maps (bool, or float thresholded at 0.5).
    tolerance: an edge pixel counts as matched when one of the other map lies within this many
    pixels (chessboard distance). Two empty maps agree perfectly (F1 1); one empty map scores 0.
    Returns {"precision", "recall", "f1"}: (B,) float tensors each.
    """
    g, c = _check_edges(generated, "generated"), _check_edges(control, "control")
    if g.shape != c.shape:
        raise ValueError(f"generated and control edge maps differ in shape: {tuple(g.shape)} vs {tuple(c.shape)}")
    n_g, n_c = g.sum((1, 2, 3)).float(), c.sum((1, 2, 3)).float()  # (B,) edge pixels of each
    precision = torch.where(n_g > 0, (g & dilate(c, tolerance)).sum((1, 2, 3)) / n_g.clamp(min=1), (n_c == 0).float())
    recall = torch.where(n_c > 0, (c & dilate(g, tolerance)).sum((1, 2, 3)) / n_c.clamp(min=1), (n_g == 0).float())
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(precision))
    return {"precision": precision, "recall": recall, "f1": f1}


def resize_edges(edges: torch.Tensor, size: int = CONTROL_SIZE) -> torch.Tensor:
    """Resize an edge map to ``size`` x ``size`` without losing thin lines.

    Shrinking: a pixel of the result is an edge if any pixel it covers is one (adaptive max-pool),
    so one-pixel lines survive. Enlarging: nearest neighbour. Returns (B, 1, size, size) bool.
    """
    e = _check_edges(edges, "edges").float()
    if e.shape[-2] >= size and e.shape[-1] >= size:
        return F.adaptive_max_pool2d(e, size) > 0
    return F.interpolate(e, size=(size, size), mode="nearest") > 0


def photo_control(photo: np.ndarray, size: int = CONTROL_SIZE, sigma: float = 1.0,
                  low_threshold: float = 0.1, high_threshold: float = 0.2) -> torch.Tensor:
    """A photograph (H, W) grey or (H, W, 3) RGB numpy array -> a (1, 1, size, size) Canny control.

    The photo is centre-cropped to a square and resized to ``size`` (with anti-aliasing) *before*
    Canny, so the edges come out one pixel wide, like the scenes' own edges. (Running Canny at
    full resolution and shrinking the edge map afterwards gives thick, broken lines instead.)
    """
    from skimage.transform import resize

    a = np.asarray(photo)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"photo must be an (H, W) or (H, W, 3) image array, got shape {a.shape}")
    a = a[..., :3]
    if np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float64) / np.iinfo(a.dtype).max
    h, w = a.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = a[top:top + s, left:left + s]
    small = resize(square, (size, size), anti_aliasing=True)  # (size, size, 3) in [0, 1]
    images = torch.from_numpy(small).permute(2, 0, 1)[None].float() * 2 - 1  # (1, 3, size, size) in [-1, 1]
    return canny_edges(images, sigma, low_threshold, high_threshold)


def polyline_edges(polylines: Sequence[Sequence[tuple[float, float]]], size: int = CONTROL_SIZE,
                   closed: bool = True) -> torch.Tensor:
    """Rasterise hand-drawn lines into a one-pixel-wide edge map, like the scenes' own (1, 1, size, size) bool.

    polylines: lines, each a list of (x, y) points in pixels (x right, y down, (0, 0) the top-left corner
    of the image); ``closed`` joins each line's last point to its first. Every segment is sampled every
    quarter pixel and each sample marks the pixel it falls in, so lines come out 8-connected and unbroken.
    """
    out = torch.zeros(1, 1, size, size, dtype=torch.bool)
    for line in polylines:
        pts = torch.tensor([[float(x), float(y)] for x, y in line], dtype=torch.float32)  # (K, 2)
        if pts.ndim != 2 or pts.shape[0] < 2:
            raise ValueError(f"each polyline needs at least two (x, y) points, got {list(line)!r}")
        if closed:
            pts = torch.cat([pts, pts[:1]])
        for a, b in zip(pts[:-1], pts[1:]):
            steps = int(torch.ceil((b - a).abs().max() * 4).item()) + 1
            t = torch.linspace(0, 1, steps).view(-1, 1)
            xy = (a + t * (b - a)).floor().long()  # (steps, 2) pixel of each sample
            keep = (xy >= 0).all(1) & (xy < size).all(1)
            out[0, 0, xy[keep, 1], xy[keep, 0]] = True
    return out


def circle_points(cx: float, cy: float, r: float, n: int = 64) -> list[tuple[float, float]]:
    """``n`` points on a circle (for ``polyline_edges``)."""
    return [(cx + r * math.cos(2 * math.pi * k / n), cy + r * math.sin(2 * math.pi * k / n)) for k in range(n)]


def novel_outlines() -> dict[str, tuple[torch.Tensor, str]]:
    """Outlines no training scene has, as 64 x 64 controls: name -> (edge map (1, 1, 64, 64), a prompt for it).

    A ring (two concentric circles), the letters L and Z and a zig-zag drawn as polylines: the world's
    shapes are filled, convex-ish and at most 26 px across; these are not.
    """
    ring = polyline_edges([circle_points(32, 32, 22), circle_points(32, 32, 12)])
    letter_l = polyline_edges([[(18, 10), (30, 10), (30, 42), (48, 42), (48, 54), (18, 54)]])
    letter_z = polyline_edges([[(12, 12), (52, 12), (52, 22), (28, 44), (52, 44), (52, 54), (12, 54), (12, 44),
                                (36, 22), (12, 22)]])
    zigzag = polyline_edges([[(6, 40), (18, 20), (30, 40), (42, 20), (58, 40), (58, 50), (42, 30), (30, 50),
                              (18, 30), (6, 50)]])
    return {"ring": (ring, "a yellow circle"), "letter L": (letter_l, "a blue square"),
            "letter Z": (letter_z, "a red star"), "zig-zag": (zigzag, "a green ring")}


# --- Placed outlines: a region at (x, y) with a radius, outlined as the world outlines its objects. -------------

def _unit_coords(x: float, y: float, radius: float, rotation: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pixel centre of the 64 x 64 image in the frame of a shape at (x, y): (u, v), each (64, 64), in radii.

    The same frame as ``data.shape_masks``: u to the right, v down, turned by ``rotation`` (radians).
    """
    for name, value in (("x", x), ("y", y), ("radius", radius), ("rotation", rotation)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if radius <= 0:
        raise ValueError(f"radius must be positive (pixels from the centre to the outline), got {radius}")
    coords = torch.arange(data.IMAGE_SIZE, dtype=torch.float32) + 0.5  # pixel centres
    dx, dy = coords.view(1, -1) - x, coords.view(-1, 1) - y  # (1, W), (H, 1)
    cos, sin = math.cos(rotation), math.sin(rotation)
    return (cos * dx + sin * dy) / radius, (-sin * dx + cos * dy) / radius  # (H, W) each


def shape_mask(shape: str, x: float, y: float, radius: float, rotation: float = 0.0) -> torch.Tensor:
    """One of the world's shapes (``data.SHAPES``, the reserved heart and moon too) filled at (x, y): (64, 64) bool.

    Drawn by ``data.shape_masks``, the function that draws every scene, so ``outline(shape_mask(...))`` is
    exactly the edge map a scene with that one object has. radius in pixels (the world's: 6.5 to 14).
    """
    if shape not in data.SHAPES:
        raise ValueError(f"unknown shape {shape!r}; the world's shapes are {', '.join(data.SHAPES)}")
    _unit_coords(x, y, radius, rotation)  # the same checks of x, y, radius and rotation
    masks = data.shape_masks(torch.tensor([data.SHAPES.index(shape)]), torch.tensor([[float(x), float(y)]]),
                             torch.tensor([float(radius)]), torch.tensor([float(rotation)]))  # (1, 64, 64)
    return masks[0]


def polygon_mask(vertices: Sequence[tuple[float, float]], x: float, y: float, radius: float,
                 rotation: float = 0.0) -> torch.Tensor:
    """A polygon filled at (x, y): (64, 64) bool.

    vertices: at least three (u, v) corners in units of the radius, u right and v down, the centre at
    (0, 0): (0, -1) is one radius above the centre. A pixel is inside when a ray from its centre crosses
    the edges an odd number of times (the even-odd rule), so a polygon may be concave.
    """
    try:
        pts = torch.tensor([[float(u), float(v)] for u, v in vertices], dtype=torch.float32)  # (K, 2)
    except (TypeError, ValueError) as err:
        raise ValueError(f"vertices must be a list of (u, v) pairs of numbers, e.g. [(0, -1), (1, 1), (-1, 1)]: {err}")
    if pts.shape[0] < 3 or not torch.isfinite(pts).all():
        raise ValueError(f"a polygon needs at least three finite (u, v) vertices, got {pts.shape[0]}")
    u, v = _unit_coords(x, y, radius, rotation)
    inside = torch.zeros_like(u, dtype=torch.bool)
    for (u1, v1), (u2, v2) in zip(pts.tolist(), pts.roll(-1, 0).tolist()):  # each edge, the last one closing it
        if v1 == v2:
            continue  # a horizontal edge never crosses a horizontal ray
        crosses = (v1 > v) != (v2 > v)  # the edge spans the pixel's row ...
        u_at = u1 + (v - v1) * (u2 - u1) / (v2 - v1)  # ... at this u
        inside ^= crosses & (u < u_at)  # a ray to the right crosses it
    return inside


def ascii_mask(rows: Sequence[str], x: float, y: float, radius: float) -> torch.Tensor:
    """ASCII art filled at (x, y): (64, 64) bool. ``#`` marks the inside, ``.`` or a space the outside.

    The drawing (every row the same length) is stretched over the square of side 2 x radius centred at
    (x, y), keeping its proportions: each character covers (2 radius / the longer side) pixels, and each
    pixel takes the character under its centre (nearest neighbour).
    """
    if isinstance(rows, str):
        rows = rows.strip("\n").split("\n")
    rows = list(rows)
    if not rows or not all(isinstance(r, str) for r in rows):
        raise ValueError("rows must be a non-empty list of strings, one per row of the drawing")
    if len({len(r) for r in rows}) != 1 or not rows[0]:
        raise ValueError(f"every row must have the same length (pad with '.'), got lengths {[len(r) for r in rows]}")
    bad = sorted({ch for r in rows for ch in r} - set("#. "))
    if bad:
        raise ValueError(f"use '#' for inside and '.' or ' ' for outside; found {bad}")
    grid = torch.tensor([[ch == "#" for ch in r] for r in rows])  # (rows, cols)
    h, w = grid.shape
    u, v = _unit_coords(x, y, radius)
    cell = 2 / max(h, w)  # one character, in radii
    col = torch.floor(u / cell + w / 2).long()  # (64, 64) the character under each pixel centre
    row = torch.floor(v / cell + h / 2).long()
    on = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    inside = torch.zeros_like(on)
    inside[on] = grid[row[on], col[on]]
    return inside


def outline(mask: torch.Tensor) -> torch.Tensor:
    """The world's edge map of a filled region: its one-pixel inner boundary (``data.edge_map``), (1, 1, 64, 64) bool.

    mask: (64, 64) bool, True inside (``shape_mask``, ``polygon_mask``, ``ascii_mask``, or your own).
    A pixel is an edge when it is inside and one of its 4 neighbours is not (the image border counts as outside).
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a 2-D ({data.IMAGE_SIZE}, {data.IMAGE_SIZE}) tensor, got {got}")
    if tuple(mask.shape) != (data.IMAGE_SIZE, data.IMAGE_SIZE):
        raise ValueError(f"mask must be {data.IMAGE_SIZE} x {data.IMAGE_SIZE}, the tiny SD's image size, got "
                         f"{tuple(mask.shape)}; draw it with shape_mask, polygon_mask or ascii_mask, or resize it")
    m = mask.detach().cpu().bool()
    if not m.any():
        raise ValueError("the region is empty: nothing of it lies inside the 64 x 64 image. Move it (x, y between "
                         "0 and 64), make it larger, or draw some '#' into the ASCII art")
    return data.edge_map(m.to(torch.uint8)[None])[:, None]  # (1, 1, 64, 64)


def photographs() -> dict[str, Callable[[], np.ndarray]]:
    """Real photographs that ship with scikit-image (no download): name -> function returning the array."""
    from skimage import data as skdata

    return {"astronaut": skdata.astronaut, "camera": skdata.camera, "coffee": skdata.coffee,
            "chelsea": skdata.chelsea, "rocket": skdata.rocket}


def to_control(edges: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """Edge map (B, 1, H, W), bool or float -> the float {0, 1} control image a ControlNet reads.

    ``like``: take device and dtype from this tensor (default: float32 on the edges' device).
    """
    if not isinstance(edges, torch.Tensor) or edges.dim() != 4 or edges.shape[1] != 1:
        got = tuple(edges.shape) if isinstance(edges, torch.Tensor) else type(edges).__name__
        raise ValueError(f"edges must be a (B, 1, H, W) edge map, got {got}")
    out = (edges > 0.5).float() if edges.is_floating_point() else edges.bool().float()
    return out if like is None else out.to(like.device, like.dtype)
