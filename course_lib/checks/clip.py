"""Checks of CLIP: the contrastive loss, the fixed 77-token context and zero-shot matching.

| id | where | kind |
| --- | --- | --- |
| contrastive_loss | solutions/03_clip_exercises.ipynb | graded exercise |
| clip_context | notebooks/03_clip.ipynb | check yourself |
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
CONTRASTIVE = Exercise("contrastive_loss", "CLIP's contrastive loss", targets=("similarity_logits", "clip_loss"))


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


# ==============================================================================================
# Check yourself (notebooks/03_clip.ipynb): CLIP's 77 tokens and zero-shot probabilities
# ==============================================================================================


def clip_context(ids: list[int], context_length: int = 77, bos: int = 49406, eos: int = 49407,
                 pad: int = 0) -> list[int]:
    """CLIP's fixed-length input: [bos] + ids (cut to context_length - 2) + [eos], padded with ``pad``."""
    body = list(ids)[: context_length - 2]
    out = [bos] + body + [eos]
    return out + [pad] * (context_length - len(out))


def zero_shot_probs(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """For each image, a softmax over the texts of logit_scale x cosine similarity: (B_images, B_texts)."""
    img = torch.nn.functional.normalize(image_emb.double(), dim=-1)
    txt = torch.nn.functional.normalize(text_emb.double(), dim=-1)
    return (logit_scale * img @ txt.T).softmax(dim=-1)


CLIP_CONTEXT = Exercise("clip_context", "Check yourself: CLIP's context and zero-shot matching", targets=("clip_context", "zero_shot_probs"))


@CLIP_CONTEXT.check("clip_context(ids) is [bos] + ids + [eos], padded to 77", points=2,
                    hint="Start token first, end token right after the last id, then the pad id until the list is "
                         "context_length long.")
def _(run, learner):
    rng = run.rng(0)
    for n in (0, 3, int(rng.integers(5, 60))):
        ids = [int(v) for v in rng.integers(300, 49000, size=n)]
        got = run.call(learner.clip_context, ids, label=f"clip_context(<{n} ids>)")
        run.equal(got if not isinstance(got, torch.Tensor) else got.tolist(), clip_context(ids),
                  f"clip_context(<{n} ids>)")


@CLIP_CONTEXT.check("a prompt too long is cut to bos + 75 ids + eos; other lengths, end and pad ids work", points=2,
                    hint="Keep ids[:context_length - 2]: the end token must survive truncation, because the text tower "
                         "pools at it.")
def _(run, learner):
    rng = run.rng(1)
    for n, kw in ((75, {}), (76, {}), (int(rng.integers(80, 200)), {}),
                  (int(rng.integers(10, 60)), {"context_length": 48, "bos": 1, "eos": 2, "pad": 0}),
                  (3, {"pad": 49407})):
        ids = [int(v) for v in rng.integers(300, 49000, size=n)]
        got = run.call(learner.clip_context, ids, **kw, label=f"clip_context(<{n} ids>{''.join(f', {k}={v}' for k, v in kw.items())})")
        got = got.tolist() if isinstance(got, torch.Tensor) else got
        run.equal(got, clip_context(ids, **kw), f"clip_context(<{n} ids>, {kw or 'defaults'})")


@CLIP_CONTEXT.check("zero_shot_probs is a softmax over the texts of logit_scale x cosine similarity", points=2,
                    hint="Normalise both embeddings (F.normalize(x, dim=-1)), logits = logit_scale * image @ text.T, "
                         "softmax over the last dim (the texts).")
def _(run, learner):
    for k, (bi, bt, scale) in enumerate([(4, 5, 100.0), (1, 3, 14.3), (6, 2, 1.0)]):
        img, txt = run.randn(bi, 16, k=k) * 3, run.randn(bt, 16, k=k + 10)
        got = run.call(learner.zero_shot_probs, img, txt, scale)
        run.close(got, zero_shot_probs(img, txt, scale), f"zero_shot_probs(<{bi} images>, <{bt} texts>, {scale})",
                  rtol=1e-4, atol=1e-6, kind="tensor")


@CLIP_CONTEXT.check("Verify: each image's probabilities sum to 1, and a longer embedding changes nothing",
                    hint="CLIP compares directions only: normalise inside the function.")
def _(run, learner):
    img, txt = run.randn(3, 8, k=20), run.randn(4, 8, k=21)
    p = run.tensor(run.call(learner.zero_shot_probs, img, txt, 50.0), "zero_shot_probs(...)", shape=(3, 4))
    run.close(p.sum(-1), torch.ones(3), "the sum of each row", atol=1e-5, kind="array")
    q = run.call(learner.zero_shot_probs, img * 7.0, txt * 0.5, 50.0)
    run.close(q, p, "zero_shot_probs with longer image and shorter text embeddings", rtol=1e-4, atol=1e-6)
