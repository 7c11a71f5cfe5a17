"""The course's VAE against diffusers' AutoencoderKL with copied weights: what maps computes the same.

Not all of it maps, and no choice of weights can make it (only retraining a VAE in diffusers' layout):
  1. the encoder's stride-2 downsampling convs: diffusers' ``Encoder`` builds ``Downsample2D`` with
     padding 0 and pads (0, 1, 0, 1) before it (not configurable); the course's conv pads 1 on every
     side. Output row i reads input rows 2i..2i+2 there and 2i-1..2i+1 here: the sampling grids are a
     pixel apart, and a 3x3 window cannot be moved by weights. Everything else in the encoder is the
     same computation: with the course's three downsampling convs put in diffusers' place, diffusers'
     encoder gives the course's posterior (mean, log-variance, std, samples, KL) within 1e-5;
  2. the decoder after its first narrowing: the course's conv after each 2x upsample narrows to the
     next level's width (Conv2d(c, c_next)); diffusers' ``Upsample2D`` keeps c and the next
     ``ResnetBlock2D`` narrows, a GroupNorm-SiLU branch plus a 1x1 shortcut that no single 3x3 conv
     equals. Up to that point (conv_in, mid block with attention, the first up blocks) the decoders
     agree within 1e-5; with all block widths equal nothing narrows and the whole decoder agrees.
Where diffusers has one ResnetBlock2D more than the course (one ``layers_per_block`` for all levels; the
decoder one more per level), the extra block is an exact identity (conv2 = 0, so x + 0 = x).
The round trip course -> diffusers -> course is exact on every tensor (the encoder's downsampling
convs are copied too: same tensors, same role).
"""

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from course_lib import data
from course_lib import diffusers_weights as W
from course_lib.vae import VAE, VAEConfig
from course_lib.weights import load_vae

TOL = 1e-5  # absolute, and relative: the shipped VAE's latent means and features reach about 10 (float32 ulp ~1e-6)
EQUAL_WIDTHS = VAEConfig(block_channels=(8, 8, 8, 8), layers_per_block=(0, 1, 2, 1), norm_groups=4)

pytestmark = pytest.mark.usefixtures("one_thread")


class CourseDownsample(nn.Module):
    """Stands in for diffusers' Downsample2D: the course's conv, padded 1 on every side."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, hidden_states, *args, **kwargs):
        return self.conv(hidden_states)


def with_course_downsampling(theirs: AutoencoderKL, vae: VAE) -> AutoencoderKL:
    """diffusers' model with the one encoder part that cannot map, the downsampling, taken from the course."""
    n = vae.config.layers_per_block
    for i, block in enumerate(theirs.encoder.down_blocks[:-1]):
        block.downsamplers[0] = CourseDownsample(vae.encoder.down[i][n[i]])
    return theirs


