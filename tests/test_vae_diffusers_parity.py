"""The course's VAE against diffusers' AutoencoderKL with copied weights: the same network, exactly.

The course's ``Encoder``/``Decoder`` are a miniature of diffusers' ``Encoder``/``Decoder`` module for
module (the same downsampling padding, the same place where widths change, the same number of
ResnetBlock2Ds, GroupNorm eps 1e-6, the 1x1 quant convs), so every tensor has exactly one
counterpart. On random tiny configs and random weights the posterior (mean, log-variance, std, KL,
samples) and the decoded images agree within 1e-5 in float32 (and within 1e-12 in float64: the float32
gap is rounding alone); state dicts go course -> diffusers -> course and back bit for bit; at SD 1.5's
size the course's VAE has SD's parameter count; and a diffusers model with terms the course's VAE
does not compute (SD 3's latent shift, no quant convs, an extra tensor) is refused.
"""

import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn

from course_lib import diffusers_weights as W
from course_lib import lineage
from course_lib.vae import VAE, VAEConfig

TOL = 1e-5  # absolute, and relative: float32 rounding through some 30 layers stays below it
CONFIGS = {
    "widening, 2 per level": VAEConfig(block_channels=(8, 16, 16, 24), layers_per_block=2, norm_groups=4),
    "3 levels, no attention": VAEConfig(block_channels=(8, 8, 16), latent_channels=3, layers_per_block=1,
                                       norm_groups=4, mid_attention=False, scaling_factor=0.5),
}
SEEDS = (0, 1, 2)

pytestmark = pytest.mark.usefixtures("one_thread")


def randomised(cfg: VAEConfig, seed: int) -> VAE:
    """A course VAE with every weight random (the init leaves some biases at constants), so a misplaced
    tensor would show."""
    torch.manual_seed(seed)  # the layers' own initialisation
    vae = VAE(cfg)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return vae.eval()


def images(cfg: VAEConfig, seed: int, n: int = 2, size: tuple = (64, 64)) -> torch.Tensor:
    return torch.rand(n, cfg.in_channels, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(params=[(name, seed) for name in CONFIGS for seed in SEEDS], ids=lambda p: f"{p[0]}-seed{p[1]}")
def pair(request):
    name, seed = request.param
    vae = randomised(CONFIGS[name], seed)
    return vae, W.vae_to_diffusers(vae), seed


def test_key_map_is_one_to_one_and_covers_both_models():
    for cfg in CONFIGS.values():
        ours, theirs = VAE(cfg).state_dict(), AutoencoderKL(**W.vae_diffusers_config(cfg)).state_dict()
        rows = W.vae_key_map(cfg)
        assert len(set(rows.values())) == len(rows)  # no two course modules land on one diffusers module
        assert {k.rpartition(".")[0] for k in ours} == set(rows)  # every row names a course module with weights
        renamed = W.rename_state_dict(ours, rows, "VAE")
        assert renamed.keys() == theirs.keys()  # every diffusers tensor comes from a course tensor
        assert all(renamed[k].shape == theirs[k].shape for k in theirs)


@torch.no_grad()
def test_encoder_gives_the_same_posterior(pair):
    vae, theirs, seed = pair
    for size in ((64, 64), (32, 48)):  # square and not: the (0, 1, 0, 1) padding must match on both axes
        x = images(vae.config, seed, size=size)
        ours, dist = vae.encode(x), theirs.encode(x).latent_dist
        f = vae.config.downsample_factor
        assert ours.mean.shape == (2, vae.config.latent_channels, size[0] // f, size[1] // f)
        assert ours.mean.std() > 1e-2 and ours.logvar.std() > 1e-2  # not a degenerate comparison
        for name in ("mean", "logvar", "std"):
            torch.testing.assert_close(getattr(ours, name), getattr(dist, name), atol=TOL, rtol=TOL)
        torch.testing.assert_close(ours.mode(), dist.mode(), atol=TOL, rtol=TOL)
        torch.testing.assert_close(ours.kl(), dist.kl(), atol=TOL, rtol=TOL)
        torch.testing.assert_close(ours.sample(torch.Generator().manual_seed(4)),
                                   dist.sample(torch.Generator().manual_seed(4)), atol=TOL, rtol=TOL)


@torch.no_grad()
def test_decoder_gives_the_same_images(pair):
    vae, theirs, seed = pair
    z = torch.randn(3, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(seed))
    ours = vae.decode(z)
    assert ours.shape == (3, 3, 8 * vae.config.downsample_factor, 8 * vae.config.downsample_factor)
    assert ours.std() > 1e-2
    torch.testing.assert_close(theirs.decode(z).sample, ours, atol=TOL, rtol=TOL)


@torch.no_grad()
def test_whole_forward_pass_is_the_same(pair):
    """Encode, sample with the same generator, decode. In float64: in float32 the encoder's rounding
    (1e-6) passes through the decoder's gain and the chain can exceed 1e-5 at a few pixels."""
    vae, _, seed = pair
    vae = vae.double()
    theirs = W.vae_to_diffusers(vae)
    x = images(vae.config, seed + 10).double()
    ours, _ = vae(x, torch.Generator().manual_seed(5))
    out = theirs(x, sample_posterior=True, generator=torch.Generator().manual_seed(5)).sample
    assert ours.std() > 1e-2
    torch.testing.assert_close(out, ours, atol=1e-12, rtol=1e-12)


@torch.no_grad()
def test_in_float64_the_gap_is_rounding_alone():
    vae = randomised(CONFIGS["widening, 2 per level"], seed=7).double()
    theirs = W.vae_to_diffusers(vae)
    assert next(theirs.parameters()).dtype == torch.float64
    x = images(vae.config, 7).double()
    torch.testing.assert_close(theirs.encode(x).latent_dist.mean, vae.encode(x).mean, atol=1e-12, rtol=1e-12)
    z = vae.encode(x).mean
    torch.testing.assert_close(theirs.decode(z).sample, vae.decode(z), atol=1e-12, rtol=1e-12)


def test_round_trips_are_exact(pair):
    vae, theirs, _ = pair
    back = W.vae_from_diffusers(theirs)
    assert back is not vae and back.config == vae.config  # scaling factor included
    assert state_equal(back.state_dict(), vae.state_dict())
    assert state_equal(W.vae_to_diffusers(back).state_dict(), theirs.state_dict())
    assert theirs.config.scaling_factor == vae.config.scaling_factor


def test_a_model_built_by_diffusers_converts_and_back():
    torch.manual_seed(3)
    theirs = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                           latent_channels=4, scaling_factor=0.3).eval()
    vae = W.vae_from_diffusers(theirs)
    assert vae.config.block_channels == (8, 16) and vae.config.layers_per_block == 1
    assert vae.config.scaling_factor == pytest.approx(0.3)
    assert state_equal(W.vae_to_diffusers(vae).state_dict(), theirs.state_dict())
    x = images(vae.config, 3, size=(16, 16))
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(x).mean, theirs.encode(x).latent_dist.mean, atol=TOL, rtol=TOL)


