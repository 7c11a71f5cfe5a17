"""The two attention paths (fused SDPA and explicit matmuls) agree; the attention store records maps;
the course's Attention equals diffusers' Attention with the same weights."""

import pytest
import torch

from course_lib.attention import Attention, AttentionStore, attention, set_attention_backend


def _qkv(lq=64, lk=32, b=2, h=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g), torch.randn(b, h, lk, d, generator=g),
            torch.randn(b, h, lk, d, generator=g))


@pytest.mark.parametrize("lq,lk,causal", [(64, 64, False), (64, 32, False), (16, 16, True)])
def test_sdpa_and_math_agree(lq, lk, causal):
    q, k, v = _qkv(lq, lk)
    fast = attention(q, k, v, backend="sdpa", causal=causal)
    slow = attention(q, k, v, backend="math", causal=causal)
    assert fast.shape == slow.shape == (2, 4, lq, 16)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_probabilities_are_a_distribution_and_reproduce_the_output():
    q, k, v = _qkv()
    out, probs = attention(q, k, v, return_probs=True)
    assert probs.shape == (2, 4, 64, 32)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 64), atol=1e-6)
    assert torch.allclose(out, probs @ v, atol=1e-6)


def test_causal_mask_hides_the_future():
    q, k, v = _qkv(8, 8)
    _, probs = attention(q, k, v, backend="math", causal=True, return_probs=True)
    assert torch.all(probs[..., 0, 1:] == 0) and torch.allclose(probs[..., 0, 0], torch.ones(2, 4))


def test_bad_backend_and_shapes_are_rejected():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="B, heads"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="cross-attention"):
        Attention(32, context_dim=16, heads=2, dim_head=16)(torch.randn(1, 4, 32))


def test_whole_unet_agrees_across_backends(tiny_unet):
    unet = tiny_unet
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 24, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        a = set_attention_backend(unet, "sdpa")(x, t, ctx)
        b = set_attention_backend(unet, "math")(x, t, ctx)
    assert torch.allclose(a, b, atol=1e-5)
    set_attention_backend(unet, "sdpa")


def test_attention_store_records_one_map_per_cross_attention_call(tiny_unet):
    unet = tiny_unet
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 24)
    with torch.no_grad():
        plain = unet(x, 5, ctx)
        with AttentionStore(unet, kind="cross") as store:
            recorded = unet(x, 5, ctx)
    assert torch.allclose(plain, recorded, atol=1e-5)  # recording does not change the result
    n_cross = sum(isinstance(m, Attention) and m.is_cross for m in unet.modules())
    assert len(store.maps) == n_cross
    first = store.maps["down_blocks.0.attentions.0.attn2"][0]
    assert first.shape == (2, 2, 64, 7)  # (B, heads, HW, tokens)
    assert torch.allclose(first.sum(-1), torch.ones(2, 2, 64), atol=1e-5)
    assert all(m.store is None for m in unet.modules() if isinstance(m, Attention))  # detached afterwards


def test_matches_diffusers_attention_with_copied_weights():
    from diffusers.models.attention_processor import Attention as DiffusersAttention

    torch.manual_seed(0)
    ours = Attention(32, context_dim=24, heads=4, dim_head=8)
    theirs = DiffusersAttention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8)
    theirs.to_q.weight.data.copy_(ours.to_q.weight)
    theirs.to_k.weight.data.copy_(ours.to_k.weight)
    theirs.to_v.weight.data.copy_(ours.to_v.weight)
    theirs.to_out[0].weight.data.copy_(ours.to_out.weight)
    theirs.to_out[0].bias.data.copy_(ours.to_out.bias)
    x, ctx = torch.randn(2, 16, 32), torch.randn(2, 5, 24)
    with torch.no_grad():
        expected = theirs(x, encoder_hidden_states=ctx)
        for backend in ("sdpa", "math"):
            ours.backend = backend
            assert torch.allclose(ours(x, ctx), expected, atol=1e-5)
