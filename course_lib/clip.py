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

- **Tokeniser.** The text is cut exactly as SD's CLIP cuts it: the real byte-pair encoding
  (``clip_bpe.ClipBPE``, 49,408 entries: lower case, punctuation as its own pieces, contractions,
  sub-word pieces such as "hex" + "agon"). Only the embedding table is smaller: it has one row per
  BPE token that the *training captions* use (65 of them, plus start, end, padding and unknown), not
  49,408 rows (6.3M parameters for words the model never saw). Which BPE ids are kept is part of
  ``CLIPConfig`` (``bpe_ids``), so a model card rebuilds its tokeniser. Words the training captions
  never hold (typos, the reserved "heart", "moon", "brown") become the unknown token, with an
  ``UnknownWordsWarning`` that names them: real CLIP has a row for every word, ours cannot pretend to.
- **Context.** 48 tokens instead of **77** (the captions of three objects need at most 40). A longer
  prompt is cut as SD's pipeline cuts it: start, the first 46 tokens, end, and a warning that names
  the dropped text. Padding uses a separate pad token (id 0), as OpenAI's CLIP code pads with zeros;
  the CLIP that SD 1.x ships pads with its end token instead. The pooled vector is read at the *first*
  end token either way, and causal attention keeps padding from changing any real token.
- **Image tower.** A small CNN instead of a ViT/ResNet-50, and it flattens its last feature
  map instead of pooling it, because our captions talk about *where* things are.
- Sizes: width 128 and 2 layers instead of 768 and 12.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .clip_bpe import PIECES, ClipBPE
from .data import normalise

PAD, BOS, EOS, UNK = "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|unk|>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3  # rows 0-3 of the embedding table; the kept BPE tokens follow
N_SPECIAL = 4
CONTEXT_LENGTH = 48  # tokens per prompt, start and end included (SD's CLIP: 77)
CLIP_BPE_TEXT_IDS = 49406  # BPE ids 0..49405 are text; 49406 and 49407 are CLIP's start and end tokens

# The table that `Tokenizer.from_captions(data.generate(20000, concepts="train").captions)` builds: the BPE ids
# the training captions use (sorted) and their words (data.normalise). Stored here because drawing 20,000
# scenes takes seconds; tests/test_clip.py checks that the captions still give exactly these.
DEFAULT_BPE_IDS = (
    256, 267, 268, 269, 281, 282, 320, 518, 525, 530, 536, 537, 550, 593, 637, 736, 1145, 1155, 1205, 1253, 1274,
    1449, 1470, 1493, 1565, 1579, 1601, 1746, 1823, 1901, 2119, 2442, 2528, 2540, 2699, 2916, 3360, 3417, 3638,
    3694, 3999, 4287, 4481, 4734, 4909, 5046, 5253, 5461, 5496, 5591, 5931, 5994, 6148, 7048, 7067, 7117, 7504,
    8675, 9832, 10709, 11775, 14615, 17111, 20802, 22192)
DEFAULT_KNOWN_WORDS = (
    "a", "against", "along", "an", "and", "at", "backdrop", "background", "big", "black", "blue", "bottom",
    "center", "centre", "circle", "colored", "coloured", "corner", "cross", "cyan", "edge", "gray", "green", "grey",
    "huge", "in", "large", "left", "little", "lower", "medium", "mid", "middle", "on", "one", "orange", "pink",
    "plain", "purple", "red", "right", "ring", "side", "sized", "small", "solid", "square", "star", "striped",
    "stripy", "the", "tiny", "top", "triangle", "upper", "white", "with", "yellow")


class UnknownWordsWarning(UserWarning):
    """A prompt holds words the tiny CLIP never saw in training: they reach the model as the unknown token."""


class PromptTruncatedWarning(UserWarning):
    """A prompt is longer than the context: its end was dropped (diffusers logs the same for SD's 77 tokens)."""


@lru_cache(maxsize=1)
def clip_bpe() -> ClipBPE:
    """CLIP's BPE tokenizer (the shipped vocabulary file, read once: about 0.2 s)."""
    return ClipBPE()


