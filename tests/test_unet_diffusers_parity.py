"""The course's U-Net computes what diffusers' UNet2DConditionModel computes, with copied weights.

``course_lib.diffusers_weights`` holds the config (``unet_diffusers_config``), the key map
(``unet_key_map``) and the copies both ways (``unet_to_diffusers``, ``unet_from_diffusers``). On tiny
random configs and on the shipped weights, with text states from the course's CLIP, the two give the
same eps within 1e-5 in float32, and course -> diffusers -> course gives back the same state dict.
"""

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel

from course_lib import diffusers_weights as W
from course_lib.tiny_sd import load_tiny_sd
from course_lib.unet import UNet, UNetConfig

TOL = 1e-5
CONFIGS = {  # both block kinds, one and two layers, heads != 1, time_embed_dim both 4 * channels and not
    "cross_attention_everywhere": UNetConfig(block_channels=(16, 32), layers_per_block=1, heads=2, context_dim=24,
                                             time_embed_dim=64, norm_groups=8),
    "plain_top_level": UNetConfig(block_channels=(8, 16, 16), layers_per_block=2, attention=(False, True, True),
                                  heads=4, context_dim=12, time_embed_dim=40, norm_groups=4),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def inputs(context_dim, seed=1, b=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, 8, 8, generator=g), torch.tensor([999, 500, 3][:b]),
            torch.randn(b, 7, context_dim, generator=g))


@pytest.fixture(scope="module")
def shipped():
    sd = load_tiny_sd()
    sd.unet.eval()
    return sd


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_tiny_config_same_eps_and_exact_round_trip(name):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    ours = W.unet_to_diffusers(unet)
    assert isinstance(ours, UNet2DConditionModel) and not ours.training
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in ours.parameters())
    x, t, ctx = inputs(cfg.context_dim)
    torch.testing.assert_close(ours(x, t, encoder_hidden_states=ctx).sample, unet(x, t, ctx), atol=TOL, rtol=0)
    back = W.unet_from_diffusers(ours)
    assert back.config == cfg and same_state(back, unet)


@torch.no_grad()
def test_a_diffusers_model_runs_in_the_course_code_and_comes_back_unchanged():
    """The other direction: a UNet2DConditionModel built by diffusers (its own init), into the course's UNet."""
    torch.manual_seed(2)
    theirs = UNet2DConditionModel(**W.unet_diffusers_config(CONFIGS["plain_top_level"])).eval()
    for m in theirs.modules():  # diffusers' transformers build GroupNorm with eps=1e-6: the course's is 1e-5
        if isinstance(m, torch.nn.GroupNorm):
            m.eps = 1e-5
    course = W.unet_from_diffusers(theirs)
    x, t, ctx = inputs(12, seed=3)
    torch.testing.assert_close(course(x, t, ctx), theirs(x, t, encoder_hidden_states=ctx).sample, atol=TOL, rtol=0)
    assert same_state(W.unet_to_diffusers(course), theirs)


@torch.no_grad()
def test_shipped_weights_same_eps_with_text_states(shipped):
    unet = shipped.unet
    ours = W.unet_to_diffusers(unet)
    ctx = shipped.encode_prompt(["a red circle on a blue background", "two green squares", ""])  # (3, L, 128)
    x, t, _ = inputs(128, seed=5)
    eps = unet(x, t, ctx)
    assert eps.abs().mean() > 0.1  # a trained network, not zeros
    torch.testing.assert_close(ours(x, t, encoder_hidden_states=ctx).sample, eps, atol=TOL, rtol=0)
    back = W.unet_from_diffusers(ours, prediction_type=unet.config.prediction_type)
    assert back.config == unet.config and same_state(back, unet)


def test_key_map_is_a_table_over_every_tensor(shipped):
    cfg = shipped.unet.config
    rows = W.unet_key_map(cfg)
    assert rows["time_embedding.0"] == "time_embedding.linear_1"
    assert rows["down_blocks.1.attentions.0.attn1.to_out"] == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert rows["down_blocks.0.resnets.0.conv1"] == "down_blocks.0.resnets.0.conv1"  # the 16x16 level: no attention
    assert rows["mid_block.resnet2.conv1"] == "mid_block.resnets.1.conv1"
    course_modules = {k.rpartition(".")[0] for k in shipped.unet.state_dict()}
    assert set(rows) == course_modules  # one row per module with weights, no more
    assert len(set(rows.values())) == len(rows)  # one-to-one


def test_what_has_no_counterpart_is_refused_clearly():
    with pytest.raises(ValueError, match="ff_mult"):
        W.unet_diffusers_config(dataclasses.replace(CONFIGS["plain_top_level"], ff_mult=2))
    config = dict(W.unet_diffusers_config(CONFIGS["plain_top_level"]), use_linear_projection=False)
    with pytest.raises(ValueError, match="use_linear_projection"):
        W.unet_config_from_diffusers(config)
    config = dict(W.unet_diffusers_config(CONFIGS["plain_top_level"]), attention_head_dim=(2, 4, 4))
    with pytest.raises(ValueError, match="one head count"):
        W.unet_config_from_diffusers(config)
    with pytest.raises(ValueError, match="no row in the key map"):
        W.rename_state_dict({"extra.weight": torch.zeros(1)}, W.unet_key_map(CONFIGS["plain_top_level"]), "UNet")
