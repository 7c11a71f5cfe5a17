"""The VAE: shapes, dtypes, determinism, the scaling factor, and the shipped weights' quality bars."""

import pytest
import torch

from course_lib import data
from course_lib.vae import VAE, LatentDistribution, VAEConfig, compute_scaling_factor, psnr
from course_lib.weights import load_vae

TINY = VAEConfig(block_channels=(8, 8, 16, 16), layers_per_block=1, norm_groups=4)


@pytest.fixture(scope="module")
def shipped():
    return load_vae()


def test_shapes_factor_8_and_48x_reduction():
    vae = VAE(TINY)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    post = vae.encode(x)
    z = post.sample(torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8) and vae.config.downsample_factor == 8
    assert x[0].numel() / z[0].numel() == 48
    assert vae.decode(z).shape == x.shape


def test_dtype_follows_the_model_and_inputs():
    vae = VAE(TINY).double()
    z = vae.encode(torch.zeros(1, 3, 64, 64, dtype=torch.float64)).mode()
    assert z.dtype == torch.float64 and vae.decode(z).dtype == torch.float64


def test_sampling_is_deterministic_under_a_generator():
    post = LatentDistribution(torch.randn(2, 8, 8, 8))
    a = post.sample(torch.Generator().manual_seed(3))
    b = post.sample(torch.Generator().manual_seed(3))
    c = post.sample(torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_kl_is_zero_for_the_prior():
    assert torch.allclose(LatentDistribution(torch.zeros(1, 8, 2, 2)).kl(), torch.zeros(1))


def test_bad_inputs_raise_clear_errors():
    vae = VAE(TINY)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 60, 60))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="one int"):  # one count for every resolution, as in AutoencoderKL
        VAEConfig(block_channels=(8, 8, 8, 8), layers_per_block=(0, 1, 1, 1))
    with pytest.raises(ValueError, match="layers_per_block"):
        VAEConfig(block_channels=(8, 8, 8, 8), layers_per_block=0)


def test_scaling_factor_is_one_over_latent_std():
    torch.manual_seed(0)
    vae = VAE(TINY).eval()
    x = data.generate(64, seed=1).images_float()
    f = compute_scaling_factor(vae, x, generator=torch.Generator().manual_seed(0))
    z = vae.encode(x).sample(torch.Generator().manual_seed(0))
    assert f == pytest.approx(1 / z.std().item(), rel=1e-4)


def test_shipped_vae_meets_its_bars(shipped):
    card = shipped.card
    assert card["metrics"]["psnr_db"] >= 28.0
    # What the evaluator reads from a reconstruction agrees with what it reads from the original (model card, 2,000
    # held-out scenes of one to three objects: shape 91.8%, colour 98.7%, position 99.2%). Whole scenes agree 80%:
    # one misread object in three is enough to differ.
    agree = card["metrics"]["evaluator_agreement"]
    assert agree["shape"] >= 0.9 and agree["colour"] >= 0.97 and agree["position"] >= 0.97, agree
    assert shipped.config.scaling_factor == pytest.approx(card["metrics"]["scaling_factor"])
    x = data.generate(48, seed=7, split="heldout").images_float()
    with torch.no_grad():
        r = shipped.decode(shipped.encode(x).mode())
    assert psnr(r, x).mean().item() >= 28.0
    z = shipped.encode(x).mode() * shipped.config.scaling_factor
    assert 0.6 < z.std().item() < 1.5  # scaled latents have roughly unit spread
