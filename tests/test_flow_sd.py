"""Lesson 11's flow matching: the 2-D theory (closed-form marginal field against Monte Carlo, score and velocity, the ODE
and the SDE keeping the data distribution, the conditional target training the marginal field), the flow U-Net's
training batch, and FlowSD's sampling loop against diffusers' FlowMatchEulerDiscreteScheduler with guidance."""

import dataclasses

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from course_lib import flow
from course_lib.flow_sd import FlowSD
from course_lib.guidance import guided_model
from course_lib.tiny_sd import load_tiny_sd

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- 2-D theory ---------------------------------------------------------------------------------------------------

def test_marginal_velocity_is_the_conditional_mean_of_eps_minus_x0():
    """The closed form against a Monte Carlo estimate of E[eps - x0 | x_sigma near a point]."""
    m = flow.GaussianMixture2D.ring(modes=4, std=0.3)
    g = gen(1)
    x0 = m.sample(400_000, g).double()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    for sigma, point in ((0.5, [0.5, 0.3]), (0.3, [1.2, -0.2])):
        xs = (1 - sigma) * x0 + sigma * eps
        q = torch.tensor([point], dtype=torch.float64)
        near = (xs - q).norm(dim=1) < 0.05
        assert near.sum() > 200
        mc = (eps - x0)[near].mean(0)
        standard_error = (eps - x0)[near].std(0) / near.sum().sqrt()
        # 4 standard errors, plus what the field changes across the 0.05 window around the point
        assert ((m.velocity(q, sigma)[0] - mc).abs() < 4 * standard_error + 0.05).all()


def test_score_and_velocity_determine_each_other():
    m = flow.GaussianMixture2D.ring()
    x = torch.randn(50, 2, generator=gen(2), dtype=torch.float64)
    for sigma in (0.1, 0.5, 0.9):
        torch.testing.assert_close(flow.score_from_velocity(x, m.velocity(x, sigma), sigma), m.score(x, sigma))


def test_ode_and_sde_with_the_exact_field_reach_the_data_distribution():
    m = flow.GaussianMixture2D.ring()  # radius 2, std 0.12
    noise = torch.randn(3000, 2, generator=gen(3))
    sigmas = flow.uniform_sigmas(200)
    for out in (flow.euler_sample(m.velocity, noise, sigmas), flow.sde_sample(m.velocity, noise, sigmas, 1.0, gen(4))):
        r = out.norm(dim=1)
        assert abs(r.mean().item() - 2.0) < 0.03 and abs(r.std().item() - 0.12) < 0.03
    # the ODE is deterministic, the SDE is not: different noise draws give different samples
    a = flow.sde_sample(m.velocity, noise[:10], sigmas, 1.0, gen(5))
    b = flow.sde_sample(m.velocity, noise[:10], sigmas, 1.0, gen(6))
    assert (a - b).abs().max() > 0.1
    torch.testing.assert_close(flow.sde_sample(m.velocity, noise[:10], sigmas, 0.0, gen(5)),
                               flow.euler_sample(m.velocity, noise[:10], sigmas))


def test_conditional_target_trains_the_marginal_field():
    """A small MLP trained only on eps - x0 ends closer to the marginal field than the field's own size, and much
    closer than the untrained network."""
    m = flow.GaussianMixture2D.ring()
    net, losses = flow.train_velocity_mlp(m, steps=600, batch=256, seed=0)
    untrained = flow.VelocityMLP()
    g = gen(7)
    x = 0.5 * m.sample(2000, g) + 0.5 * torch.randn(2000, 2, generator=g)
    sig = torch.full((2000,), 0.5)
    with torch.no_grad():
        err = (net(x, sig) - m.velocity(x, 0.5)).norm(dim=1).mean()
        err0 = (untrained(x, sig) - m.velocity(x, 0.5)).norm(dim=1).mean()
    assert err < 0.4 * m.velocity(x, 0.5).norm(dim=1).mean() and err < 0.4 * err0
    assert sum(losses[-50:]) / 50 < sum(losses[:50]) / 50


