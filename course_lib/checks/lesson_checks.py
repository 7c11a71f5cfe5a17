"""The "check yourself" cells of lessons 1 to 3: short exercises inside the lessons themselves.

A lesson's check cell calls::

    from course_lib.checks.lesson_checks import check_yourself
    check_yourself("lesson01", scaling_factor, snr_db)

which runs the lesson's `Exercise` (``course_tools.checking``) on the learner's functions with seeded
cases and shows the usual table of checks. Each exercise keeps its own reference implementation
here, computed in float64.

| lesson | id | what the learner writes |
| --- | --- | --- |
| notebooks/01_vae_latent_space.ipynb | l01_scaling | ``scaling_factor(latents)``, ``snr_db(alpha_bar, latent_std)`` |
| notebooks/02_cross_attention.ipynb | l02_heads | ``split_heads(x, heads)``, ``merge_heads(x)`` |
| notebooks/03_clip.ipynb | l03_clip | ``clip_context(ids, ...)``, ``zero_shot_probs(image_emb, text_emb, logit_scale)`` |
"""

from __future__ import annotations

import math
from typing import Any

import torch

from course_tools.checking import Exercise, ExerciseResult, run_in_notebook

# ==============================================================================================
# Reference implementations
# ==============================================================================================


def scaling_factor(latents: torch.Tensor) -> float:
    """1 / standard deviation of all the latents' elements (how SD's 0.18215 was found)."""
    return float(1.0 / latents.double().std())


def snr_db(alpha_bar: torch.Tensor, latent_std: float) -> torch.Tensor:
    """SNR in dB of sqrt(abar) x0 + sqrt(1 - abar) eps when x0 has standard deviation ``latent_std``."""
    ab = alpha_bar.double()
    return 10 * torch.log10(ab / (1 - ab) * latent_std**2)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads * d) -> (B, heads, L, d): channels [h*d, (h+1)*d) of every token go to head h."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads * d), the inverse of ``split_heads``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


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


# ==============================================================================================
# Lesson 1: the scaling factor and the SNR of unscaled latents
# ==============================================================================================
L01 = Exercise("l01_scaling", "Lesson 1: scaling latents", targets=("scaling_factor", "snr_db"))


@L01.check("scaling_factor(latents) is 1 / the standard deviation of all the latents' elements", points=2,
           hint="Take the std over every element at once (latents.std()), not per channel or per image, and "
                "return 1 / std as a Python float (.item()).")
def _(run, learner):
    for k, (shape, spread, shift) in enumerate([((64, 4, 8, 8), 5.49, 0.0), ((16, 4, 8, 8), 0.7, 0.3),
                                                ((8, 16, 8, 8), 1.3, -0.5)]):
        z = run.randn(*shape, k=k) * spread + shift
        got = run.call(learner.scaling_factor, z, label=f"scaling_factor(<latents {shape}, std about {spread}>)")
        run.close(got, scaling_factor(z), f"scaling_factor(<latents with std about {spread}>)", rtol=2e-3,
                  kind="number")


@L01.check("Verify: latents * scaling_factor(latents) have standard deviation 1",
           hint="Multiplying by a number multiplies the std by that number: the factor is 1 / std.")
def _(run, learner):
    z = run.randn(32, 4, 8, 8, k=5) * 3.7 + 1.0
    f = run.number(run.call(learner.scaling_factor, z), "scaling_factor(latents)")
    run.close((z.double() * f).std().item(), 1.0, "the std of latents * scaling_factor(latents)", rtol=2e-3)


@L01.check("snr_db(alpha_bar, latent_std) = 10 log10(alpha_bar / (1 - alpha_bar) * latent_std^2)", points=2,
           hint="The signal sqrt(alpha_bar) x0 has power alpha_bar * std^2, the noise sqrt(1 - alpha_bar) eps has "
                "power 1 - alpha_bar; their ratio in dB is 10 log10 of it.")
