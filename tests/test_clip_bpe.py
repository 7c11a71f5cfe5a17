"""The course's CLIP BPE tokenizer: the real vocabulary, the same ids as the compiled reference
(instant-clip-tokenizer, where installed: it has no wheel for Python 3.13), SD's 77-token rows."""

import random

import numpy as np
import pytest

from course_lib import data
from course_lib.clip_bpe import ClipBPE


@pytest.fixture(scope="module")
def bpe():
    return ClipBPE()


def test_known_ids(bpe):
    assert len(bpe) == 49408 and (bpe.start_of_text(), bpe.end_of_text()) == (49406, 49407)
    ids = bpe.encode("a photorealistic sunset over the ocean, oil painting")
    assert len(ids) == 10 and ids[0] == 320  # "a</w>" is id 320 in CLIP's vocabulary
    assert bpe.decode(bpe.encode("A Red Circle!")) == "a red circle ! "
    assert bpe.encode("don't") == bpe.encode("don") + bpe.encode("'t")  # contractions are their own pieces
    assert len(bpe.encode("2024")) == 4  # digits one by one


def test_rows_of_77_keep_start_and_end(bpe):
    rows = bpe.tokenize_batch(["a red circle", "word " * 100])
    assert rows.shape == (2, 77) and rows.dtype == np.int64
    assert rows[0, 0] == 49406 and rows[0, 4] == 49407 and not rows[0, 5:].any()
    assert rows[1, 0] == 49406 and rows[1, -1] == 49407 and rows[1, 1:-1].tolist() == bpe.encode("word " * 100)[:75]
    with pytest.raises(ValueError, match="context_length"):
        bpe.tokenize_batch(["x"], context_length=2)
    with pytest.raises(ValueError, match="string"):
        bpe.encode(42)


def test_same_ids_as_the_compiled_reference(bpe):
    reference = pytest.importorskip("instant_clip_tokenizer").Tokenizer()
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABC ,.'!?-0123456789éü東🙂\t\n"
    texts = data.generate(200, seed=0).captions + [
        "Hello,  World!!  <|endoftext|> café 123 don't", "Rombach SDXL ½ ² 東京 🙂 naïve", "it's we're I'VE y'all", "",
        "trending on artstation, 8k, HDR!!!"] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    for text in texts:
        assert bpe.encode(text) == reference.encode(text), text
        assert bpe.decode(bpe.encode(text)) == reference.decode(reference.encode(text)), text
    assert np.array_equal(bpe.tokenize_batch(texts[:50]), reference.tokenize_batch(texts[:50]).astype(np.int64))