def test_theory_bad_arguments():
    with pytest.raises(ValueError, match="means"):
        flow.GaussianMixture2D(torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="std"):
        flow.GaussianMixture2D(torch.zeros(2, 2), 0.0)
    with pytest.raises(ValueError, match="weights"):
        flow.GaussianMixture2D(torch.zeros(2, 2), 0.1, torch.tensor([0.7, 0.7]))
    with pytest.raises(ValueError, match="churn"):
        flow.sde_sample(lambda x, s: x, torch.zeros(2, 2), flow.uniform_sigmas(2), -1.0, gen())


# --- the flow U-Net's training batch ------------------------------------------------------------------------------

def test_flow_batch_is_the_straight_path_with_logit_normal_sigmas():
    from course_lib.train import EncodedScenes

    n = 64
    enc = EncodedScenes(mean=torch.randn(n, 4, 16, 16, generator=gen(1)), std=torch.zeros(n, 4, 16, 16), scale=0.5,
                        states=torch.randn(3, 5, 8, generator=gen(2)), caption_index=torch.arange(n) % 3,
                        empty=torch.zeros(1, 5, 8))
    idx = torch.arange(n)
    zs, sigma, velocity, context = enc.flow_batch(idx, 0.0, 1.0, 0.0, gen(3))
    z0 = 0.5 * enc.mean
    eps = velocity + z0  # the target is eps - z0
    torch.testing.assert_close(zs, (1 - sigma)[:, None, None, None] * z0 + sigma[:, None, None, None] * eps)
    assert ((sigma > 0) & (sigma < 1)).all()
    assert abs(torch.logit(sigma).mean().item()) < 0.4 and abs(torch.logit(sigma).std().item() - 1) < 0.3
    assert torch.equal(context, enc.states[enc.caption_index])
    _, _, _, dropped = enc.flow_batch(idx, 0.0, 1.0, 1.0, gen(3))
    assert (dropped == 0).all()  # caption dropout 1: every caption is ""


# --- FlowSD against diffusers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flow_sd():
    """The shipped models with the U-Net relabelled as a flow model: any network samples the same way, so the
    loop can be compared without the trained flow weights."""
    sd = load_tiny_sd()
    sd.unet.config = dataclasses.replace(sd.unet.config, prediction_type="flow_prediction")
    return FlowSD.from_models(sd.vae, sd.clip, sd.unet)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 10])
def test_flow_sd_equals_flow_match_euler_scheduler_with_guidance(flow_sd, shift, steps):
    prompts = ["a red circle in the top left", "a large blue square"]
    latents = torch.randn(2, 4, 16, 16, generator=gen(0))
    ours = flow_sd.generate(prompts, num_steps=steps, guidance_scale=4.0, shift=shift, latents=latents,
                            return_latents=True)[1]
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    model = guided_model(flow_sd.unet, flow_sd.encode_prompt(prompts), flow_sd.encode_prompt(["", ""]), 4.0)
    x = latents.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t.expand(2), None), t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_flow_sd_trajectory_uniform_schedule_and_errors(flow_sd):
    images, path = flow_sd.generate("a red circle", num_steps=3, schedule="uniform", return_trajectory=True,
                                    generator=gen(1))
    assert images.shape == (1, 3, 64, 64) and path.shape == (4, 1, 4, 16, 16)
    with pytest.raises(ValueError, match="does not take"):
        flow_sd.generate("a red circle", sampler="ddim")
    with pytest.raises(ValueError, match="schedule"):
        flow_sd.generate("a red circle", schedule="karras")
    with pytest.raises(ValueError, match="guidance_scale"):
        flow_sd.generate("a red circle", guidance_scale=0.5)
    with pytest.raises(ValueError, match="num_steps"):
        flow_sd.generate("a red circle", num_steps=0)
    with pytest.raises(ValueError, match="flow-matching U-Net"):
        FlowSD.from_models(flow_sd.vae, flow_sd.clip, load_tiny_sd().unet).generate("a red circle")


def test_vp_to_flow_puts_a_ddpm_latent_on_the_straight_path():
    x0, eps = torch.randn(2, 3, 4, 4, generator=gen(1)), torch.randn(2, 3, 4, 4, generator=gen(2))
    for ab in (0.9991, 0.5, 0.0047):
        a = torch.tensor(ab)
        x, sigma = flow.vp_to_flow(a.sqrt() * x0 + (1 - a).sqrt() * eps, a)
        torch.testing.assert_close(x, (1 - sigma) * x0 + sigma * eps)
        assert 0 < sigma < 1
