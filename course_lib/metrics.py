"""How the course measures its models: the numbers in the model cards, the benchmarks and the lessons.

Lesson 1 reads ``ssim`` and ``reconstruct``; ``python -m course_lib.train`` writes these numbers into
every model card; ``benchmarks/`` run the same functions on more scenes.

    VAE         PSNR / SSIM of held-out reconstructions; does the evaluator read the same attributes?
    CLIP        zero-shot caption retrieval and per-attribute zero-shot classification
    U-Net       prompt adherence of generated images (``evaluator.prompt_adherence``)
    ControlNet  edge F1 between the control and the edges of the generated image, prompt adherence, and
                position and size from the control when the prompt leaves them unsaid

Why a module of its own, beside ``evaluator.py``: the evaluator is a model (trained by
``course_lib.train``, shipped in ``weights/``), and these functions read the outputs of every model
(VAE, CLIP, generated images, edge maps). They never build a pipeline: the ones that generate take
a ``pipe`` (a ``tiny_sd.TinySD``) from their caller, so training can import them without importing
the inference pipeline (tests/test_imports.py checks it).
"""

from __future__ import annotations

import itertools
import random

import torch

from . import data, edges
from .clip import CLIP, Tokenizer
from .controlnet import ControlNet, generate_with_control
from .evaluator import Evaluator, agreement, attribute_accuracy, prompt_adherence
from .vae import VAE, psnr

EDGE_TOLERANCE = 1  # pixels (chessboard distance): a generated edge within the 3x3 neighbourhood of a control edge matches
EDGE_SIGMA = 1.0  # Canny blur used to read the edges of generated images


def subset(scenes: data.Scenes, n: int) -> data.Scenes:
    """The first ``n`` scenes."""
    return scenes.select(slice(0, min(n, len(scenes))))


# --- The VAE. -----------------------------------------------------------------------------------------

def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean SSIM (skimage.metrics.structural_similarity) of two image batches in [-1, 1]."""
    from skimage.metrics import structural_similarity

    a = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().double().numpy()  # (B, H, W, 3) in [0, 1]
    b = ((y.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().double().numpy()
    return float(sum(structural_similarity(p, q, channel_axis=2, data_range=1.0) for p, q in zip(a, b)) / len(a))


@torch.no_grad()
def reconstruct(vae: VAE, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Encode to the posterior mean and decode: the reconstruction lesson 1 shows."""
    return torch.cat([vae.decode(vae.encode(images[i:i + batch_size]).mode())
                      for i in range(0, images.shape[0], batch_size)])


def vae_metrics(vae: VAE, heldout: data.Scenes, evaluator: Evaluator | None, device="cpu") -> dict:
    """PSNR and SSIM of held-out reconstructions, and whether the evaluator reads the same attributes."""
    x = heldout.images_float().to(device)
    r = reconstruct(vae, x)
    out = {"psnr_db": psnr(r, x).mean().item(), "ssim": ssim(r, x), "n_heldout": len(heldout)}
    if evaluator is not None:
        out["evaluator_agreement"] = agreement(evaluator, x, r)
        out["evaluator_accuracy_on_reconstructions"] = attribute_accuracy(evaluator, r, heldout)
    return out


# --- CLIP. --------------------------------------------------------------------------------------------

