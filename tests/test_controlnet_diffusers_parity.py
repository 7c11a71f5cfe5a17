"""The course's ControlNet computes what diffusers' ControlNetModel computes, and its U-Net takes the residuals
where diffusers' UNet2DConditionModel takes them.

Tiny matching configs on both sides; the course's weights are copied into the diffusers models with a
key map (``to_diffusers_keys``) and ``load_state_dict(strict=True)``, which already proves the two have
the same layers with the same shapes. Then, with random (non-zero) weights everywhere, both sides give
the same residuals, scaled by conditioning_scale in the same way, and the same U-Net output with them.
One numerical difference is removed by hand: diffusers' Transformer2DModel builds its GroupNorm with
eps=1e-6, the course's with PyTorch's default 1e-5; the test sets diffusers' to 1e-5.
"""

import re

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from course_lib.controlnet import ControlNet, MultiControlNet
from course_lib.unet import UNet, UNetConfig

TOL = 1e-5
CFG = UNetConfig(block_channels=(16, 32), layers_per_block=1, heads=2, context_dim=24, time_embed_dim=64,
                 norm_groups=8, ff_mult=4)  # diffusers fixes time_embed_dim = 4 * block_channels[0] and ff_mult = 4
COND_CHANNELS = (8, 8, 16, 32)
DIFFUSERS_COMMON = dict(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=24, attention_head_dim=2,
                        norm_num_groups=8, use_linear_projection=True, in_channels=4)  # attention_head_dim = heads (!)

# course name -> diffusers name (applied in order, on dotted state-dict keys)
KEY_MAP = [
    (r"^time_embedding\.0\.", "time_embedding.linear_1."),
    (r"^time_embedding\.2\.", "time_embedding.linear_2."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"\.downsampler\.", ".downsamplers.0.conv."),
    (r"\.upsampler\.", ".upsamplers.0.conv."),
    (r"^mid_block\.resnet1\.", "mid_block.resnets.0."),
    (r"^mid_block\.resnet2\.", "mid_block.resnets.1."),
    (r"^mid_block\.attention\.", "mid_block.attentions.0."),
    (r"(attentions\.\d+)\.(norm[123]|attn[12])\.", r"\1.transformer_blocks.0.\2."),
    (r"\.attn([12])\.to_out\.", r".attn\1.to_out.0."),
    (r"(attentions\.\d+)\.ff\.proj\.", r"\1.transformer_blocks.0.ff.net.0.proj."),
    (r"(attentions\.\d+)\.ff\.out\.", r"\1.transformer_blocks.0.ff.net.2."),
]


def to_diffusers_keys(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for pattern, repl in KEY_MAP:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _same_group_norm_eps(model):
    for m in model.modules():
        if isinstance(m, Transformer2DModel):
            m.norm.eps = 1e-5
    return model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    unet = UNet(CFG).eval()
    net = ControlNet.from_unet(unet, conditioning_channels=1, conditioning_block_channels=COND_CHANNELS).eval()
    with torch.no_grad():  # leave the zero init behind: every weight random, so a misplaced one would show
        for p in list(net.controlnet_down_blocks.parameters()) + list(net.controlnet_mid_block.parameters()) + \
                list(net.controlnet_cond_embedding.conv_out.parameters()):
            p.normal_(0, 0.2)
        for p in net.down_blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the copy drifts from the base, as training makes it
    d_unet = UNet2DConditionModel(sample_size=8, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 2,
                                  up_block_types=("CrossAttnUpBlock2D",) * 2, **DIFFUSERS_COMMON).eval()
    d_net = ControlNetModel(down_block_types=("CrossAttnDownBlock2D",) * 2, conditioning_channels=1,
                            conditioning_embedding_out_channels=COND_CHANNELS, **DIFFUSERS_COMMON).eval()
    d_unet.load_state_dict(to_diffusers_keys(unet.state_dict()), strict=True)
    d_net.load_state_dict(to_diffusers_keys(net.state_dict()), strict=True)
    return unet, net, _same_group_norm_eps(d_unet), _same_group_norm_eps(d_net)


def _inputs(seed=1, b=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.tensor([900, 35][:b])
    ctx = torch.randn(b, 7, 24, generator=g)
    cond = (torch.rand(b, 1, 64, 64, generator=g) < 0.1).float()
    return x, t, ctx, cond


def test_every_tensor_has_its_diffusers_counterpart(models):
    unet, net, d_unet, d_net = models  # the fixture's strict loads are the test; here also the counts
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in d_unet.parameters())
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in d_net.parameters())
    assert len(net.controlnet_down_blocks) == len(d_net.controlnet_down_blocks) == len(unet.skip_channels())


