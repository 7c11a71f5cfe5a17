"""Helpers that lesson 3 (CLIP) uses: zero-shot candidate captions and the similarity-matrix figure.

- ``attribute_options``: for a one-object scene, one caption per value of an attribute (shape, colour,
  size, position or fill) that the CLIP read in training, all other words kept true: the candidates of a
  zero-shot classifier;
- ``binding_swaps``: for a two-object scene, captions with the same words but the colours (or the
  positions) swapped between the objects: a test of whether the text tower reads more than a bag
  of words (``swappable`` says whether both swaps change the scene);
- ``zero_shot_accuracy`` and ``binding_preference``: both measured on many scenes at once (one batch
  of images, one batch of captions);
- ``similarity_figure``: a batch's image-caption similarity matrix with the images along the side.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from ..clip import CLIP, Tokenizer
from ..data import ATTRIBUTES, RESERVED_COLOURS, RESERVED_SHAPES, Scenes, template_caption
from .plotting import to_uint8, wrap


def trained_values(name: str) -> list[str]:
    """The values of attribute ``name`` that training captions use: the reserved shapes (heart, moon) and
    colour (brown) left out, because the tiny CLIP reads their words as the unknown token."""
    if name not in ATTRIBUTES:
        raise ValueError(f"name must be one of {tuple(ATTRIBUTES)}, got {name!r}")
    return [v for v in ATTRIBUTES[name] if v not in RESERVED_SHAPES + RESERVED_COLOURS]


def attribute_options(attributes: dict, name: str) -> tuple[list[str], list[str]]:
    """(values, captions): one caption per trained value of attribute ``name`` (``trained_values``) for a
    one-object scene's attributes (as returned by ``Scenes.attributes``), every other attribute and the
    background as in the scene, in the plain template phrasing (``data.template_caption``)."""
    values = trained_values(name)
    if len(attributes["objects"]) != 1:
        raise ValueError("attribute_options needs a one-object scene")
    captions = [template_caption({"objects": [dict(attributes["objects"][0], **{name: v})],
                                  "background": attributes["background"]}) for v in values]
    return values, captions


def swappable(attributes: dict) -> bool:
    """Is this a two-object scene whose objects differ in colour and in position (so that swapping either
    between them gives a caption that is false of the image)?"""
    objs = attributes["objects"]
    return len(objs) == 2 and objs[0]["colour"] != objs[1]["colour"] and objs[0]["position"] != objs[1]["position"]


def binding_swaps(attributes: dict) -> dict[str, str]:
    """For a two-object scene: its caption and two with the same words bound differently.

    Returns {"true": ..., "colours swapped": ..., "positions swapped": ...}, every attribute named, in the
    plain template phrasing (``data.template_caption``).
    """
    objs = attributes["objects"]
    if len(objs) != 2:
        raise ValueError("binding_swaps needs a two-object scene")
    a, b = objs
    variants = {"true": [a, b],
                "colours swapped": [dict(a, colour=b["colour"]), dict(b, colour=a["colour"])],
                "positions swapped": [dict(a, position=b["position"]), dict(b, position=a["position"])]}
    return {k: template_caption({"objects": v, "background": attributes["background"]}) for k, v in variants.items()}


@torch.no_grad()
def zero_shot_accuracy(clip: CLIP, tokenizer: Tokenizer, scenes: Scenes, indices: list[int], name: str) -> float:
    """Share of the one-object scenes ``indices`` whose true value of attribute ``name`` wins a zero-shot vote
    among ``attribute_options`` (the caption most similar to the image is the prediction). Scenes whose true value
    is a reserved concept have no right option: leave them out of ``indices``."""
    device = clip.logit_scale.device
    images = clip.encode_image(scenes.images_float()[indices].to(device))  # (N, D)
    options = [attribute_options(scenes.attributes(i), name)[1] for i in indices]
    k = len(options[0])
    texts = clip.encode_text(tokenizer([c for opts in options for c in opts]).to(device)).view(len(indices), k, -1)
    pred = (texts @ images[:, :, None])[..., 0].argmax(dim=1).cpu()  # (N,) index of the best caption
    values = trained_values(name)
    truth = torch.tensor([values.index(scenes.attributes(i)["objects"][0][name]) for i in indices])
    return (pred == truth).float().mean().item()


@torch.no_grad()
def binding_preference(clip: CLIP, tokenizer: Tokenizer, scenes: Scenes, indices: list[int]) -> dict[str, dict[str, float]]:
    """For the two-object scenes ``indices`` (each ``swappable``) and each swap of ``binding_swaps`` ("colours swapped", "positions
    swapped"): ``preferred``, how often the image is more similar to its true caption than to the swapped one,
    and ``text_cosine``, the mean cosine similarity of the two captions' text embeddings (1: indistinguishable)."""
    device = clip.logit_scale.device
    images = clip.encode_image(scenes.images_float()[indices].to(device))  # (N, D)
    variants = [binding_swaps(scenes.attributes(i)) for i in indices]
    keys = list(variants[0])
    texts = clip.encode_text(tokenizer([v[k] for v in variants for k in keys]).to(device)).view(len(indices), len(keys), -1)
    sims = (texts @ images[:, :, None])[..., 0].cpu()  # (N, 3): true, colours swapped, positions swapped
    return {k: {"preferred": (sims[:, 0] > sims[:, j]).float().mean().item(),
                "text_cosine": (texts[:, 0] * texts[:, j]).sum(-1).mean().item()}
            for j, k in enumerate(keys) if j > 0}


def similarity_figure(images: torch.Tensor, captions: list[str], sims: torch.Tensor, title: str):
    """Heat map of ``sims`` (images x captions) with each image drawn at the start of its row."""
    n = images.shape[0]
    fig = plt.figure(figsize=(2.2 + 0.75 * len(captions), 0.75 * n + 2.6))
    grid = fig.add_gridspec(n, 2, width_ratios=[1, len(captions)], wspace=0.02, hspace=0.05)
    heat = fig.add_subplot(grid[:, 1])
    im = heat.imshow(sims.cpu(), cmap="viridis", aspect="auto")  # fills the rows, so each image lines up with its row
    heat.set_xticks(range(len(captions)), [wrap(c, 24) for c in captions], rotation=90, fontsize=6)
    heat.set_yticks(range(n), [f"image {i}" for i in range(n)], fontsize=7)
    heat.yaxis.tick_right()
    heat.set_xlabel("caption")
    heat.set_title(title)
    for i in range(n):
        j = int(sims[i].argmax())
        heat.text(j, i, "x", ha="center", va="center", color="red", fontsize=8)
    fig.colorbar(im, ax=heat, shrink=0.7, pad=0.12, label="cosine similarity")
    pictures = to_uint8(images)
    for i in range(n):
        ax = fig.add_subplot(grid[i, 0])
        ax.imshow(pictures[i])
        ax.axis("off")
    return fig
