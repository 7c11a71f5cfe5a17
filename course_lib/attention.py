"""Attention, written twice: once fast, once to read. Lesson 2 (cross-attention) explains it.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V                     (Vaswani et al. 2017, eq. 1)

In Stable Diffusion's U-Net the same module does two jobs:

- self-attention: queries, keys and values all come from the image features (every pixel looks
  at every other pixel);
- cross-attention: queries come from the image features, keys and values from the text encoder's
  per-token hidden states (every pixel looks at every word). This is how a prompt steers the image.

Two interchangeable backends compute it:

- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``, the fused kernel real pipelines use;
- ``"math"``: the equation above as explicit matmuls, so a learner can print every intermediate.

They agree to about 1e-6 in float32 (``tests/test_attention.py`` checks 1e-5). The math path can
also hand back the attention probabilities; ``AttentionStore`` collects them from every attention
layer of a model during sampling, which is how lesson 2 draws one attention map per word.

Notation::

    B      batch size              Lq  query length (pixels, H*W)
    heads  attention heads         Lk  key/value length (pixels, or text tokens)
    d      channels per head       C   model channels (= heads * d)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Backend = Literal["sdpa", "math"]
BACKENDS = ("sdpa", "math")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: Backend = "sdpa",
              return_probs: bool = False, causal: bool = False):
    """Scaled dot-product attention over (B, heads, L, d) tensors.

    ``causal=True`` lets query i see keys 0..i only (CLIP's text tower uses this).

    Returns the output (B, heads, Lq, d), or ``(output, probs)`` with probs (B, heads, Lq, Lk)
    when ``return_probs=True`` (that always takes the math path: the fused kernel never
    materialises the probabilities).
    """
    _check_backend(backend)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, heads, L, d); got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if backend == "sdpa" and not return_probs:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, heads, Lq, Lk)
    if causal:
        future = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)  # (Lq, Lk)
        scores = scores.masked_fill(future, float("-inf"))
    probs = scores.softmax(dim=-1)  # each query's weights over the keys sum to 1
    out = torch.matmul(probs, v)  # (B, heads, Lq, d)
    return (out, probs) if return_probs else out


class Attention(nn.Module):
    """Multi-head attention as in SD's U-Net: bias-free Q/K/V projections, a biased output projection.

    ``context=None`` makes it self-attention. ``backend`` picks the path ("sdpa" or "math");
    ``store``, when an ``AttentionStore`` is attached, receives this layer's probabilities.
    ``qkv_bias=True`` gives Q/K/V biases too, as the attention in SD's VAE mid block has.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 4, dim_head: int = 32,
                 qkv_bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.is_cross = context_dim is not None
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, query_dim)
        self.backend: Backend = "sdpa"
        self.store: AttentionStore | None = None
        self.name = ""  # filled in by AttentionStore.attach, e.g. "down_blocks.0.attentions.0...attn2"

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)  # (B, heads, L, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, Lq, query_dim); context: (B, Lk, context_dim) or None. Returns (B, Lq, query_dim)."""
        if self.is_cross and context is None:
            raise ValueError("this is a cross-attention layer: pass the text encoder's hidden states as `context`")
        ctx = x if context is None else context
        q = self._split_heads(self.to_q(x))  # (B, heads, Lq, d)
        k = self._split_heads(self.to_k(ctx))  # (B, heads, Lk, d)
        v = self._split_heads(self.to_v(ctx))  # (B, heads, Lk, d)
        if self.store is not None:
            out, probs = attention(q, k, v, backend="math", return_probs=True)
            edited = self.store.record(self, probs)
            if edited is not None:  # a store that edits attention (prompt_to_prompt.AttentionEdit) returns new probs
                out = torch.matmul(edited, v)  # (B, heads, Lq, d)
        else:
            out = attention(q, k, v, backend=self.backend)
        b, h, n, d = out.shape
        out = out.transpose(1, 2).reshape(b, n, h * d)  # (B, Lq, heads*d)
        return self.to_out(out)


def set_attention_backend(model: nn.Module, backend: Backend) -> nn.Module:
    """Switch every ``Attention`` layer of ``model`` to ``backend`` ("sdpa" or "math"). Returns the model."""
    _check_backend(backend)
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend
    return model


class AttentionStore:
    """Collects attention probabilities from a model's attention layers while it runs.

    >>> with AttentionStore(unet, kind="cross") as store:      # doctest: +SKIP
    ...     images = pipe.generate(["a large red circle in the centre"], generator=g)
    >>> store.maps["down_blocks.0.attentions.0.transformer.attn2"][0].shape   # (B, heads, HW, tokens)

    ``maps`` maps each layer's name to a list with one tensor per forward call (per sampler
    step; with classifier-free guidance the batch holds the unconditional half first). Tensors
    are detached and moved to the CPU. ``kind`` picks "cross", "self" or "all" layers.
    ``record`` returns None here; a subclass whose ``record`` returns a tensor of the same shape
    replaces the layer's probabilities with it (``prompt_to_prompt.AttentionEdit``, lesson 9).
    """

    def __init__(self, model: nn.Module, kind: Literal["cross", "self", "all"] = "cross"):
        if kind not in ("cross", "self", "all"):
            raise ValueError(f"kind must be 'cross', 'self' or 'all', got {kind!r}")
        self.model, self.kind = model, kind
        self.maps: dict[str, list[torch.Tensor]] = {}
        self._layers: list[Attention] = []

    def attach(self) -> "AttentionStore":
        for name, module in self.model.named_modules():
            if isinstance(module, Attention) and (self.kind == "all" or module.is_cross == (self.kind == "cross")):
                module.name, module.store = name, self
                self._layers.append(module)
        if not self._layers:
            raise ValueError(f"the model has no {self.kind} attention layers to record")
        return self

    def detach(self) -> None:
        for module in self._layers:
            module.store = None
        self._layers = []

    def record(self, module: Attention, probs: torch.Tensor) -> None:
        self.maps.setdefault(module.name, []).append(probs.detach().float().cpu())

    def __enter__(self) -> "AttentionStore":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()
