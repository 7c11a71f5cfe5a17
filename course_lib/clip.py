"""A small CLIP: a text tower and an image tower trained to agree. Lesson 3 (CLIP) explains it.

CLIP (Radford et al. 2021) embeds images and captions into one space. A batch of N image-caption
pairs gives an N x N matrix of cosine similarities; training pushes the diagonal (true pairs) up
and everything else down, with a cross-entropy over rows (image -> which caption?) and over
columns (caption -> which image?), averaged: the *symmetric contrastive loss*. A learnable
temperature (stored as log of the logit scale, starting at 1/0.07 as in the paper) sets how
sharp the softmax is.

Stable Diffusion uses only the text tower, frozen: the U-Net cross-attends to its **per-token
hidden states** (``last_hidden_state``, shape (B, tokens, width)), not to the single pooled
vector. The pooled vector (the hidden state at the end-of-text token) is what the contrastive
loss compares. This file mirrors that split: ``TextEncoder`` returns both.

Where this tiny CLIP differs from the real one, on purpose:

- **Tokeniser.** Real CLIP uses byte-pair encoding (BPE) over a 49,408-entry vocabulary and a
  context of **77 tokens** (anything longer is cut off: SD's famous prompt limit). Our captions
  use a few dozen words, so ``Tokenizer`` is word-level over ``data.caption_vocabulary()`` with
  a context of 32 tokens. Like CLIP it adds start/end tokens and pads to the context length
  (CLIP for SD 1.x pads with the end token; we use a separate pad token).
- **Image tower.** A small CNN instead of a ViT/ResNet-50, and it flattens its last feature
  map instead of pooling it, because our captions talk about *where* things are.
- Sizes: width 128 and 2 layers instead of 768 and 12.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .data import caption_vocabulary

PAD, BOS, EOS, UNK = "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|unk|>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


class Tokenizer:
    """Word-level tokeniser: lower-case, commas as their own token, whitespace split.

    >>> tok = Tokenizer()
    >>> tok.decode(tok.encode("a small red circle, top left"))
    'a small red circle , top left'

    Ids: 0 pad, 1 start, 2 end, 3 unknown, then the words in sorted order. The real CLIP
    tokeniser is BPE with 77 tokens (see the module docstring).
    """

    def __init__(self, context_length: int = 32, words: list[str] | None = None):
        if context_length < 3:
            raise ValueError(f"context_length must leave room for start, end and a word; got {context_length}")
        self.context_length = context_length
        words = sorted(set(words if words is not None else caption_vocabulary() + [","]))
        self.vocab = [PAD, BOS, EOS, UNK] + words
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def __len__(self) -> int:
        return len(self.vocab)

    def split(self, text: str) -> list[str]:
        return text.lower().replace(",", " , ").split()

    def encode(self, text: str) -> list[int]:
        """Start token, word ids (unknown words -> unk), end token; truncated to the context length."""
        if not isinstance(text, str):
            raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
        ids = [self.ids.get(w, self.unk_id) for w in self.split(text)]
        ids = ids[: self.context_length - 2]  # like CLIP: drop what does not fit, keep the end token
        return [self.bos_id] + ids + [self.eos_id]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return " ".join(self.vocab[i] for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id))

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Texts -> padded ids, (B, context_length) long."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = self.encode(t)
            out[i, : len(ids)] = torch.tensor(ids)
        return out


@dataclass
class CLIPConfig:
    vocab_size: int = len(caption_vocabulary()) + 5  # words + comma + pad/start/end/unknown
    context_length: int = 32  # tokens per prompt (real CLIP: 77)
    width: int = 128  # text hidden size = the U-Net's cross-attention context size (SD 1.5: 768)
    layers: int = 2  # text transformer blocks (CLIP ViT-L/14 text tower: 12)
    heads: int = 4  # attention heads in the text tower
    image_channels: tuple = (16, 32, 64, 64)  # image tower CNN widths at 32, 16, 8, 4 pixels
    embed_dim: int = 128  # joint embedding size the contrastive loss compares (CLIP L/14: 768)
    init_temperature: float = 0.07  # the paper's initial softmax temperature (logit scale 1/0.07)

    def __post_init__(self):
        self.image_channels = tuple(self.image_channels)
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")


class TextBlock(nn.Module):
    """Pre-LayerNorm transformer block with causal self-attention (as in CLIP's text tower)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.ln_1(x)).view(b, n, 3, self.heads, c // self.heads)  # (B, L, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, d)
        h = attention(q, k, v, backend=backend, causal=True)  # token i sees tokens 0..i only
        x = x + self.proj(h.transpose(1, 2).reshape(b, n, c))  # (B, L, C)
        return x + self.mlp(self.ln_2(x))


@dataclass
class TextEncoderOutput:
    last_hidden_state: torch.Tensor  # (B, L, width): what SD's U-Net cross-attends to
    pooled: torch.Tensor  # (B, width): the hidden state at the end-of-text token


class TextEncoder(nn.Module):
    """Token ids (B, L) -> per-token hidden states (B, L, width) and a pooled vector (B, width)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        self.blocks = nn.ModuleList(TextBlock(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.final_layer_norm = nn.LayerNorm(cfg.width)

    def forward(self, ids: torch.Tensor, backend: str = "sdpa") -> TextEncoderOutput:
        if ids.dim() != 2 or ids.shape[1] > self.config.context_length:
            raise ValueError(f"token ids must be (B, L<={self.config.context_length}), got {tuple(ids.shape)}")
        if ids.dtype != torch.long:
            raise ValueError(f"token ids must be torch.long, got {ids.dtype}")
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]  # (B, L, width)
        for block in self.blocks:
            x = block(x, backend)
        x = self.final_layer_norm(x)
        # Pool at the first end-of-text token (the real CLIP takes argmax of ids, which is its EOS).
        eos = (ids == EOS_ID).int().argmax(dim=1)  # (B,)
        pooled = x[torch.arange(x.shape[0], device=x.device), eos]  # (B, width)
        return TextEncoderOutput(last_hidden_state=x, pooled=pooled)


class ImageEncoder(nn.Module):
    """Images (B, 3, 64, 64) in [-1, 1] -> a feature vector (B, C*16): strided convs, then flatten."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        layers, cin = [], 3
        for c in cfg.image_channels:
            layers += [nn.Conv2d(cin, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            cin = c
        self.net = nn.Sequential(*layers, nn.Flatten())  # (B, C * 4 * 4)
        self.out_features = cin * 16

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1:] != (3, 64, 64):
            raise ValueError(f"the image tower reads (B, 3, 64, 64) images in [-1, 1], got {tuple(images.shape)}")
        return self.net(images)


class CLIP(nn.Module):
    """Both towers, their projections into the joint space, and the learnable temperature."""

    def __init__(self, config: CLIPConfig | None = None):
        super().__init__()
        self.config = cfg = config or CLIPConfig()
        self.text = TextEncoder(cfg)
        self.image = ImageEncoder(cfg)
        self.text_projection = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        self.image_projection = nn.Linear(self.image.out_features, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Unit-length text embeddings (B, embed_dim)."""
        return F.normalize(self.text_projection(self.text(ids).pooled), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-length image embeddings (B, embed_dim)."""
        return F.normalize(self.image_projection(self.image(images)), dim=-1)

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B_images, B_texts): scaled cosine similarity of every image with every caption."""
        scale = self.logit_scale.exp().clamp(max=100.0)  # CLIP caps the scale at 100
        return scale * self.encode_image(images) @ self.encode_text(ids).T


def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: cross-entropy over rows (image -> caption) and columns (caption -> image)."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels))