def test_at_sd15_size_the_course_vae_is_sd15s_vae():
    sd = lineage.SD15.vae.build()  # AutoencoderKL with SD 1.5's config, on the meta device
    cfg = W.vae_config_from_diffusers(sd.config)
    assert (cfg.block_channels, cfg.layers_per_block, cfg.norm_groups) == ((128, 256, 512, 512), 2, 32)
    with torch.device("meta"):
        ours = VAE(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in sd.parameters())  # 83,653,863
    renamed = W.rename_state_dict(ours.state_dict(), W.vae_key_map(cfg), "VAE")
    theirs = sd.state_dict()
    assert renamed.keys() == theirs.keys() and all(renamed[k].shape == theirs[k].shape for k in theirs)


def test_a_model_with_terms_the_course_lacks_is_refused():
    small = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)
    with pytest.raises(ValueError, match="shift_factor"):  # SD 3 shifts its latents before scaling
        W.vae_from_diffusers(AutoencoderKL(**small, shift_factor=0.0609))
    with pytest.raises(ValueError, match="use_quant_conv"):  # SD 3 drops the 1x1 quant convs
        W.vae_from_diffusers(AutoencoderKL(**small, use_quant_conv=False))
    with pytest.raises(ValueError, match="act_fn"):
        W.vae_from_diffusers(AutoencoderKL(**small, act_fn="gelu"))
    with pytest.raises(ValueError, match="down_block_types"):
        W.vae_from_diffusers(AutoencoderKL(**dict(small, down_block_types=("DownEncoderBlock2D",
                                                                           "AttnDownEncoderBlock2D"))))
    with pytest.raises(ValueError, match="no course counterpart"):  # SD 3's VAE: both of the above
        W.vae_config_from_diffusers(lineage.SD3_MEDIUM.vae.build().config)
    extra = AutoencoderKL(**small)
    extra.encoder.extra_proj = nn.Conv2d(16, 16, 1)  # a tensor no course module holds
    with pytest.raises(ValueError, match="encoder.extra_proj.weight"):
        W.vae_from_diffusers(extra)
