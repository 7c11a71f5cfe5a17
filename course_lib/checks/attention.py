"""Checks of cross-attention: one head with a padding mask, and splitting channels into heads.

| id | where | kind |
| --- | --- | --- |
| cross_attention_head | solutions/02_cross_attention_exercises.ipynb | graded exercise |
| attention_heads | notebooks/02_cross_attention.ipynb | check yourself |
"""

from __future__ import annotations

import math

import torch

from course_tools.checking import Exercise, Run

# ==============================================================================================
# Reference implementation
# ==============================================================================================


def cross_attention_head(x: torch.Tensor, context: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor,
                         w_v: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One head: softmax(Q K^T / sqrt(d_head)) V, Q from x, K and V from the context.

    x (B, N, d_model), context (B, L, d_context), w_q (d_model, d_head), w_k and w_v (d_context, d_head),
    mask (B, L) bool, True for tokens to attend to. Returns out (B, N, d_head), weights (B, N, L).
    """
    q = x.double() @ w_q.double()  # (B, N, d)
    k = context.double() @ w_k.double()  # (B, L, d)
    v = context.double() @ w_v.double()  # (B, L, d)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, N, L)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    weights = scores.softmax(dim=-1)  # (B, N, L)
    return weights @ v, weights


# ==============================================================================================
# Exercise: one cross-attention head
# ==============================================================================================
HEAD = Exercise("cross_attention_head", "One cross-attention head", targets=("cross_attention_head",))


def _case(run: Run, k: int, B: int = 2, N: int = 16, L: int = 7, d_model: int = 12, d_ctx: int = 10, d: int = 8):
    x = run.randn(B, N, d_model, k=k)
    context = run.randn(B, L, d_ctx, k=k + 10)
    w_q, w_k, w_v = (run.randn(*s, k=k + 20 + i) / math.sqrt(s[0]) for i, s in
                     enumerate([(d_model, d), (d_ctx, d), (d_ctx, d)]))
    return x, context, w_q, w_k, w_v


def _call(run: Run, learner, args, **kw):
    got = run.call(learner.cross_attention_head, *args, **kw)
    run.expect(isinstance(got, (tuple, list)) and len(got) == 2, "a pair (out, weights)", f"{str(type(got).__name__)}",
               "Return both: out, weights.")
    return got


@HEAD.check("returns out of shape (B, N, d_head) and weights of shape (B, N, L)",
            hint="Queries come from x (one per pixel, N of them), keys and values from the context (one per "
                 "token, L of them).")
def _(run, learner):
    for k, dims in enumerate([dict(), dict(B=3, N=5, L=4, d_model=6, d_ctx=9, d=3)]):
        args = _case(run, k, **dims)
        out, weights = _call(run, learner, args)
        B, N, L, d = args[0].shape[0], args[0].shape[1], args[1].shape[1], args[2].shape[1]
        run.tensor(out, "out", shape=(B, N, d))
        run.tensor(weights, "weights", shape=(B, N, L))


@HEAD.check("each pixel's weights over the words are positive and sum to 1",
            hint="Softmax over the last dim, the tokens: every query distributes its attention over the words.")
def _(run, learner):
    _, weights = _call(run, learner, _case(run, 2))
    w = run.tensor(weights, "weights", shape=(2, 16, 7))
    run.expect(w.min() >= 0, "weights >= 0", f"a minimum of {w.min():.3g}")
    run.close(w.sum(-1), torch.ones(2, 16), "the sum of each row of weights", atol=1e-5, kind="array")


@HEAD.check("out and weights equal softmax(Q Kᵀ / sqrt(d_head)) V", points=3,
            hint="Scale the scores by 1/sqrt(d_head), the size of one head (w_q.shape[1]), before the softmax.")
def _(run, learner):
    for k, dims in enumerate([dict(), dict(B=1, N=64, L=77, d_model=32, d_ctx=24, d=16)]):
        args = _case(run, k + 3, **dims)
        out, weights = _call(run, learner, args)
        want_out, want_w = cross_attention_head(*args)
        run.close(weights, want_w, "weights", rtol=1e-4, atol=1e-6, kind="tensor")
        run.close(out, want_out, "out", rtol=1e-4, atol=1e-5, kind="tensor")


@HEAD.check("Verify: shuffling the words shuffles the weights' columns and leaves out unchanged",
            hint="Attention is a weighted sum over tokens: it has no notion of their order (positions enter "
                 "through the text encoder's position embeddings, not here).")
def _(run, learner):
    x, context, w_q, w_k, w_v = _case(run, 5)
    perm = torch.randperm(context.shape[1], generator=run.generator(6))
    out_a, w_a = _call(run, learner, (x, context, w_q, w_k, w_v))
    out_b, w_b = _call(run, learner, (x, context[:, perm], w_q, w_k, w_v))
    run.close(out_b, out_a, "out with the words shuffled", rtol=1e-4, atol=1e-5, kind="tensor")
    run.close(w_b, w_a[..., perm], "weights with the words shuffled", rtol=1e-4, atol=1e-6, kind="tensor")


@HEAD.check("mask: padding tokens get zero weight and change nothing", points=2,
            hint="Set the scores of masked-out tokens to -inf before the softmax (scores.masked_fill(~mask[:, None, :],"
                 " float('-inf'))); the mask has shape (B, L) and True marks a real token.")
def _(run, learner):
    x, context, w_q, w_k, w_v = _case(run, 7, L=9)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 2:] = False
    out, weights = _call(run, learner, (x, context, w_q, w_k, w_v), mask=mask)
    want_out, want_w = cross_attention_head(x, context, w_q, w_k, w_v, mask)
    run.close(weights, want_w, "weights with a padding mask", rtol=1e-4, atol=1e-6, kind="tensor")
    run.close(out, want_out, "out with a padding mask", rtol=1e-4, atol=1e-5, kind="tensor")
    short, _ = _call(run, learner, (x[:1], context[:1, :5], w_q, w_k, w_v))
    run.close(out[:1], short, "out with padding vs out without the padding tokens", rtol=1e-4, atol=1e-5,
              kind="tensor")


# ==============================================================================================
# Check yourself (notebooks/02_cross_attention.ipynb): splitting channels into heads and merging them back
# ==============================================================================================


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads * d) -> (B, heads, L, d): channels [h*d, (h+1)*d) of every token go to head h."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads * d), the inverse of ``split_heads``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


ATTENTION_HEADS = Exercise("attention_heads", "Check yourself: attention heads", targets=("split_heads", "merge_heads"))


@ATTENTION_HEADS.check("split_heads(x, heads): (B, L, heads*d) -> (B, heads, L, d)",
                       hint="x.view(B, L, heads, d) puts each token's channels into heads; then .transpose(1, 2).")
def _(run, learner):
    for k, (b, n, h, d) in enumerate([(2, 64, 4, 8), (1, 7, 2, 16)]):
        x = run.randn(b, n, h * d, k=k)
        run.tensor(run.call(learner.split_heads, x, h), f"split_heads(<x {(b, n, h * d)}>, {h})", shape=(b, h, n, d))


@ATTENTION_HEADS.check("split_heads gives head h the channels h*d ... (h+1)*d - 1 of every token", points=2,
                       hint="x.view(B, heads, L, d) has the right shape but mixes tokens into heads: reshape to "
                            "(B, L, heads, d) first, then swap the L and heads axes.")
def _(run, learner):
    for k, (b, n, h, d) in enumerate([(2, 64, 4, 8), (3, 5, 3, 2)]):
        x = run.randn(b, n, h * d, k=k + 2)
        got = run.call(learner.split_heads, x, h)
        run.close(got, split_heads(x, h), f"split_heads(<x {(b, n, h * d)}>, {h})", rtol=0, atol=0, kind="tensor")


@ATTENTION_HEADS.check("merge_heads(x): (B, heads, L, d) -> (B, L, heads*d), heads side by side", points=2,
                       hint="x.transpose(1, 2) gives (B, L, heads, d); .reshape(B, L, heads * d) then joins the heads "
                            "(reshape, because the transposed tensor is not contiguous).")
def _(run, learner):
    for k, (b, h, n, d) in enumerate([(2, 4, 64, 8), (1, 3, 5, 2)]):
        x = run.randn(b, h, n, d, k=k + 4)
        got = run.call(learner.merge_heads, x)
        run.close(got, merge_heads(x), f"merge_heads(<x {(b, h, n, d)}>)", rtol=0, atol=0, kind="tensor")


@ATTENTION_HEADS.check("Verify: merge_heads(split_heads(x, heads)) gives x back",
                       hint="The two functions must undo each other exactly.")
def _(run, learner):
    x = run.randn(2, 9, 24, k=6)
    split = run.call(learner.split_heads, x, 6)
    back = run.call(learner.merge_heads, split)
    run.close(back, x, "merge_heads(split_heads(x, 6))", rtol=0, atol=0, kind="tensor")
