"""The course's samplers and guidance, driving a real diffusers UNet2DConditionModel, give the same latents
as StableDiffusionPipeline's own loop with the matching scheduler.

The pipeline is built from tiny random components by ``course_lib.diffusers_bridge.build_tiny_pipeline``, as
diffusers' own fast tests build theirs (a UNet, an AutoencoderKL, a CLIPTextModel, and a CLIPTokenizer read
from a tiny vocabulary written to a temporary folder), and runs with output_type="latent". Nothing is downloaded.
"""

import pytest
import torch
from diffusers import DDIMScheduler

from course_lib.guidance import guided_model
from course_lib.diffusers_bridge import TinyPipelineConfig, build_tiny_pipeline, scheduler_twin, sd_scheduler_config
from course_lib.samplers import SAMPLERS, unet_model
from course_lib.schedules import NoiseSchedule, make_timesteps, rescale_zero_terminal_snr, scaled_linear_betas, sd_schedule

TOL = 1e-5
SD_CONFIG = sd_scheduler_config()
MAX_LEN = 24  # the tokenizer's model_max_length (SD: 77)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(TinyPipelineConfig(max_length=MAX_LEN, text_width=16, unet_channels=(4, 8),
                                                  vae_channels=(4, 8), latent_size=8),
                               scheduler=DDIMScheduler.from_config(SD_CONFIG))


@torch.no_grad()
def embed(pipe, prompts):
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    return pipe.text_encoder(ids.input_ids)[0]  # (B, MAX_LEN, 16)


# case -> (course sampler, diffusers scheduler class, extra scheduler config, course timesteps for N steps,
#          extra course kwargs): each sampler with its diffusers twin, plus two variants
CASES = {name: (name, tw.scheduler, tw.config, tw.timesteps, tw.sampler_kwargs)
         for name, tw in ((name, scheduler_twin(name)) for name in SAMPLERS)}
CASES["ddim_eta1"] = ("ddim", DDIMScheduler, {}, lambda n: make_timesteps(n), {"eta": 1.0})
# Lin et al. 2023's recipe: zero-terminal-SNR betas, v-prediction, trailing timesteps
CASES["ddim_v_zsnr_trailing"] = ("ddim", DDIMScheduler, dict(prediction_type="v_prediction", timestep_spacing="trailing",
                                                             rescale_betas_zero_snr=True),
                                 lambda n: make_timesteps(n, spacing="trailing"), {})
ZSNR = NoiseSchedule.from_betas(rescale_zero_terminal_snr(scaled_linear_betas()))
PROMPTS = ["a red circle", "a blue square"]


def run_both(pipe, case, num_steps, guidance_scale, negative_prompt=None, guidance_rescale=0.0, seed=0):
    sampler, cls, config, make_ts, kwargs = CASES[case]
    config = {**SD_CONFIG, **config}
    pipe.scheduler = cls.from_config(config)
    negative = None if negative_prompt is None else [negative_prompt] * len(PROMPTS)
    ref = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=num_steps, guidance_scale=guidance_scale,
               guidance_rescale=guidance_rescale, eta=kwargs.get("eta", 0.0), height=16, width=16,
               output_type="latent", generator=torch.Generator().manual_seed(seed)).images

    # the course: the same text embeddings, the same noise, then its own sampler and guidance
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((2, 4, 8, 8), generator=g)  # the pipeline's first draw
    cond = embed(pipe, PROMPTS)
    uncond = embed(pipe, [negative_prompt or ""] * len(PROMPTS)) if guidance_scale != 1 else None
    model = guided_model(unet_model(pipe.unet), cond, uncond, guidance_scale, guidance_rescale)
    schedule = ZSNR if config.get("rescale_betas_zero_snr") else sd_schedule()
    ours = SAMPLERS[sampler](model, noise, schedule, make_ts(num_steps), None,
                             prediction_type=config.get("prediction_type", "epsilon"), generator=g, **kwargs)
    return ours, ref


@pytest.mark.parametrize("case", sorted(set(CASES) - {"ddim_v_zsnr_trailing"}))
def test_pipeline_loop_with_cfg_and_negative_prompt(pipe, case):
    ours, ref = run_both(pipe, case, num_steps=4, guidance_scale=7.5, negative_prompt="green square")
    assert ours.shape == ref.shape == (2, 4, 8, 8)
    assert (ours - ref).abs().max().item() <= TOL


def test_one_step(pipe):
    ours, ref = run_both(pipe, "dpmpp_2m", num_steps=1, guidance_scale=7.5)
    assert (ours - ref).abs().max().item() <= TOL


def test_no_guidance_runs_the_conditional_branch_only(pipe):
    calls = []
    hook = pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        ours, ref = run_both(pipe, "euler_ancestral", num_steps=3, guidance_scale=1.0)
    finally:
        hook.remove()
    assert calls == [2] * 6  # pipeline then course: batch 2 each time, no unconditional half
    assert (ours - ref).abs().max().item() <= TOL


def test_v_prediction_zero_snr_trailing_with_guidance_rescale(pipe):
    """Lin et al. 2023's recipe end to end, with their guidance rescale of 0.7."""
    ours, ref = run_both(pipe, "ddim_v_zsnr_trailing", num_steps=5, guidance_scale=7.5, guidance_rescale=0.7)
    assert torch.isfinite(ours).all()
    assert (ours - ref).abs().max().item() <= TOL


def test_pipeline_ignores_guidance_scales_below_one(pipe):
    """A diffusers quirk worth knowing: guidance_scale <= 1 switches CFG off, so 0.5 gives the same latents
    as 1.0, while the course's formula at 0.5 mixes in the unconditional prediction."""
    ours_one, ref_one = run_both(pipe, "ddim", num_steps=3, guidance_scale=1.0)
    ref_half = pipe(PROMPTS, num_inference_steps=3, guidance_scale=0.5, height=16, width=16,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(ref_half, ref_one)
    assert (ours_one - ref_one).abs().max().item() <= TOL
    ours_half, _ = run_both(pipe, "ddim", num_steps=3, guidance_scale=0.5, negative_prompt="")
    assert (ours_half - ref_half).abs().max().item() > 1e-3