def _(run, learner):
    from course_lib.schedules import sd_schedule

    ab = sd_schedule().alphas_cumprod.float()
    rng = run.rng(0)
    for std in (1.0, 1 / 0.18215, float(rng.uniform(0.2, 4.0))):
        got = run.call(learner.snr_db, ab, std, label=f"snr_db(<SD's alphas_cumprod>, {std:.4g})")
        run.close(got, snr_db(ab, std), f"snr_db(<SD's alphas_cumprod>, {std:.4g})", rtol=1e-4, atol=1e-3,
                  kind="tensor")


@L01.check("Verify: latents with std s gain 20 log10(s) dB at every timestep",
           hint="log10(x * s^2) = log10(x) + 2 log10(s).")
def _(run, learner):
    ab = torch.linspace(0.999, 0.005, 50)
    s = float(run.rng(1).uniform(2.0, 8.0))
    a = run.tensor(run.call(learner.snr_db, ab, s), f"snr_db(ab, {s:.3g})", shape=(50,))
    b = run.tensor(run.call(learner.snr_db, ab, 1.0), "snr_db(ab, 1.0)", shape=(50,))
    run.close(a - b, torch.full((50,), 20 * math.log10(s)), "snr_db(ab, s) - snr_db(ab, 1)", rtol=1e-4, atol=1e-3,
              kind="array")


# ==============================================================================================
# Lesson 2: splitting channels into heads and merging them back
# ==============================================================================================
L02 = Exercise("l02_heads", "Lesson 2: attention heads", targets=("split_heads", "merge_heads"))


@L02.check("split_heads(x, heads): (B, L, heads*d) -> (B, heads, L, d)",
           hint="x.view(B, L, heads, d) puts each token's channels into heads; then .transpose(1, 2).")
def _(run, learner):
    for k, (b, n, h, d) in enumerate([(2, 64, 4, 8), (1, 7, 2, 16)]):
        x = run.randn(b, n, h * d, k=k)
        run.tensor(run.call(learner.split_heads, x, h), f"split_heads(<x {(b, n, h * d)}>, {h})", shape=(b, h, n, d))


@L02.check("split_heads gives head h the channels h*d ... (h+1)*d - 1 of every token", points=2,
           hint="x.view(B, heads, L, d) has the right shape but mixes tokens into heads: reshape to (B, L, heads, d) "
                "first, then swap the L and heads axes.")
def _(run, learner):
    for k, (b, n, h, d) in enumerate([(2, 64, 4, 8), (3, 5, 3, 2)]):
        x = run.randn(b, n, h * d, k=k + 2)
        got = run.call(learner.split_heads, x, h)
        run.close(got, split_heads(x, h), f"split_heads(<x {(b, n, h * d)}>, {h})", rtol=0, atol=0, kind="tensor")


@L02.check("merge_heads(x): (B, heads, L, d) -> (B, L, heads*d), heads side by side", points=2,
           hint="x.transpose(1, 2) gives (B, L, heads, d); .reshape(B, L, heads * d) then joins the heads "
                "(reshape, because the transposed tensor is not contiguous).")
def _(run, learner):
    for k, (b, h, n, d) in enumerate([(2, 4, 64, 8), (1, 3, 5, 2)]):
        x = run.randn(b, h, n, d, k=k + 4)
        got = run.call(learner.merge_heads, x)
        run.close(got, merge_heads(x), f"merge_heads(<x {(b, h, n, d)}>)", rtol=0, atol=0, kind="tensor")


@L02.check("Verify: merge_heads(split_heads(x, heads)) gives x back",
           hint="The two functions must undo each other exactly.")
def _(run, learner):
    x = run.randn(2, 9, 24, k=6)
    split = run.call(learner.split_heads, x, 6)
    back = run.call(learner.merge_heads, split)
    run.close(back, x, "merge_heads(split_heads(x, 6))", rtol=0, atol=0, kind="tensor")


