"""The tiny CLIP: tokeniser, towers, contrastive loss, and the shipped model's zero-shot retrieval."""

import pytest
import torch

from course_lib import data
from course_lib.clip import CLIP, CLIPConfig, Tokenizer, contrastive_loss
from course_lib.weights import load_clip

TINY = CLIPConfig(width=32, layers=1, heads=2, embed_dim=16, image_channels=(8, 8, 8, 8))


@pytest.fixture(scope="module")
def shipped():
    return load_clip()


def test_tokeniser_round_trip_and_special_tokens():
    tok = Tokenizer()
    ids = tok.encode("A small red circle, top left")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "a small red circle , top left"
    batch = tok(["a large blue square in the centre", ""])
    assert batch.shape == (2, 32) and batch.dtype == torch.long
    assert batch[1, :3].tolist() == [tok.bos_id, tok.eos_id, tok.pad_id]
    assert tok.encode("a zebra")[2] == tok.unk_id
    long = tok.encode(" ".join(["red"] * 100))
    assert len(long) == 32 and long[-1] == tok.eos_id  # truncated, end token kept
    assert len(tok) == CLIPConfig().vocab_size
    for caption in data.generate(200, seed=3).captions:  # every caption fits and has no unknown word
        ids = tok.encode(caption)
        assert tok.unk_id not in ids and len(ids) <= 32


def test_towers_shapes_and_unit_embeddings():
    clip = CLIP(TINY)
    ids = Tokenizer()(["a small red circle in the top left", "grey"])
    out = clip.text(ids)
    assert out.last_hidden_state.shape == (2, 32, 32) and out.pooled.shape == (2, 32)
    images = torch.zeros(2, 3, 64, 64)
    assert torch.allclose(clip.encode_image(images).norm(dim=-1), torch.ones(2), atol=1e-5)
    assert clip(images, ids).shape == (2, 2)


def test_text_tower_is_causal_and_pools_at_the_end_token():
    torch.manual_seed(0)
    clip = CLIP(TINY).eval()
    tok = Tokenizer()
    a, b = tok(["a small red circle"]), tok(["a small red square"])
    with torch.no_grad():
        ha, hb = clip.text(a), clip.text(b)
    assert torch.allclose(ha.last_hidden_state[:, :4], hb.last_hidden_state[:, :4], atol=1e-6)  # before the change
    assert not torch.allclose(ha.pooled, hb.pooled)
    eos = a[0].tolist().index(tok.eos_id)
    assert torch.allclose(ha.pooled, ha.last_hidden_state[:, eos])


def test_backends_agree_in_the_text_tower():
    clip = CLIP(TINY).eval()
    ids = Tokenizer()(["a small red circle in the top left"])
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
    with pytest.raises(ValueError, match="L<=32"):
        clip.text(torch.zeros(1, 40, dtype=torch.long))


def test_shipped_clip_retrieves_captions_zero_shot(shipped):
    m = shipped.card["metrics"]
    assert m["image_to_text_top1"] >= 0.9 and m["retrieval_batch"] == 64
    held = data.generate(128, seed=11, split="heldout")
    tok = Tokenizer()
    with torch.no_grad():
        img = shipped.encode_image(held.images_float())
        txt = shipped.encode_text(tok(held.captions))
    right = 0
    for s in (0, 64):  # two batches of 64: each image picks one of 64 captions
        best = (img[s:s + 64] @ txt[s:s + 64].T).argmax(1)
        right += sum(data.parse_caption(held.captions[s + j])["objects"] == held.attributes(s + i)["objects"]
                     or j == i for i, j in enumerate(best.tolist()))
    assert right / 128 >= 0.85
