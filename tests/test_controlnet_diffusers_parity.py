"""The course's ControlNet computes what diffusers' ControlNetModel computes, and its U-Net takes the residuals
where diffusers' UNet2DConditionModel takes them.

The course's weights go into diffusers' classes through ``course_lib.diffusers_weights``
(``controlnet_to_diffusers``, ``unet_to_diffusers``: the config, the key map ``controlnet_key_map`` and
``load_state_dict(strict=True)``, which already proves the two have the same layers with the same shapes).
Then, with random (non-zero) weights everywhere, both sides give the same residuals, scaled by
conditioning_scale in the same way, and the same U-Net output with them; on the shipped weights too.
The round trip course -> diffusers -> course gives back the same state dict.
"""

import pytest
import torch
from diffusers import ControlNetModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from course_lib import diffusers_weights as W
from course_lib.controlnet import ControlNet, MultiControlNet, load_controlnet
from course_lib.unet import UNet, UNetConfig
from course_lib.weights import load_unet

TOL = 1e-5
CFG = UNetConfig(block_channels=(16, 32), layers_per_block=1, heads=2, context_dim=24, time_embed_dim=64,
                 norm_groups=8, ff_mult=4)  # ControlNetModel fixes time_embed_dim = 4 * block_channels[0], ff_mult = 4
COND_CHANNELS = (8, 8, 16, 32)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


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
    return unet, net, W.unet_to_diffusers(unet), W.controlnet_to_diffusers(net)


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
    d_unet = W.unet_to_diffusers(unet)
    ours = ControlNet.from_unet(unet, conditioning_block_channels=COND_CHANNELS).eval()
    theirs = ControlNetModel.from_unet(d_unet, conditioning_channels=1,
                                       conditioning_embedding_out_channels=COND_CHANNELS).eval()
    # from_unet copies the same encoder weights on both sides
    mine = W.rename_state_dict(ours.state_dict(), W.controlnet_key_map(ours.config), "ControlNet")
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


@torch.no_grad()
def test_round_trip_is_exact_both_ways(models):
    _, net, _, d_net = models
    back = W.controlnet_from_diffusers(d_net)
    assert back.config == net.config and same_state(back, net)
    assert same_state(W.controlnet_to_diffusers(back), d_net)
    rows = W.controlnet_key_map(net.config)
    assert set(rows) == {k.rpartition(".")[0] for k in net.state_dict()}  # one row per module with weights
    assert rows["controlnet_mid_block"] == "controlnet_mid_block" and rows["time_embedding.2"] == "time_embedding.linear_2"


@torch.no_grad()
def test_shipped_weights_same_residuals_and_same_controlled_eps():
    unet, net = load_unet().eval(), load_controlnet().eval()
    d_unet, d_net = W.unet_to_diffusers(unet), W.controlnet_to_diffusers(net)
    g = torch.Generator().manual_seed(7)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([700, 120])  # the shipped VAE's 16x16x4 latents
    ctx = torch.randn(2, 9, unet.config.context_dim, generator=g)
    cond = (torch.rand(2, 1, 64, 64, generator=g) < 0.1).float()
    down, mid = net(x, t, ctx, cond, conditioning_scale=0.9)
    d_down, d_mid = d_net(x, t, encoder_hidden_states=ctx, controlnet_cond=cond, conditioning_scale=0.9,
                          return_dict=False)
    assert mid.abs().max() > 1e-3  # trained zero convs: no longer zero
    for ours, theirs in zip(down, d_down, strict=True):
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
    torch.testing.assert_close(mid, d_mid, atol=TOL, rtol=0)
    eps = unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    d_eps = d_unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=tuple(d_down),
                   mid_block_additional_residual=d_mid).sample
    torch.testing.assert_close(eps, d_eps, atol=TOL, rtol=0)
    back = W.controlnet_from_diffusers(d_net)
    assert back.config == net.config and same_state(back, net)


def test_what_has_no_counterpart_is_refused_clearly():
    odd = ControlNet.from_unet(UNet(UNetConfig(block_channels=(16, 32), heads=2, context_dim=24, time_embed_dim=48)))
    with pytest.raises(ValueError, match=r"4 \* block_channels"):
        W.controlnet_to_diffusers(odd)
    config = dict(W.controlnet_diffusers_config(ControlNet.from_unet(UNet(CFG)).config), global_pool_conditions=True)
    with pytest.raises(ValueError, match="global_pool_conditions"):
        W.controlnet_config_from_diffusers(config)
