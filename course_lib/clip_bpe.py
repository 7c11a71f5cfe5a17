"""CLIP's byte-pair-encoding tokenizer, as in OpenAI's ``clip/simple_tokenizer.py``: the real vocabulary,
offline, in plain Python (lesson 3).

Stable Diffusion 1.x reads its prompt through CLIP ViT-L/14, whose tokenizer (``transformers.CLIPTokenizer``
in diffusers' pipelines) is byte-level BPE (Sennrich et al. 2016, as in GPT-2):

1. the text is lowercased and cut into pieces by a regular expression: runs of letters, single digits,
   runs of other symbols, and the English contractions 's 't 're 've 'm 'll 'd; whitespace only separates;
2. each piece becomes UTF-8 bytes, each byte a printable stand-in character (``bytes_to_unicode``), and
   its last character gets the word-end marker ``</w>``;
3. the learned merges are applied, highest priority first, until no pair of neighbours can be merged;
   each remaining symbol is one token id.

The vocabulary file ships with the course (``course_lib/vocab/``). ``tests/test_clip_bpe.py`` checks this
tokenizer against the compiled ``instant-clip-tokenizer`` package (the one lesson 3 used first) where that
is installed: it has no wheel for Python 3.13, this file runs everywhere.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex

VOCAB_FILE = Path(__file__).resolve().parent / "vocab" / "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 49,408 ids = 2 x 256 byte symbols + 48,894 merges + 2 specials
# letters, single digits, other symbols, contractions (OpenAI's pattern, without its special-token branch:
# "<|endoftext|>" typed in a prompt is text, as in instant-clip-tokenizer)
PIECES = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Each of the 256 byte values -> a printable character (printable bytes stand for themselves), so that
    the merges can be written as text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


class ClipBPE:
    """CLIP's tokenizer: ``encode`` (ids without the special tokens), ``decode``, ``tokenize_batch``
    (rows of ``context_length`` ids: start, text, end, zero padding), ``start_of_text``, ``end_of_text``."""

    def __init__(self, vocab_file: str | Path = VOCAB_FILE):
        lines = gzip.open(vocab_file, "rt", encoding="utf-8").read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]  # line 0 is a header
        if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{vocab_file} is not CLIP's merge list ({len(merges)} merges, {N_MERGES} expected)")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.ranks = {pair: i for i, pair in enumerate(merges)}  # lower rank = merged first
        self._cache: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.encoder)

    def start_of_text(self) -> int:
        return self.encoder["<|startoftext|>"]

    def end_of_text(self) -> int:
        return self.encoder["<|endoftext|>"]

    def _bpe(self, piece: str) -> list[int]:
        """Token ids of one piece (already mapped to byte characters)."""
        if piece in self._cache:
            return self._cache[piece]
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of the best pair, left to right
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.encoder[s] for s in word]
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` (lowercased), without the start and end tokens."""
        if not isinstance(text, str):
            raise ValueError(f"encode() takes a string, got {type(text).__name__}")
        ids: list[int] = []
        for piece in PIECES.findall(text.lower()):
            ids += self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8")))
        return ids

    def decode(self, ids) -> str:
        """Text for token ids; a word end becomes a space (so decode(encode(t)) is t only up to spacing)."""
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def tokenize_batch(self, texts, context_length: int = 77) -> np.ndarray:
        """(N, context_length) int64 ids: start token, the text's tokens, end token, zeros. A text that is too
        long is cut to its first ``context_length - 2`` tokens; start and end are always there."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3 (start, one token, end), got {context_length}")
        rows = np.zeros((len(texts), context_length), dtype=np.int64)  # (N, context)
        for r, text in enumerate(texts):
            ids = [self.start_of_text()] + self.encode(text)[:context_length - 2] + [self.end_of_text()]
            rows[r, :len(ids)] = ids
        return rows