@torch.no_grad()
def test_same_unet_output(models):
    unet, _, d_unet, _ = models
    x, t, ctx, _ = _inputs()
    torch.testing.assert_close(unet(x, t, ctx), d_unet(x, t, encoder_hidden_states=ctx).sample, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("scale", [1.0, 0.35])
@torch.no_grad()
def test_same_residuals_and_same_conditioning_scale(models, scale):
    _, net, _, d_net = models
    x, t, ctx, cond = _inputs()
    down, mid = net(x, t, ctx, cond, conditioning_scale=scale)
    d_down, d_mid = d_net(x, t, encoder_hidden_states=ctx, controlnet_cond=cond, conditioning_scale=scale,
                          return_dict=False)
    assert [r.shape for r in down] == [r.shape for r in d_down]
    for ours, theirs in zip(down, d_down):
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=TOL)
    torch.testing.assert_close(mid, d_mid, atol=TOL, rtol=TOL)
    if scale != 1.0:  # both simply multiply every residual by the scale
        d1, m1 = d_net(x, t, encoder_hidden_states=ctx, controlnet_cond=cond, return_dict=False)
        torch.testing.assert_close(d_mid, scale * m1, atol=TOL, rtol=TOL)
        torch.testing.assert_close(d_down[-1], scale * d1[-1], atol=TOL, rtol=TOL)


@torch.no_grad()
def test_unet_adds_the_residuals_at_the_same_points(models):
    unet, net, d_unet, _ = models
    x, t, ctx, cond = _inputs()
    down, mid = net(x, t, ctx, cond, conditioning_scale=0.8)
    ours = unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    theirs = d_unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=tuple(down),
                    mid_block_additional_residual=mid).sample
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=TOL)
    assert (ours - unet(x, t, ctx)).abs().max() > 1e-2  # the residuals did change the output
    # One residual at a time: each skip connection is the same point on both sides. (diffusers needs the
    # mid residual too, even if zero: down residuals alone are read as a T2I-Adapter's, added elsewhere.)
    zero_mid = torch.zeros_like(mid)
    for k in range(len(down)):
        only_k = [r if i == k else torch.zeros_like(r) for i, r in enumerate(down)]
        a = unet(x, t, ctx, down_block_additional_residuals=only_k, mid_block_additional_residual=zero_mid)
        b = d_unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=tuple(only_k),
                   mid_block_additional_residual=zero_mid).sample
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL, msg=f"skip connection {k}")


@torch.no_grad()
def test_residuals_change_only_the_skips_not_the_down_path(models):
    """In both libraries the residuals are added to the *saved* skip tensors after the down path, so the
    middle block sees the same input with or without them."""
    unet, net, d_unet, _ = models
    x, t, ctx, cond = _inputs()
    down, mid = net(x, t, ctx, cond)
    for model, call in ((unet, lambda r: unet(x, t, ctx, down_block_additional_residuals=r,
                                              mid_block_additional_residual=None if r is None else mid)),
                        (d_unet, lambda r: d_unet(x, t, encoder_hidden_states=ctx,
                                                  down_block_additional_residuals=None if r is None else tuple(r),
                                                  mid_block_additional_residual=None if r is None else mid))):
        seen = []
        hook = model.mid_block.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
        call(None)
        call(down)
        hook.remove()
        assert torch.equal(seen[0], seen[1])


@torch.no_grad()
def test_zero_initialised_controlnets_give_zero_residuals_on_both_sides():
    torch.manual_seed(3)
    unet = UNet(CFG).eval()
    d_unet = UNet2DConditionModel(sample_size=8, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 2,
                                  up_block_types=("CrossAttnUpBlock2D",) * 2, **DIFFUSERS_COMMON).eval()
    d_unet.load_state_dict(to_diffusers_keys(unet.state_dict()))
    ours = ControlNet.from_unet(unet, conditioning_block_channels=COND_CHANNELS).eval()
    theirs = ControlNetModel.from_unet(d_unet, conditioning_channels=1,
                                       conditioning_embedding_out_channels=COND_CHANNELS).eval()
    # from_unet copies the same encoder weights on both sides
    mine = to_diffusers_keys(ours.state_dict())
    for key, value in theirs.state_dict().items():
        if not key.startswith("controlnet_"):
            assert torch.equal(mine[key], value), key
    x, t, ctx, cond = _inputs(seed=4)
    for down, mid in (ours(x, t, ctx, cond), theirs(x, t, encoder_hidden_states=ctx, controlnet_cond=cond,
                                                    return_dict=False)):
        assert all(torch.count_nonzero(r) == 0 for r in down) and torch.count_nonzero(mid) == 0
    assert [tuple(r.shape[1:]) for r in ours(x, t, ctx, cond)[0]] == unet.skip_shapes(8, 8)


@torch.no_grad()
def test_several_controls_sum_with_their_own_scales_like_multicontrolnetmodel(models):
    _, net, _, d_net = models
    x, t, ctx, cond = _inputs()
    cond2 = cond.flip(-1)
    down, mid = MultiControlNet([net, net])(x, t, ctx, [cond, cond2], [0.7, 0.4])
    d_down, d_mid = MultiControlNetModel([d_net, d_net])(x, t, encoder_hidden_states=ctx,
                                                        controlnet_cond=[cond, cond2], conditioning_scale=[0.7, 0.4],
                                                        return_dict=False)
    for ours, theirs in zip(down, d_down):
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=TOL)
    torch.testing.assert_close(mid, d_mid, atol=TOL, rtol=TOL)
