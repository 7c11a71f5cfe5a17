"""course_lib.dit (a tiny DiT with adaLN-Zero) and course_lib.flow (rectified flow, Euler), the latter
checked against diffusers' FlowMatchEulerDiscreteScheduler, the scheduler of SD 3."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from course_lib import dit, flow


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# DiT
# --------------------------------------------------------------------------------------------

def test_dit_block_shapes_and_identity_at_init():
    block = dit.DiTBlock(dim=32, heads=4)
    x = torch.randn(3, 10, 32, generator=gen(1))
    c = torch.randn(3, 32, generator=gen(2))
    out = block(x, c)
    assert out.shape == x.shape
    assert torch.equal(out, x)  # adaLN-Zero: both gates are exactly 0, so the block is the identity


def test_dit_block_stops_being_identity_once_modulation_moves_and_gets_gradients_at_init():
    block = dit.DiTBlock(dim=16, heads=2)
    x = torch.randn(2, 5, 16, generator=gen(1))
    c = torch.randn(2, 16, generator=gen(2))
    block(x, c).square().sum().backward()
    grad = block.adaLN_modulation[-1].weight.grad
    assert grad is not None and grad.abs().sum() > 0  # zero-init weights still learn: the gates get gradient
    with torch.no_grad():
        block.adaLN_modulation[-1].weight.normal_(generator=gen(3))
    assert not torch.allclose(block(x, c), x)


def test_dit_block_rejects_bad_heads():
    with pytest.raises(ValueError, match="divisible"):
        dit.DiTBlock(dim=30, heads=4)


def test_tiny_dit_shapes_zero_output_at_init_and_conditioning():
    config = dit.DiTConfig(image_size=8, in_channels=3, patch_size=2, dim=32, depth=2, heads=4, num_classes=5)
    model = dit.TinyDiT(config)
    x = torch.randn(4, 3, 8, 8, generator=gen(1))
    sigma = torch.rand(4, generator=gen(2))
    out = model(x, sigma, torch.tensor([0, 1, 2, 3]))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(x))  # the final layer starts at zero too
    with torch.no_grad():  # move every zero-initialised layer: labels and sigma now change the output
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.normal_(0, 0.1, generator=gen(3))
        model.final.linear.weight.normal_(0, 0.1, generator=gen(4))
        model.final.adaLN_modulation[-1].weight.normal_(0, 0.1, generator=gen(5))
    a = model(x, sigma, torch.tensor([0, 1, 2, 3]))
    b = model(x, sigma, torch.tensor([4, 4, 4, 4]))
    u = model(x, sigma)  # no labels: the null class
    assert not torch.allclose(a, b) and not torch.allclose(a, u)
    assert not torch.allclose(model(x, sigma * 0.5, torch.tensor([0, 1, 2, 3])), a)


def test_unpatchify_inverts_patchify_layout():
    """With an identity patch embedding and final linear, the token layout must map each patch back in place."""
    config = dit.DiTConfig(image_size=4, in_channels=1, patch_size=2, dim=4, depth=0, heads=1)
    model = dit.TinyDiT(config)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    with torch.no_grad():
        model.patch_embed.weight.copy_(torch.eye(4).reshape(4, 1, 2, 2))  # token d = pixel (d // 2, d % 2) of its patch
        model.patch_embed.bias.zero_()
        model.pos_embed.zero_()
        model.final.linear.weight.copy_(torch.eye(4))
        model.final.linear.bias.zero_()
    model.final.norm = torch.nn.Identity()  # no normalisation, modulation is zero: final layer is the identity map
    assert torch.equal(model(x, torch.zeros(1)), x)


def test_sincos_pos_embed_distinct_rows():
    pe = dit.sincos_pos_embed(4, 16)
    assert pe.shape == (16, 16)
    assert torch.cdist(pe, pe).add(torch.eye(16) * 10).min() > 1e-3


# --------------------------------------------------------------------------------------------
# Rectified flow
# --------------------------------------------------------------------------------------------

def test_interpolate_endpoints_and_velocity():
    x0 = torch.randn(3, 2, 4, generator=gen(1))
    eps = torch.randn(3, 2, 4, generator=gen(2))
    assert torch.equal(flow.interpolate(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(flow.interpolate(x0, eps, torch.ones(3)), eps)
    s = torch.tensor([0.1, 0.5, 0.9])
    h = 1e-3
    numerical = (flow.interpolate(x0, eps, s + h) - flow.interpolate(x0, eps, s - h)) / (2 * h)
    torch.testing.assert_close(numerical, flow.velocity_target(x0, eps), atol=1e-3, rtol=1e-3)


def test_interpolate_equals_diffusers_scale_noise():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(10)
    x0 = torch.randn(1, 4, 8, 8, generator=gen(1))
    eps = torch.randn(1, 4, 8, 8, generator=gen(2))
    for i in (0, 4, 9):
        t = sched.timesteps[i : i + 1]
        ours = flow.interpolate(x0, eps, sched.sigmas[i : i + 1])
        torch.testing.assert_close(ours, sched.scale_noise(x0, t, eps), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flow_sigmas_equal_diffusers(shift, steps):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    ours = flow.flow_sigmas(steps, shift)
    torch.testing.assert_close(ours, sched.sigmas, atol=1e-7, rtol=0)
    torch.testing.assert_close(ours[:-1] * 1000, sched.timesteps, atol=1e-4, rtol=0)


def stand_in_model(x, timestep):
    """A fixed nonlinear function of x and the timestep: anything deterministic will do for comparing loops."""
    w = torch.linspace(-1, 1, x[0].numel()).reshape(x.shape[1:])
    t = timestep.reshape(-1, *([1] * (x.dim() - 1))) / 1000
    return torch.tanh(x * w) * (1 + t) - 0.3 * x * t


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 5, 28])
def test_euler_sampler_equals_flow_match_euler_scheduler(shift, steps):
    noise = torch.randn(2, 4, 8, 8, generator=gen(7))
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(stand_in_model(x, t.expand(x.shape[0])), t, x).prev_sample

    ours = flow.euler_sample(lambda z, sigma: stand_in_model(z, sigma * 1000), noise, flow.flow_sigmas(steps, shift))
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_euler_is_exact_in_one_step_for_a_single_data_point():
    """If the data is one point c, the exact velocity is (x - c) / sigma and the paths are straight lines:
    one Euler step from sigma=1 lands exactly on c."""
    c = torch.tensor([[1.5, -2.0]])
    noise = torch.randn(64, 2, generator=gen(3))
    velocity = lambda x, sigma: (x - c) / sigma[:, None]  # noqa: E731
    out = flow.euler_sample(velocity, noise, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out, c.expand(64, 2))
    path = flow.euler_sample(velocity, noise, flow.flow_sigmas(10), return_trajectory=True)
    assert path.shape == (11, 64, 2)
    torch.testing.assert_close(flow.straightness(path), torch.ones(64))


def test_flow_matching_loss_is_zero_for_the_exact_velocity_of_a_point():
    c = torch.tensor([0.5, -1.0])
    x0 = c.expand(32, 2)
    velocity = lambda x, sigma: (x - c) / sigma[:, None]  # noqa: E731
    assert flow.flow_matching_loss(velocity, x0, gen(1)).item() < 1e-9


def test_sample_sigmas_and_errors():
    u = flow.sample_sigmas(10_000, gen(0))
    ln = flow.sample_sigmas(10_000, gen(0), "logit_normal")
    assert 0 <= u.min() and u.max() <= 1 and 0 < ln.min() and ln.max() < 1
    assert (ln - 0.5).abs().mean() < (u - 0.5).abs().mean()  # logit-normal concentrates on the middle
    with pytest.raises(ValueError):
        flow.sample_sigmas(3, gen(0), "cosine")
    with pytest.raises(ValueError):
        flow.flow_sigmas(0)
    with pytest.raises(ValueError):
        flow.shift_sigmas(torch.ones(1), 0.0)
    with pytest.raises(ValueError):
        flow.euler_sample(lambda x, s: x, torch.zeros(1, 2), torch.ones(1))


def test_uniform_sigmas():
    torch.testing.assert_close(flow.uniform_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert flow.uniform_sigmas(4, shift=3.0)[2] == 0.75  # 3 * 0.5 / (1 + 2 * 0.5)
    with pytest.raises(ValueError):
        flow.uniform_sigmas(0)


def test_shift_moves_steps_towards_noise():
    s = torch.linspace(0, 1, 11)
    shifted = flow.shift_sigmas(s, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > s[1:-1]).all()
    torch.testing.assert_close(flow.shift_sigmas(s, 1.0), s)


def test_velocity_mlp_and_ring_shapes():
    x, mode = flow.ring_of_gaussians(100, gen(0), modes=8)
    assert x.shape == (100, 2) and mode.min() >= 0 and mode.max() < 8
    torch.testing.assert_close(x.norm(dim=1).mean(), torch.tensor(2.0), atol=0.1, rtol=0)
    assert flow.VelocityMLP(hidden=16)(x, torch.rand(100, generator=gen(1))).shape == (100, 2)
