"""Checks for solutions/03_clip_exercises.ipynb: CLIP's contrastive loss.

Lesson: notebooks/03_clip.ipynb (contrastive training, zero-shot matching).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from course_tools.checking import Exercise, Run

# ==============================================================================================
# Reference implementations
# ==============================================================================================


def similarity_logits(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """logit_scale times the cosine similarity of every image with every text: (B_images, B_texts)."""
    img = F.normalize(image_emb.double(), dim=-1)
    txt = F.normalize(text_emb.double(), dim=-1)
    return logit_scale * img @ txt.T


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Symmetric cross-entropy (Radford et al. 2021, fig. 3): image i's caption is text i, and back."""
    logits = similarity_logits(image_emb, text_emb, logit_scale)  # (B, B)
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ==============================================================================================
# Exercise: the contrastive loss
# ==============================================================================================
CONTRASTIVE = Exercise("ex03_contrastive_loss", "CLIP's contrastive loss", targets=("similarity_logits", "clip_loss"))


def _pair(run: Run, k: int, B: int = 8, d: int = 32):
    return run.randn(B, d, k=k), run.randn(B, d, k=k + 10)


@CONTRASTIVE.check("similarity_logits is logit_scale × the cosine similarity of every image with every text",
                   points=2, hint="Normalise both embeddings to unit length along the last dim "
                                  "(F.normalize(x, dim=-1)), then logit_scale * image @ text.T: shape (B_images, B_texts).")
def _(run, learner):
    for k, (B_img, B_txt, scale) in enumerate([(8, 8, 100.0), (5, 3, 14.3)]):
        img, txt = run.randn(B_img, 32, k=k), run.randn(B_txt, 32, k=k + 10)
        got = run.call(learner.similarity_logits, img, txt, scale)
        run.close(got, similarity_logits(img, txt, scale), f"similarity_logits(<{B_img} images>, <{B_txt} texts>, "
                  f"{scale})", rtol=1e-4, atol=1e-4, kind="tensor")


@CONTRASTIVE.check("clip_loss is the mean of the image-to-text and text-to-image cross-entropies", points=3,
                   hint="The right text for image i is text i: labels = torch.arange(B). Average "
                        "F.cross_entropy(logits, labels) and F.cross_entropy(logits.T, labels).")
def _(run, learner):
    for k, (B, scale) in enumerate([(8, 100.0), (4, 1.0), (16, 30.0)]):
        img, txt = _pair(run, k + 2, B=B)
        got = run.call(learner.clip_loss, img, txt, scale)
        run.tensor(got, f"clip_loss(<{B} pairs>, {scale})", shape=())
        run.close(got, clip_loss(img, txt, scale), f"clip_loss(<{B} pairs>, {scale})", rtol=1e-4, atol=1e-5,
                  kind="tensor")


@CONTRASTIVE.check("Verify: swapping images and texts, or rescaling an embedding, leaves the loss unchanged",
                   hint="The loss is symmetric by construction, and it sees only directions: normalise the "
                        "embeddings inside the loss.")
def _(run, learner):
    img, txt = _pair(run, 5)
    base = run.call(learner.clip_loss, img, txt, 50.0)
    swapped = run.call(learner.clip_loss, txt, img, 50.0)
    scales = torch.rand(len(img), 1, generator=run.generator(6)) * 5 + 0.1
    rescaled = run.call(learner.clip_loss, img * scales, txt, 50.0)
    run.close(swapped, base, "clip_loss(texts, images) vs clip_loss(images, texts)", rtol=1e-5, atol=1e-6,
              kind="tensor")
    run.close(rescaled, base, "clip_loss with each image embedding multiplied by a positive number", rtol=1e-4,
              atol=1e-5, kind="tensor")


@CONTRASTIVE.check("Verify: identical embeddings cost log(B); well-separated matching pairs cost about 0",
                   hint="With every logit equal, each row's softmax is uniform over B choices: -log(1/B).")
def _(run, learner):
    B = 8
    same = run.randn(1, 16, k=7).repeat(B, 1)
    run.close(run.call(learner.clip_loss, same, same.clone(), 100.0), math.log(B),
              "clip_loss when all embeddings are equal", rtol=1e-4, kind="number")
    eye = torch.eye(B, 16)
    run.close(run.call(learner.clip_loss, eye, eye * 3.0, 100.0), 0.0,
              "clip_loss for orthogonal, perfectly matched pairs at scale 100", atol=1e-3, kind="number")


@CONTRASTIVE.check("gradients reach both the image and the text embeddings",
                   hint="Compute the loss from the embeddings with torch operations only (no .item(), .numpy() "
                        "or torch.no_grad()).")
def _(run, learner):
    img, txt = _pair(run, 8)
    res = run.vjp(learner.clip_loss, img, txt, 20.0, wrt=[0, 1], grad_output=torch.tensor(1.0))
    ref_img, ref_txt = img.double().requires_grad_(), txt.double().requires_grad_()
    clip_loss(ref_img, ref_txt, 20.0).backward()
    run.close(res["arg_grads"][0], ref_img.grad, "d loss / d image_emb", rtol=1e-3, atol=1e-5, kind="tensor")
    run.close(res["arg_grads"][1], ref_txt.grad, "d loss / d text_emb", rtol=1e-3, atol=1e-5, kind="tensor")