def _check_table(bpe_ids, known_words) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The embedding table's BPE ids and the training words as sorted tuples, or a ValueError."""
    bpe_ids, known_words = tuple(bpe_ids), tuple(known_words)
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < CLIP_BPE_TEXT_IDS for i in bpe_ids):
        raise ValueError(f"bpe_ids must be CLIP BPE text ids (integers 0 to {CLIP_BPE_TEXT_IDS - 1}); "
                         "build them with Tokenizer.from_captions(captions)")
    if list(bpe_ids) != sorted(set(bpe_ids)) or not bpe_ids:
        raise ValueError("bpe_ids must be sorted, without repeats, and not empty; "
                         "build them with Tokenizer.from_captions")
    if not all(isinstance(w, str) and w.isalpha() and w == w.lower() for w in known_words):
        raise ValueError("known_words must be lower-case words (data.normalise of the training captions)")
    if list(known_words) != sorted(set(known_words)):
        raise ValueError("known_words must be sorted, without repeats; build them with Tokenizer.from_captions")
    return bpe_ids, known_words


class Tokenizer:
    """CLIP's byte-pair tokeniser, then a compact id table: one id per BPE token of the training captions.

    >>> tok = Tokenizer()
    >>> tok.decode(tok.encode("A small red circle, top left"))
    'a small red circle , top left'

    Ids: 0 pad, 1 start, 2 end, 3 unknown, then the kept CLIP BPE ids (``bpe_ids``, sorted) in order.
    ``tok(prompts)`` gives (B, context_length) ids: start, text, end, then pad (id 0). The empty prompt ""
    is valid: start, end, padding, the unconditional prompt of classifier-free guidance.

    A word outside ``known_words`` (the training captions' words) makes one ``UnknownWordsWarning`` that names
    it; its BPE pieces outside the table become the unknown id. A prompt longer than ``context_length`` keeps
    its first ``context_length - 2`` tokens and warns (``PromptTruncatedWarning``) with the dropped text.
    ``Tokenizer()`` uses the table of the default ``CLIPConfig``; ``Tokenizer.from_config(clip.config)`` the
    table a trained CLIP was trained with.
    """

    def __init__(self, context_length: int = CONTEXT_LENGTH, bpe_ids: Iterable[int] = DEFAULT_BPE_IDS,
                 known_words: Iterable[str] = DEFAULT_KNOWN_WORDS):
        if not isinstance(context_length, int) or context_length < 3:
            raise ValueError(f"context_length must leave room for start, end and a token (>= 3); got {context_length}")
        self.context_length = context_length
        self.bpe_ids, known = _check_table(bpe_ids, known_words)
        self.known_words = frozenset(known)
        self.bpe = clip_bpe()
        self.compact = {b: N_SPECIAL + i for i, b in enumerate(self.bpe_ids)}  # CLIP BPE id -> row of our table
        # Each id's token as CLIP writes it (CLIPTokenizer.convert_ids_to_tokens): "red</w>" ends a word.
        self.vocab = [PAD, BOS, EOS, UNK] + [self.bpe.decoder[b] for b in self.bpe_ids]
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID
        self.added_tokens: dict[str, int] = {}  # textual inversion's new tokens (add_token), ids after the table
        self._added_pattern = None

    @classmethod
    def from_captions(cls, captions: Iterable[str], context_length: int = CONTEXT_LENGTH) -> "Tokenizer":
        """The tokeniser whose table holds every BPE token and word of ``captions`` (the training captions).
        Deterministic: the kept BPE ids are sorted, so the same captions always give the same ids."""
        bpe, bpe_ids, words = clip_bpe(), set(), set()
        for i, text in enumerate(captions):
            if not isinstance(text, str):
                raise ValueError(f"caption {i} must be a string, got {type(text).__name__}")
            bpe_ids.update(bpe.encode(text))
            words.update(normalise(text))
        if not bpe_ids:
            raise ValueError("from_captions needs captions with some text in them (the training captions)")
        return cls(context_length, sorted(bpe_ids), sorted(words))

    @classmethod
    def from_config(cls, config: "CLIPConfig") -> "Tokenizer":
        """The tokeniser a CLIP with ``config`` reads: its context length and its table."""
        return cls(config.context_length, config.bpe_ids, config.known_words)

    def table(self) -> dict:
        """The fields of ``CLIPConfig`` that hold this tokeniser's table: ``bpe_ids`` and ``known_words``."""
        return {"bpe_ids": self.bpe_ids, "known_words": tuple(sorted(self.known_words))}

    def __len__(self) -> int:
        return len(self.vocab)

    def check_new_token(self, token: str) -> None:
        """A ValueError unless ``token`` can be added: one piece of text without spaces that this tokeniser does not
        already read (a word of the training captions, an added token, or text made only of known BPE pieces)."""
        if not isinstance(token, str) or not token or token != token.strip() or any(c.isspace() for c in token):
            raise ValueError(f"a new token must be a non-empty string without spaces, got {token!r}")
        low = token.lower()
        if low in self.added_tokens:
            raise ValueError(f"the token {token!r} is already added to this tokeniser; choose another name")
        pieces = PIECES.findall(low)
        if low in self.known_words or (pieces and all(p in self.known_words or all(
                i in self.compact for i in self.bpe.encode(p)) for p in pieces)):
            raise ValueError(f"the token {token!r} is already in the tiny CLIP's vocabulary (it reads as "
                             f"{self.decode(self.encode(token)[1:-1])!r}): a new concept needs a new token, "
                             "for example '<my-shape>'")

    def add_token(self, token: str) -> int:
        """Add ``token`` (``check_new_token``) with the next free id, as ``CLIPTokenizer.add_tokens`` does: it is
        matched as a whole before the byte-pair encoding (case-insensitively: CLIP lowercases). Returns its id.
        The text tower needs a row for it too: ``personalize.add_token`` does both."""
        self.check_new_token(token)
        new_id = len(self.vocab)
        self.added_tokens[token.lower()] = new_id
        self.vocab.append(token.lower())
        words = sorted(self.added_tokens, key=len, reverse=True)  # longest first, as Hugging Face's trie matches
        self._added_pattern = re.compile("(" + "|".join(map(re.escape, words)) + ")")
        return new_id

    def _segments(self, text: str) -> list[tuple[str, bool]]:
        """``text`` (lowercased) cut into (segment, is_added_token) pairs."""
        if self._added_pattern is None:
            return [(text, False)]
        parts = self._added_pattern.split(text)
        return [(p, i % 2 == 1) for i, p in enumerate(parts) if p]

    def _encode(self, text) -> tuple[list[int], list[str], str | None]:
        """Ids (start, text, end), the unseen words among the kept tokens, and the dropped text (or None)."""
        if not isinstance(text, str):
            raise ValueError(f"a prompt must be a string, got {type(text).__name__}: pass str or a list of str")
        keep = self.context_length - 2
        units, unseen = [], []  # units: (our id, CLIP BPE id or the added token's text)
        for segment, added in self._segments(text.lower()):
            if added:
                units.append((self.added_tokens[segment], segment))
                continue
            for piece in PIECES.findall(segment):  # CLIP's pieces: words, digits, symbol runs, contractions
                ids = self.bpe.encode(piece)
                if len(units) < keep:  # a piece that starts after the cut is never read: no warning for it
                    seen = piece in self.known_words if piece.isalpha() else all(i in self.compact for i in ids)
                    if not seen and piece not in unseen:
                        unseen.append(piece)
                units += [(self.compact.get(b, self.unk_id), b) for b in ids]
        dropped = None
        if len(units) > keep:
            words, run = [], []
            for _, b in units[keep:]:
                if isinstance(b, str):
                    words += [self.bpe.decode(run).strip(), b] if run else [b]
                    run = []
                else:
                    run.append(b)
            words += [self.bpe.decode(run).strip()] if run else []
            dropped = " ".join(w for w in words if w)
        ids = [i for i, _ in units[:keep]]  # like SD: cut, then add start/end
        return [self.bos_id] + ids + [self.eos_id], unseen, dropped

    def _warn(self, unseen: list[str], dropped: list[str]) -> None:
        if unseen:
            warnings.warn(f"the tiny CLIP never saw these words in training: {', '.join(map(repr, unseen))}; "
                          "it reads them as an unknown token", UnknownWordsWarning, stacklevel=3)
        if dropped:
            warnings.warn("The following part of your input was truncated because the tiny CLIP can only handle "
                          f"sequences up to {self.context_length} tokens: {', '.join(map(repr, dropped))}",
                          PromptTruncatedWarning, stacklevel=3)

    def unknown_words(self, text: str) -> list[str]:
        """The words (and other pieces) of ``text`` that the training captions never held, once each."""
        return self._encode(text)[1]

    def encode(self, text: str) -> list[int]:
        """Start token, the text's ids (unseen BPE pieces -> unknown), end token; at most ``context_length``."""
        ids, unseen, dropped = self._encode(text)
        self._warn(unseen, [dropped] if dropped else [])
        return ids

    def decode(self, ids) -> str:
        """Readable text of ``ids`` (BPE decode: a word end becomes a space); start, end and padding are left out,
        an unknown token reads "<|unk|>"."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        tokens = []
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < len(self.vocab):
                raise ValueError(f"token id {i!r} is not an id of this tokeniser (0 to {len(self.vocab) - 1})")
            if i in (self.pad_id, self.bos_id, self.eos_id):
                continue
            if i >= N_SPECIAL + len(self.bpe_ids):  # an added token: plain text, not BPE symbols
                tokens.append("".join(self.bpe.byte_encoder[b] for b in self.vocab[i].encode("utf-8")) + "</w>")
                continue
            tokens.append(UNK + "</w>" if i == self.unk_id else self.vocab[i])
        text = bytearray(self.bpe.byte_decoder[c] for c in "".join(tokens)).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Prompts -> padded ids, (B, context_length) long. One warning per call names every unseen word."""
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, (list, tuple)):
            raise ValueError(f"prompts must be a string or a list of strings, got {type(texts).__name__}")
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)  # (B, L)
        unseen, dropped = [], []
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"prompt {row} must be a string, got {type(text).__name__}")
            ids, words, cut = self._encode(text)
            out[row, : len(ids)] = torch.tensor(ids)
            unseen += [w for w in words if w not in unseen]
            dropped += [cut] if cut else []
        self._warn(unseen, dropped)
        return out


