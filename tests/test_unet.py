"""The conditional U-Net: shapes, dtypes, timestep handling, determinism, ControlNet hooks."""

import copy

import pytest
import torch

from course_lib.unet import UNet, UNetConfig, timestep_embedding

CFG = UNetConfig(block_channels=(16, 32), layers_per_block=1, heads=2, context_dim=24, time_embed_dim=32, norm_groups=8)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(CFG).eval()


def _inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 9, 24, generator=g)


def test_output_shape_and_dtype(unet):
    x, ctx = _inputs()
    with torch.no_grad():
        out = unet(x, torch.tensor([3, 700]), ctx)
    assert out.shape == x.shape and out.dtype == torch.float32
    net64 = copy.deepcopy(unet).double()
    assert net64(x.double(), 5, ctx.double()).dtype == torch.float64


def test_scalar_timestep_equals_a_batch_of_them(unet):
    x, ctx = _inputs()
    with torch.no_grad():
        assert torch.allclose(unet(x, 500, ctx), unet(x, torch.tensor([500, 500]), ctx), atol=1e-6)


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0, 10]), 16)
    assert e.shape == (2, 16)
    assert torch.allclose(e[0, :8], torch.ones(8)) and torch.allclose(e[0, 8:], torch.zeros(8))


def test_deterministic_and_conditioned(unet):
    x, ctx = _inputs()
    with torch.no_grad():
        a, b = unet(x, 100, ctx), unet(x, 100, ctx)
        c = unet(x, 100, ctx + 1)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_controlnet_residuals_plug_into_every_skip(unet):
    x, ctx = _inputs()
    skips = unet.skip_channels()
    assert skips == [16, 16, 16, 32]
    shapes = unet.skip_shapes(8, 8)
    assert shapes == [(16, 8, 8), (16, 8, 8), (16, 4, 4), (32, 4, 4)]
    zeros = [torch.zeros(2, *shape) for shape in shapes]
    with torch.no_grad():
        plain = unet(x, 10, ctx)
        same = unet(x, 10, ctx, down_block_additional_residuals=zeros,
                    mid_block_additional_residual=torch.zeros(2, 32, 4, 4))
        moved = unet(x, 10, ctx, mid_block_additional_residual=torch.ones(2, 32, 4, 4))
    assert torch.allclose(plain, same, atol=1e-6) and not torch.allclose(plain, moved)
    with pytest.raises(ValueError, match="residuals"):
        unet(x, 10, ctx, down_block_additional_residuals=zeros[:2])
    # the encoder a ControlNet copies
    encoder = copy.deepcopy(torch.nn.ModuleDict({"conv_in": unet.conv_in, "time_embedding": unet.time_embedding,
                                                 "down_blocks": unet.down_blocks, "mid_block": unet.mid_block}))
    assert sum(p.numel() for p in encoder.parameters()) < sum(p.numel() for p in unet.parameters())


def test_bad_inputs_raise_clear_errors(unet):
    x, ctx = _inputs()
    with pytest.raises(ValueError, match="encode"):
        unet(x, 10, None)
    with pytest.raises(ValueError, match="batch mismatch"):
        unet(x, 10, ctx[:1])
    with pytest.raises(ValueError, match="timestep"):
        unet(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match="attention"):
        UNetConfig(block_channels=(16, 32), attention=(True,))