@torch.no_grad()
def clip_metrics(clip: CLIP, heldout: data.Scenes, device="cpu", batch: int = 64) -> dict:
    """Zero-shot caption retrieval on batches of ``batch`` held-out pairs, and per-attribute zero-shot accuracy.

    Retrieval (image -> caption, top-1) is reported two ways: ``strict`` counts only the image's own
    caption; ``top1`` also accepts any caption whose every word is true of the image (captions leave
    attributes out, so "a red circle" fits many one-circle scenes: the picture cannot tell them apart).
    Per-attribute: on one-object scenes, the caption naming every attribute competes with the captions
    that change only that attribute (e.g. colour: the 8 training colours), the way CLIP is used as a
    zero-shot classifier. Values the CLIP never saw in training (``Tokenizer.unknown_words``) are left out.
    """
    tok = Tokenizer.from_config(clip.config)
    n = (len(heldout) // batch) * batch
    strict = semantic = t2i = 0
    all_images = heldout.images_float()
    for s in range(0, n, batch):
        images = all_images[s:s + batch].to(device)
        caps = heldout.captions[s:s + batch]
        sims = clip.encode_image(images) @ clip.encode_text(tok(caps).to(device)).T  # (batch, batch)
        best = sims.argmax(dim=1).cpu()
        strict += (best == torch.arange(batch)).sum().item()
        t2i += (sims.argmax(dim=0).cpu() == torch.arange(batch)).sum().item()
        for i, j in enumerate(best.tolist()):
            semantic += _describes(heldout.described(s + j), heldout.attributes(s + i))
    out = {"retrieval_batch": batch, "n_batches": n // batch, "image_to_text_top1": semantic / n,
           "image_to_text_top1_strict": strict / n, "text_to_image_top1_strict": t2i / n}
    out["per_attribute_zero_shot"] = _attribute_zero_shot(clip, heldout, tok, device)
    return out


def _describes(described: dict, truth: dict) -> bool:
    """Is everything a caption says (``Scenes.described``) true of a scene (``Scenes.attributes``)? As many
    objects, each named attribute true of an object of its own, and the background if named."""
    said, objects = described["objects"], truth["objects"]
    if len(said) != len(objects) or described["background"] not in (None, truth["background"]):
        return False
    return any(all(all(obj[k] == v for k, v in s.items()) for s, obj in zip(said, order))
               for order in itertools.permutations(objects))


@torch.no_grad()
def _attribute_zero_shot(clip: CLIP, heldout: data.Scenes, tok: Tokenizer, device, limit: int = 500) -> dict:
    single = [i for i in range(len(heldout)) if int(heldout.n_objects[i]) == 1][:limit]
    images = heldout.images_float()[single].to(device)
    img = clip.encode_image(images)
    acc = {}
    for name, vocab in data.ATTRIBUTES.items():
        values = [v for v in vocab if not tok.unknown_words(v)]  # reserved concepts the CLIP never read stay out
        right = 0
        for row, i in enumerate(single):
            truth = heldout.attributes(i)
            options = [data.template_caption({"objects": [dict(truth["objects"][0], **{name: v})],
                                              "background": truth["background"]}) for v in values]
            scores = img[row] @ clip.encode_text(tok(options).to(device)).T
            right += values[int(scores.argmax())] == truth["objects"][0][name]
        acc[name] = right / len(single)
    return acc


# --- The U-Net. ---------------------------------------------------------------------------------------

@torch.no_grad()
def unet_metrics(pipe, evaluator: Evaluator, heldout: data.Scenes, n: int = 64, guidance_scale: float = 5.0) -> dict:
    """A quick prompt-adherence check of ``pipe`` (a ``TinySD``) on ``n`` held-out one-object captions
    (the full sweep over guidance scales is benchmarks/bench_tiny_sd.py)."""
    captions = [c for c, k in zip(heldout.captions, heldout.n_objects.tolist()) if k == 1][:n]
    images = pipe.generate(captions, num_steps=20, guidance_scale=guidance_scale,
                           generator=torch.Generator().manual_seed(0))
    result = prompt_adherence(images, captions, evaluator)
    sampler = getattr(pipe, "sampler_name", "ddim")  # FlowSD: Euler on the flow ODE
    return {f"adherence_one_object_guidance_{guidance_scale:g}_{sampler}20": result["adherence"],
            "per_attribute": result["per_attribute"], "n_captions": len(captions),
            "full_benchmark": "benchmarks/bench_tiny_sd.py --update-card adds the guidance sweep here"}


# --- The ControlNet. ----------------------------------------------------------------------------------

@torch.no_grad()
def control_metrics(pipe, controlnet: ControlNet, heldout: data.Scenes, evaluator=None, conditioning_scale: float = 1.0,
                    num_steps: int = 20, guidance_scale: float = 5.0, seed: int = 0, batch: int = 64,
                    controls: torch.Tensor | None = None, with_baseline: bool = True) -> dict:
    """Generate every held-out caption with its own edges as control, and without control; score both.

    pipe: a ``TinySD``. The same starting noise for both, so the only difference is the control. Edge
    adherence: ``edges.edge_f1`` between the control and the Canny edges of the generated image
    (tolerance EDGE_TOLERANCE px), and the same with the data set's own edge definition
    (``edges.quantised_edges``). Prompt adherence: ``evaluator.prompt_adherence``.
    controls: the control images to use (default: the scenes' own edge maps).
    with_baseline: also generate without control (the "without_control" entry).
    """
    captions = heldout.captions
    control_edges = heldout.edges if controls is None else controls
    noise = torch.randn(pipe.latent_shape(len(captions)), generator=torch.Generator().manual_seed(seed))
    with_c, without = [], []
    for s in range(0, len(captions), batch):
        kw = dict(num_steps=num_steps, guidance_scale=guidance_scale, latents=noise[s:s + batch],
                  generator=torch.Generator().manual_seed(seed + s))
        with_c.append(generate_with_control(pipe, captions[s:s + batch], edges.to_control(control_edges[s:s + batch]),
                                            controlnet, conditioning_scale=conditioning_scale, **kw))
        if with_baseline:
            without.append(pipe.generate(captions[s:s + batch], **kw))
    images = {"with_control": torch.cat(with_c)}
    if with_baseline:
        images["without_control"] = torch.cat(without)
    out = {}
    for name, im in images.items():
        canny = edges.canny_edges(im, sigma=EDGE_SIGMA)
        row = {"edge_f1_canny": edges.edge_f1(canny, heldout.edges, EDGE_TOLERANCE)["f1"].mean().item(),
               "edge_f1_canny_tol2": edges.edge_f1(canny, heldout.edges, 2)["f1"].mean().item(),
               "edge_f1_quantised": edges.edge_f1(edges.quantised_edges(im), heldout.edges,
                                                  EDGE_TOLERANCE)["f1"].mean().item()}
        if evaluator is not None:
            row["prompt_adherence"] = prompt_adherence(im, captions, evaluator)["adherence"]
        out[name] = row
    out["settings"] = {"n_scenes": len(captions), "conditioning_scale": conditioning_scale, "num_steps": num_steps,
                       "sampler": "ddim", "guidance_scale": guidance_scale, "seed": seed,
                       "edge_tolerance_px": EDGE_TOLERANCE, "edge_reader": f"edges.canny_edges(sigma={EDGE_SIGMA})"}
    return out


@torch.no_grad()
def quick_edge_f1(pipe, controlnet: ControlNet, scenes: data.Scenes, num_steps: int = 10, seed: int = 0) -> float:
    """Mean edge F1 (Canny of the image vs the control, EDGE_TOLERANCE px) of ``scenes`` generated with their edges."""
    images = generate_with_control(pipe, scenes.captions, edges.to_control(scenes.edges), controlnet,
                                   num_steps=num_steps, generator=torch.Generator().manual_seed(seed))
    return edges.edge_f1(edges.canny_edges(images, sigma=EDGE_SIGMA), scenes.edges, EDGE_TOLERANCE)["f1"].mean().item()


LAYOUT_ATTRIBUTES = ("position", "size")  # what an edge map shows and a caption can leave unsaid


def unsaid_layout_prompts(scenes: data.Scenes, seed: int = 0) -> tuple[list[str], list[str]]:
    """Prompts that leave each scene's layout to its edge map, and the full truth to score against.

    For every scene: what its caption says (``Scenes.described``) with position and size taken out of
    every object and the background left unsaid, written in ordinary phrasing (``data.caption``, drawn
    from ``seed``); and ``data.template_caption`` of everything true of the scene (``Scenes.attributes``).
    Returns (prompts, truths), one of each per scene.
    """
    rng = random.Random(seed)
    prompts, truths = [], []
    for i in range(len(scenes)):
        said = scenes.described(i)
        unsaid = {"objects": [{k: v for k, v in obj.items() if k not in LAYOUT_ATTRIBUTES} for obj in said["objects"]],
                  "background": None}
        prompts.append(data.caption(unsaid, rng))
        truths.append(data.template_caption(scenes.attributes(i)))
    return prompts, truths


@torch.no_grad()
def unsaid_layout_adherence(pipe, controlnet: ControlNet, scenes: data.Scenes, evaluator: Evaluator,
                            num_steps: int = 20, guidance_scale: float = 5.0, seed: int = 0, batch: int = 64,
                            return_images: bool = False) -> dict:
    """Does the control decide what the caption leaves unsaid? Generate each scene from a prompt without
    position and size (``unsaid_layout_prompts``), with the scene's own edge map as control and, from the
    same noise, without control; score both against the scene's *true* attributes.

    Scores come from ``prompt_adherence(images, truths, evaluator)``: ``per_attribute["position"]`` is the
    fraction of objects whose best-matching object in the image stands in the true 3 x 3 cell, likewise
    size. Without control the model can only guess those; with control the edge map says them.
    Returns {"with_control": {...}, "without_control": {...}, "prompts": [...], "settings": {...}}, each
    row holding position, size (and every other attribute's) adherence, whole-image adherence to the
    truth and the edge F1 (Canny, EDGE_TOLERANCE px); with ``return_images`` also "images": {row: tensor}.
    """
    prompts, truths = unsaid_layout_prompts(scenes, seed)
    noise = torch.randn(pipe.latent_shape(len(prompts)), generator=torch.Generator().manual_seed(seed))
    with_c, without = [], []
    for s in range(0, len(prompts), batch):
        kw = dict(num_steps=num_steps, guidance_scale=guidance_scale, latents=noise[s:s + batch],
                  generator=torch.Generator().manual_seed(seed + s))
        with_c.append(generate_with_control(pipe, prompts[s:s + batch], edges.to_control(scenes.edges[s:s + batch]),
                                            controlnet, **kw))
        without.append(pipe.generate(prompts[s:s + batch], **kw))
    images = {"with_control": torch.cat(with_c), "without_control": torch.cat(without)}
    out = {}
    for name, im in images.items():
        truth = prompt_adherence(im, truths, evaluator)
        said = prompt_adherence(im, prompts, evaluator)
        out[name] = {**{a: truth["per_attribute"][a] for a in LAYOUT_ATTRIBUTES},
                     "per_attribute_vs_truth": truth["per_attribute"], "adherence_to_truth": truth["adherence"],
                     "adherence_to_prompt": said["adherence"],
                     "edge_f1_canny": edges.edge_f1(edges.canny_edges(im, sigma=EDGE_SIGMA), scenes.edges,
                                                    EDGE_TOLERANCE)["f1"].mean().item()}
    out["prompts"] = prompts
    out["settings"] = {"n_scenes": len(prompts), "num_steps": num_steps, "sampler": "ddim",
                       "guidance_scale": guidance_scale, "seed": seed, "conditioning_scale": 1.0}
    if return_images:
        out["images"] = images
    return out