@dataclass
class CLIPConfig:
    context_length: int = CONTEXT_LENGTH  # tokens per prompt, start and end included (SD's CLIP: 77)
    width: int = 128  # text hidden size = the U-Net's cross-attention context size (SD 1.5: 768)
    layers: int = 2  # text transformer blocks (CLIP ViT-L/14 text tower: 12)
    heads: int = 4  # attention heads in the text tower
    image_channels: tuple = (16, 32, 64, 64)  # image tower CNN widths at 32, 16, 8, 4 pixels
    embed_dim: int = 128  # joint embedding size the contrastive loss compares (CLIP L/14: 768)
    init_temperature: float = 0.07  # the paper's initial softmax temperature (logit scale 1/0.07)
    bpe_ids: tuple = DEFAULT_BPE_IDS  # CLIP BPE ids the training captions use, sorted: embedding rows 4, 5, ...
    known_words: tuple = DEFAULT_KNOWN_WORDS  # the training captions' words (data.normalise); others warn

    def __post_init__(self):
        self.image_channels = tuple(self.image_channels)
        self.bpe_ids, self.known_words = _check_table(self.bpe_ids, self.known_words)
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.context_length < 3:
            raise ValueError("context_length must leave room for start, end and a token (>= 3); "
                             f"got {self.context_length}")

    @property
    def vocab_size(self) -> int:
        """Rows of the token embedding: pad, start, end, unknown, then one per kept BPE id (SD's CLIP: 49,408)."""
        return N_SPECIAL + len(self.bpe_ids)


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