# ==============================================================================================
# Lesson 3: CLIP's 77 tokens and zero-shot probabilities
# ==============================================================================================
L03 = Exercise("l03_clip", "Lesson 3: CLIP's context and zero-shot matching", targets=("clip_context", "zero_shot_probs"))


@L03.check("clip_context(ids) is [bos] + ids + [eos], padded to 77", points=2,
           hint="Start token first, end token right after the last id, then the pad id until the list is "
                "context_length long.")
def _(run, learner):
    rng = run.rng(0)
    for n in (0, 3, int(rng.integers(5, 60))):
        ids = [int(v) for v in rng.integers(300, 49000, size=n)]
        got = run.call(learner.clip_context, ids, label=f"clip_context(<{n} ids>)")
        run.equal(got if not isinstance(got, torch.Tensor) else got.tolist(), clip_context(ids),
                  f"clip_context(<{n} ids>)")


@L03.check("a prompt too long is cut to bos + 75 ids + eos; other lengths, end and pad ids work", points=2,
           hint="Keep ids[:context_length - 2]: the end token must survive truncation, because the text tower "
                "pools at it.")
def _(run, learner):
    rng = run.rng(1)
    for n, kw in ((75, {}), (76, {}), (int(rng.integers(80, 200)), {}),
                  (int(rng.integers(10, 40)), {"context_length": 32, "bos": 1, "eos": 2, "pad": 0}),
                  (3, {"pad": 49407})):
        ids = [int(v) for v in rng.integers(300, 49000, size=n)]
        got = run.call(learner.clip_context, ids, **kw, label=f"clip_context(<{n} ids>{''.join(f', {k}={v}' for k, v in kw.items())})")
        got = got.tolist() if isinstance(got, torch.Tensor) else got
        run.equal(got, clip_context(ids, **kw), f"clip_context(<{n} ids>, {kw or 'defaults'})")


@L03.check("zero_shot_probs is a softmax over the texts of logit_scale x cosine similarity", points=2,
           hint="Normalise both embeddings (F.normalize(x, dim=-1)), logits = logit_scale * image @ text.T, "
                "softmax over the last dim (the texts).")
def _(run, learner):
    for k, (bi, bt, scale) in enumerate([(4, 5, 100.0), (1, 3, 14.3), (6, 2, 1.0)]):
        img, txt = run.randn(bi, 16, k=k) * 3, run.randn(bt, 16, k=k + 10)
        got = run.call(learner.zero_shot_probs, img, txt, scale)
        run.close(got, zero_shot_probs(img, txt, scale), f"zero_shot_probs(<{bi} images>, <{bt} texts>, {scale})",
                  rtol=1e-4, atol=1e-6, kind="tensor")


@L03.check("Verify: each image's probabilities sum to 1, and a longer embedding changes nothing",
           hint="CLIP compares directions only: normalise inside the function.")
def _(run, learner):
    img, txt = run.randn(3, 8, k=20), run.randn(4, 8, k=21)
    p = run.tensor(run.call(learner.zero_shot_probs, img, txt, 50.0), "zero_shot_probs(...)", shape=(3, 4))
    run.close(p.sum(-1), torch.ones(3), "the sum of each row", atol=1e-5, kind="array")
    q = run.call(learner.zero_shot_probs, img * 7.0, txt * 0.5, 50.0)
    run.close(q, p, "zero_shot_probs with longer image and shorter text embeddings", rtol=1e-4, atol=1e-6)


LESSONS = {"lesson01": L01, "lesson02": L02, "lesson03": L03}


def check_yourself(lesson: str, *objects: Any) -> ExerciseResult:
    """Run a lesson's "check yourself" checks on your functions: shows a table, and stops with a one-line
    error while a check fails."""
    if lesson not in LESSONS:
        raise KeyError(f"no check for {lesson!r}; known: {', '.join(LESSONS)}")
    return run_in_notebook(LESSONS[lesson], objects)
