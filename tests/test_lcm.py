"""course_lib.lcm: latent consistency sampling against diffusers' LCMScheduler (its timesteps, boundary scalings and
whole sampling loops, also inside StableDiffusionPipeline around the course's VAE and U-Net), the distillation loss
against the formulas of diffusers' LCM distillation script, and the errors a learner can run into."""

import pytest
import torch
from diffusers import LCMScheduler

from course_lib import lcm
from course_lib.diffusers_bridge import sd_scheduler_config
from course_lib.schedules import sd_schedule
from course_lib.tiny_sd import load_tiny_sd

pytestmark = pytest.mark.usefixtures("one_thread")


def scheduler():
    return LCMScheduler.from_config(sd_scheduler_config())


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 50])
def test_timesteps_equal_lcm_scheduler(steps):
    s = scheduler()
    s.set_timesteps(steps)
    assert lcm.lcm_timesteps(steps).tolist() == s.timesteps.tolist()


def test_four_steps_and_the_distillation_grid():
    assert lcm.lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    grid = lcm.ddim_timesteps()
    assert grid[0] == 19 and grid[-1] == 999 and len(grid) == 50 and (grid.diff() == 20).all()


def test_boundary_scalings_equal_the_scheduler_and_hold_the_boundary():
    s = scheduler()
    for t in (0, 1, 19, 259, 999):
        ours = lcm.boundary_scalings(t)
        theirs = s.get_scalings_for_boundary_condition_discrete(t)
        assert ours[0].item() == pytest.approx(theirs[0], rel=1e-6) and ours[1].item() == pytest.approx(theirs[1], rel=1e-6)
    c_skip, c_out = lcm.boundary_scalings(0)
    assert c_skip == 1 and c_out == 0  # f(z, 0) = z
    z = torch.randn(2, 4, 16, 16)
    assert torch.equal(lcm.consistency_fn(torch.randn_like(z), z, torch.zeros(2, dtype=torch.long), sd_schedule()), z)


def stand_in(x, t):
    w = torch.linspace(-1, 1, x[0].numel()).reshape(x.shape[1:])
    return torch.tanh(x * w) * (1 + t.reshape(-1, 1, 1, 1) / 1000) - 0.2 * x


@pytest.mark.parametrize("steps", [1, 2, 4, 6])
def test_sampling_loop_equals_lcm_scheduler(steps):
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    s = scheduler()
    s.set_timesteps(steps)
    g = torch.Generator().manual_seed(11)
    x = noise.clone()
    for t in s.timesteps:
        x = s.step(stand_in(x, t.expand(2)), t, x, generator=g).prev_sample
    ours = lcm.lcm_sample(stand_in, noise, steps, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_lcm_sd_equals_stable_diffusion_pipeline_with_lcm_scheduler():
    """The course's LCMSD and diffusers' StableDiffusionPipeline with LCMScheduler (guidance 1: an LCM has guidance
    in its weights), both around the course's VAE and a U-Net, give the same latents and images."""
    from diffusers import StableDiffusionPipeline

    from course_lib import diffusers_weights as W
    from course_lib.diffusers_bridge import build_tiny_pipeline

    base = load_tiny_sd()
    sd = lcm.LCMSD.from_models(base.vae, base.clip, base.unet)  # any noise predictor samples the same way
    tiny = build_tiny_pipeline()
    pipe = StableDiffusionPipeline(vae=W.vae_to_diffusers(sd.vae), text_encoder=tiny.text_encoder,
                                   tokenizer=tiny.tokenizer, unet=W.unet_to_diffusers(sd.unet), scheduler=scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle in the top left", "a large blue square"]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    for steps in (1, 4):
        images, ours = sd.generate(prompts, num_steps=steps, latents=latents, return_latents=True,
                                   generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            theirs = pipe(prompt_embeds=sd.encode_prompt(prompts), latents=latents, height=64, width=64,
                          num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
                          generator=torch.Generator().manual_seed(5)).images
            their_images = pipe.vae.decode(theirs / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(images, their_images, atol=1e-4, rtol=1e-4)


def test_distillation_loss_follows_the_lcm_script(tiny_unet):
    """The loss against a direct transcription of diffusers' train_lcm_distill_sd_wds.py step (guided x0 and eps
    computed separately, DDIM solver's alpha_prev table), with the same draws."""
    schedule = sd_schedule()
    tc = lcm.LCMTraining(guidance_scale=4.0)
    student = teacher = target = tiny_unet  # the loss's arithmetic is what is compared
    z0 = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    context = torch.randn(3, 6, 24, generator=torch.Generator().manual_seed(2))
    empty = torch.randn(1, 6, 24, generator=torch.Generator().manual_seed(3))
    ours = lcm.distillation_loss(student, target, teacher, z0, context, empty, torch.Generator().manual_seed(9), tc,
                                 schedule)

    g = torch.Generator().manual_seed(9)
    ab = schedule.alphas_cumprod
    solver = (torch.arange(1, 51) * 20).round().long() - 1
    ab_prev = torch.cat([ab[:1], ab[solver[:-1]]])  # DDIMSolver.ddim_alpha_cumprods_prev
    index = torch.randint(0, 50, (3,), generator=g)
    start = solver[index]
    end = (start - 20).clamp(min=0)
    noise = torch.randn(z0.shape, generator=g)
    a = ab[start].reshape(-1, 1, 1, 1)
    x = a.sqrt() * z0 + (1 - a).sqrt() * noise

    def x0_of(eps, xt, t):
        at = ab[t].reshape(-1, 1, 1, 1)
        return (xt - (1 - at).sqrt() * eps) / at.sqrt()

    def scalings(t):
        st = t.float() * 10
        return (0.25 / (st ** 2 + 0.25)).reshape(-1, 1, 1, 1), (st / (st ** 2 + 0.25).sqrt()).reshape(-1, 1, 1, 1)

    cs, co = scalings(start)
    model_pred = cs * x + co * x0_of(student(x, start, context), x, start)
    with torch.no_grad():
        cond, uncond = teacher(x, start, context), teacher(x, start, empty.expand_as(context))
        w = 3.0
        pred_x0 = x0_of(cond, x, start) + w * (x0_of(cond, x, start) - x0_of(uncond, x, start))
        pred_noise = cond + w * (cond - uncond)
        ap = ab_prev[index].reshape(-1, 1, 1, 1)
        x_prev = ap.sqrt() * pred_x0 + (1 - ap).sqrt() * pred_noise
        cs, co = scalings(end)
        tgt = cs * x_prev + co * x0_of(target(x_prev, end, context), x_prev, end)
    theirs = torch.mean(torch.sqrt((model_pred - tgt) ** 2 + 0.001 ** 2) - 0.001)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_bad_arguments_get_clear_errors():
    base = load_tiny_sd()
    sd = lcm.LCMSD.from_models(base.vae, base.clip, base.unet)
    sd.unet.distilled_guidance = 5.0
    for bad in (0, 51, 2.0, True):
        with pytest.raises(ValueError, match="num_steps"):
            sd.generate("a red circle", num_steps=bad)
    with pytest.raises(ValueError, match="distilled at guidance scale 5"):
        sd.generate("a red circle", guidance_scale=7.5)
    with pytest.raises(ValueError, match="does not take"):
        sd.generate("a red circle", sampler="ddim")
    with pytest.raises(ValueError, match="at least one prompt"):
        sd.generate([])
    with pytest.raises(ValueError, match="original_steps"):
        lcm.ddim_timesteps(0)
    assert sd.generate("a red circle", num_steps=2, guidance_scale=5.0).shape == (1, 3, 64, 64)
