"""The tiny CLIP: CLIP's BPE tokeniser with a compact table, towers, contrastive loss, the shipped model."""

import warnings

import pytest
import torch

from course_lib import data
from course_lib.clip import (CLIP, CONTEXT_LENGTH, CLIPConfig, PromptTruncatedWarning, Tokenizer, UnknownWordsWarning,
                             contrastive_loss)
from course_lib.clip_bpe import ClipBPE
from course_lib.metrics import _describes
from course_lib.weights import WeightsError, config_from_card, load_clip, read_card

TINY = CLIPConfig(width=32, layers=1, heads=2, embed_dim=16, image_channels=(8, 8, 8, 8))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def training_captions():
    """The captions the default table comes from (the module docstring of clip.py says so)."""
    return data.generate(20000, concepts="train").captions


def encode_quietly(tok, text):
    """Ids of ``text`` and the warnings encoding it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tok.encode(text)
    return ids, caught


# --- The tokeniser. --------------------------------------------------------------------------------------

def test_the_stored_default_table_is_the_training_captions_table(training_captions):
    built = Tokenizer.from_captions(training_captions)
    assert built.table() == Tokenizer().table() == {"bpe_ids": CLIPConfig().bpe_ids,
                                                    "known_words": CLIPConfig().known_words}
    # Every word a training caption can hold is in it, and no reserved concept.
    reserved = set(data.RESERVED_SHAPES + data.RESERVED_COLOURS)
    assert set(built.known_words) == set(data.caption_vocabulary()) - reserved
    assert len(built) == CLIPConfig().vocab_size == 4 + len(built.bpe_ids) < 100  # not CLIP's 49,408 rows


def test_ids_are_clip_bpe_ids_through_the_compact_table(tok):
    bpe = ClipBPE()
    ids = tok.encode("a striped cyan ring, top-left")
    assert [tok.bpe_ids[i - 4] for i in ids[1:-1]] == bpe.encode("a striped cyan ring, top-left")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.vocab[ids[3]] == "cy"  # CLIP's sub-word pieces: "cy" + "an</w>"
    assert tok.decode(ids) == "a striped cyan ring , top - left"
    assert tok.decode(tok.encode("A small red circle, top left")) == "a small red circle , top left"


def test_case_and_punctuation_give_the_same_ids_as_plain_lower_case(tok):
    plain, dotted = tok.encode("a red circle"), tok.encode("A red circle.")
    assert dotted[:-2] == plain[:-1] and dotted[-1] == plain[-1] == tok.eos_id
    assert tok.vocab[dotted[-2]] == ".</w>"  # the only difference: the '.' token
    assert tok.encode("A RED CIRCLE") == plain
    shouted, caught = encode_quietly(tok, "A RED circle!")
    assert not caught and tok.unk_id not in shouted


def test_every_training_caption_encodes_without_warning_within_the_context(tok):
    captions = data.generate(5000, seed=1, concepts="train").captions  # fresh captions, not the table's own
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        batch = tok(captions)
    assert batch.shape == (5000, CONTEXT_LENGTH) and batch.dtype == torch.long
    assert not (batch == tok.unk_id).any()
    assert ((batch == tok.eos_id).sum(1) == 1).all()  # nothing was cut: every row has its end token


def test_unknown_words_warn_once_and_are_named(tok):
    ids, caught = encode_quietly(tok, "a brown circel next to a heart")
    assert len(caught) == 1 and caught[0].category is UnknownWordsWarning
    message = str(caught[0].message)
    for word in ("'brown'", "'circel'", "'next'", "'heart'"):
        assert word in message
    assert "'circle'" not in message and "'a'" not in message
    assert tok.unk_id in ids and tok.decode(ids).startswith("a <|unk|>")
    assert tok.unknown_words("Moon, MOON and a red circle") == ["moon"]
    with pytest.warns(UnknownWordsWarning, match="'heart'") as record:  # a batch: one warning for all prompts
        tok(["a heart", "a red heart", "a blue circle"])
    assert len([w for w in record if w.category is UnknownWordsWarning]) == 1


def test_long_prompts_are_cut_like_sd_and_name_what_was_dropped(tok):
    prompt = " and ".join(["a small red circle in the top left"] * 8) + " and a blue star"
    with pytest.warns(PromptTruncatedWarning, match="truncated.*48 tokens.*blue star"):
        ids = tok.encode(prompt)
    assert len(ids) == CONTEXT_LENGTH and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    with pytest.warns(PromptTruncatedWarning, match="blue star"):
        row = tok([prompt, "a red circle"])[0]
    assert row.tolist() == ids
    long_tok = Tokenizer(context_length=77)
    assert long_tok.encode(prompt)[1:CONTEXT_LENGTH - 1] == ids[1:-1]  # the first 46 tokens


def test_empty_prompt_is_the_unconditional_prompt(tok):
    batch = tok(["", "   "])
    assert batch[:, :3].tolist() == [[tok.bos_id, tok.eos_id, tok.pad_id]] * 2
    assert (batch[:, 2:] == tok.pad_id).all()


def test_table_is_deterministic_and_follows_the_captions():
    captions = data.generate(300, seed=5).captions
    a, b = Tokenizer.from_captions(captions), Tokenizer.from_captions(list(reversed(captions)))
    assert a.table() == b.table() and a.vocab == b.vocab
    with_new = Tokenizer.from_captions(captions + ["a brown heart beside a moon"])
    assert with_new.table() != a.table() and len(with_new) > len(a)
    assert not with_new.unknown_words("a brown heart") and a.unknown_words("a brown heart") == ["brown", "heart"]
    assert list(a.bpe_ids) == sorted(a.bpe_ids)


def test_config_carries_the_table_and_rebuilds_the_tokeniser():
    tok = Tokenizer.from_captions(["a red circle", "a blue square."], context_length=16)
    cfg = CLIPConfig(context_length=16, **tok.table())
    assert cfg.vocab_size == len(tok) == 4 + 6  # specials + a, red, circle, blue, square, '.'
    assert cfg.known_words == ("a", "blue", "circle", "red", "square")
    rebuilt = Tokenizer.from_config(cfg)
    assert rebuilt.table() == tok.table() and rebuilt.context_length == 16
    # A card stores the config as JSON (lists); the config turns them back into tuples.
    card_cfg = config_from_card(CLIPConfig, {"name": "clip", "config": {**cfg.__dict__, "bpe_ids": list(cfg.bpe_ids),
                                                                         "known_words": list(cfg.known_words)}})
    assert card_cfg == cfg
    assert CLIP(cfg).text.token_embedding.weight.shape == (cfg.vocab_size, cfg.width)


def test_bad_input_is_rejected_with_clear_errors(tok):
    for bad in (None, 3, b"a red circle"):
        with pytest.raises(ValueError, match="string"):
            tok.encode(bad)
        with pytest.raises(ValueError, match="string"):
            tok(bad)
    with pytest.raises(ValueError, match="prompt 1 must be a string"):
        tok(["a red circle", None])
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer(context_length=2)
    with pytest.raises(ValueError, match="sorted"):
        Tokenizer(bpe_ids=(320, 256))
    with pytest.raises(ValueError, match="BPE text ids"):
        CLIPConfig(bpe_ids=(49407,))
    with pytest.raises(ValueError, match="some text"):
        Tokenizer.from_captions(["", "  "])
    with pytest.raises(ValueError, match="not an id"):
        tok.decode([len(tok)])
    # A card of the word-level CLIP (vocab_size, no table) cannot be read as a BPE CLIP: a clear error, not garbage.
    old = {"name": "clip", "config": {"vocab_size": 29, "context_length": 32, "width": 128, "layers": 2, "heads": 4}}
    with pytest.raises(WeightsError, match="vocab_size"):
        config_from_card(CLIPConfig, old)


# --- The towers and the loss. ----------------------------------------------------------------------------

def test_towers_shapes_and_unit_embeddings(tok):
    clip = CLIP(TINY)
    ids = tok(["a small red circle in the top left", "grey"])
    out = clip.text(ids)
    assert out.last_hidden_state.shape == (2, CONTEXT_LENGTH, 32) and out.pooled.shape == (2, 32)
    images = torch.zeros(2, 3, 64, 64)
    assert torch.allclose(clip.encode_image(images).norm(dim=-1), torch.ones(2), atol=1e-5)
    assert clip(images, ids).shape == (2, 2)


def test_text_tower_is_causal_and_pools_at_the_end_token(tok):
    torch.manual_seed(0)
    clip = CLIP(TINY).eval()
    a, b = tok(["a small red circle"]), tok(["a small red square"])
    with torch.no_grad():
        ha, hb = clip.text(a), clip.text(b)
    assert torch.allclose(ha.last_hidden_state[:, :4], hb.last_hidden_state[:, :4], atol=1e-6)  # before the change
    assert not torch.allclose(ha.pooled, hb.pooled)
    eos = a[0].tolist().index(tok.eos_id)
    assert torch.allclose(ha.pooled, ha.last_hidden_state[:, eos])


def test_backends_agree_in_the_text_tower(tok):
    clip = CLIP(TINY).eval()
    ids = tok(["a small red circle in the top left"])
    with torch.no_grad():
        assert torch.allclose(clip.text(ids, backend="sdpa").last_hidden_state,
                              clip.text(ids, backend="math").last_hidden_state, atol=1e-5)


def test_contrastive_loss_is_symmetric_and_rewards_the_diagonal():
    logits = torch.randn(8, 8)
    assert contrastive_loss(logits) == pytest.approx(contrastive_loss(logits.T).item())
    assert contrastive_loss(torch.eye(8) * 50) < 1e-6 < contrastive_loss(torch.zeros(8, 8))


def test_bad_token_ids_are_rejected():
    clip = CLIP(TINY)
    with pytest.raises(ValueError, match="long"):
        clip.text(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=f"L<={CONTEXT_LENGTH}"):
        clip.text(torch.zeros(1, CONTEXT_LENGTH + 1, dtype=torch.long))


def test_describes_accepts_exactly_the_captions_true_of_a_scene():
    truth = {"objects": [{"shape": "circle", "colour": "red", "size": "small", "position": "top", "fill": "plain"},
                         {"shape": "star", "colour": "blue", "size": "large", "position": "left", "fill": "striped"}],
             "background": "grey"}
    said = lambda *objects, background=None: {"objects": list(objects), "background": background}  # noqa: E731
    assert _describes(said({"shape": "star"}, {"shape": "circle", "colour": "red"}), truth)  # any order
    assert _describes(said({"shape": "circle"}, {"shape": "star"}, background="grey"), truth)
    assert not _describes(said({"shape": "circle"}), truth)  # an object left out
    assert not _describes(said({"shape": "circle", "colour": "blue"}, {"shape": "star"}), truth)
    assert not _describes(said({"shape": "circle"}, {"shape": "star"}, background="white"), truth)


# --- The shipped model. ----------------------------------------------------------------------------------

def test_shipped_clip_retrieves_captions_zero_shot():
    if "bpe_ids" not in read_card("clip")["config"]:
        pytest.skip("weights/clip.* is the word-level CLIP of the first world: retrain it "
                    "(python -m course_lib.train --only clip) to read BPE ids")
    shipped = load_clip()
    m = shipped.card["metrics"]
    held = data.generate(128, seed=11, split="heldout")
    tok = Tokenizer.from_config(shipped.config)
    with torch.no_grad():
        img = shipped.encode_image(held.images_float())
        txt = shipped.encode_text(tok(held.captions))
    right = 0
    for s in (0, 64):  # two batches of 64: each image picks one of 64 captions
        best = (img[s:s + 64] @ txt[s:s + 64].T).argmax(1)
        right += sum(_describes(held.described(s + j), held.attributes(s + i)) for i, j in enumerate(best.tolist()))
    assert right / 128 >= 0.5 and abs(right / 128 - m["image_to_text_top1"]) < 0.15  # the card's number holds