def randomised(vae: VAE, seed: int) -> VAE:
    """Every weight random (the init leaves some biases at constants), so a misplaced tensor would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return vae.eval()


def scenes(n=4, seed=3):
    return data.generate(n, seed=seed, split="heldout").images_float()  # (n, 3, 64, 64) in [-1, 1]


def assert_same_posterior(ours, theirs: DiagonalGaussianDistribution):
    for name in ("mean", "logvar", "std"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=TOL, rtol=TOL)
    torch.testing.assert_close(ours.mode(), theirs.mode(), atol=TOL, rtol=TOL)
    torch.testing.assert_close(ours.kl(), theirs.kl(), atol=TOL, rtol=TOL)
    torch.testing.assert_close(ours.sample(torch.Generator().manual_seed(4)),
                               theirs.sample(torch.Generator().manual_seed(4)), atol=TOL, rtol=TOL)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def shipped():
    vae = load_vae().eval()
    return vae, W.vae_to_diffusers(vae)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    vae = randomised(VAE(EQUAL_WIDTHS), seed=1)
    return vae, W.vae_to_diffusers(vae)


@torch.no_grad()
def test_equal_widths_whole_decoder_and_exact_round_trip(tiny):
    vae, theirs = tiny
    assert isinstance(theirs, AutoencoderKL)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = vae.decode(z)
    assert ours.std() > 1e-2
    torch.testing.assert_close(theirs.decode(z).sample, ours, atol=TOL, rtol=TOL)
    assert set(W.vae_unmapped(EQUAL_WIDTHS)) == {"encoder.down.0.0", "encoder.down.1.1", "encoder.down.2.2"}
    back = W.vae_from_diffusers(theirs, EQUAL_WIDTHS)  # every course tensor has a counterpart: the config is enough
    assert state_equal(back.state_dict(), vae.state_dict())


@torch.no_grad()
def test_equal_widths_encoder_same_posterior_but_for_the_downsampling(tiny):
    vae, theirs = tiny
    x = scenes()
    as_built = theirs.encode(x).latent_dist
    assert (as_built.mean - vae.encode(x).mean).abs().max() > 1e-3  # diffusers' own padding: a different encoder
    hybrid = with_course_downsampling(W.vae_to_diffusers(vae), vae)
    assert_same_posterior(vae.encode(x), hybrid.encode(x).latent_dist)


@torch.no_grad()
def test_shipped_encoder_same_posterior_but_for_the_downsampling(shipped):
    vae, _ = shipped
    hybrid = with_course_downsampling(W.vae_to_diffusers(vae), vae)
    x = scenes(8)
    assert_same_posterior(vae.encode(x), hybrid.encode(x).latent_dist)


@torch.no_grad()
def test_shipped_decoder_same_up_to_its_first_narrowing(shipped):
    vae, theirs = shipped
    assert vae.config.block_channels == (16, 32, 64, 64)  # narrows after the second upsample: 64 -> 32
    z = vae.encode(scenes(4)).mean
    dec, d = vae.decoder, theirs.decoder
    ours = dec.up[1][0](dec.up[0](dec.mid(dec.conv_in(z))))  # 8x8 -> 16x16, the ResBlock before the narrowing conv
    h = d.up_blocks[0](d.mid_block(d.conv_in(z)))
    for resnet in d.up_blocks[1].resnets:  # the course's ResBlock, then an identity
        h = resnet(h, None)
    assert ours.shape == h.shape == (4, 64, 16, 16)
    torch.testing.assert_close(h, ours, atol=TOL, rtol=TOL)
    # the output layers are the same modules too, fed the same features
    f = torch.randn(2, 16, 64, 64, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(d.conv_out(d.conv_act(d.conv_norm_out(f))),
                               dec.conv_out(nn.functional.silu(dec.norm_out(f))), atol=TOL, rtol=TOL)


@torch.no_grad()
def test_shipped_round_trip_exact_and_what_does_not_map(shipped):
    vae, theirs = shipped
    assert set(W.vae_unmapped(vae.config)) == {
        "encoder.down.0.0", "encoder.down.1.1", "encoder.down.2.1",  # the downsampling convs (copied, not equal)
        "decoder.up.1.2", "decoder.up.2.0", "decoder.up.2.2",  # the first narrowing conv and what follows it
    }
    state = vae.state_dict()
    rows = W.vae_key_map(vae.config)
    mapped = sum(v.numel() for k, v in state.items() if k.rpartition(".")[0] in rows)
    assert mapped / sum(v.numel() for v in state.values()) > 0.9
    back = W.vae_from_diffusers(theirs, vae)
    assert back is not vae and state_equal(back.state_dict(), state)
    with pytest.raises(ValueError, match="base="):
        W.vae_from_diffusers(theirs, vae.config)  # the narrowing convs are not in diffusers' model


def test_a_model_with_terms_the_course_lacks_is_refused(tiny):
    vae, theirs = tiny
    broken = W.vae_to_diffusers(vae)
    with torch.no_grad():
        broken.encoder.mid_block.attentions[0].to_q.bias.fill_(0.1)
    with pytest.raises(ValueError, match="to_q.bias is not zero"):
        W.vae_from_diffusers(broken, EQUAL_WIDTHS)
    identity = "encoder.down_blocks.0.resnets.0.conv2"  # the course has no ResBlock at the top level
    assert torch.count_nonzero(theirs.state_dict()[identity + ".weight"]) == 0
