"""course_lib.diffusers_bridge: the tiny offline StableDiffusionPipeline, the course's sampler and guidance driving it,
and the real-checkpoint loader, tested on a tiny pipeline saved with save_pretrained and loaded back through
load_real_sd. Also lesson 7's check-yourself checker. Nothing is downloaded.
"""

import numpy as np
import pytest
import torch

from course_lib import diffusers_bridge as P
from course_lib.checks import check
from course_lib.checks import pipeline as lesson07
from course_tools.checking import ExerciseIncomplete
from course_lib.schedules import make_timesteps

PROMPTS = ["a red circle", "a blue square"]
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return P.build_tiny_pipeline()


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd_pipeline")
    pipe.save_pretrained(folder)
    return folder


def own_loop(pipe, steps=4, guidance_scale=7.5, negative_prompt=None, seed=0, **kw):
    negative = None if negative_prompt is None else [negative_prompt] * len(PROMPTS)
    return pipe(PROMPTS, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed), **kw).images


def test_tiny_pipeline_has_sd_shapes(pipe):
    assert pipe.vae_scale_factor == 8  # 3 downsamplings, as in SD
    assert pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (2, 77)
    assert pipe.text_encoder(ids)[0].shape == (2, 77, pipe.unet.config.cross_attention_dim)
    latents = own_loop(pipe, steps=2, output_type="latent")
    assert latents.shape == (2, 4, 8, 8)
    images = own_loop(pipe, steps=2, output_type="pt")
    assert images.shape == (2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1


def test_builder_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    P.build_tiny_pipeline()
    assert torch.equal(torch.rand(3), want)


def test_course_sampler_equals_pipeline_loop_with_negative_prompt(pipe):
    ref = own_loop(pipe, steps=5, negative_prompt="green square", output_type="latent")
    ours = P.generate_with_course_sampler(pipe, PROMPTS, "green square", num_steps=5, guidance_scale=7.5,
                                          generator=torch.Generator().manual_seed(0), output_type="latent")
    assert ours.latents.shape == ref.shape == (2, 4, 8, 8)
    assert (ours.latents - ref).abs().max().item() <= TOL


def test_course_sampler_gives_the_pipelines_pictures(pipe):
    ref = own_loop(pipe, steps=3, output_type="pil")
    ours = P.generate_with_course_sampler(pipe, PROMPTS, num_steps=3, generator=torch.Generator().manual_seed(0))
    assert ours.nsfw_content_detected is None  # no safety checker in the tiny pipeline
    assert [im.size for im in ours.images] == [(64, 64)] * 2
    for a, b in zip(ours.images, ref):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_course_euler_on_a_pipeline_with_an_euler_scheduler(pipe):
    from diffusers import EulerDiscreteScheduler

    euler = P.build_tiny_pipeline(scheduler=EulerDiscreteScheduler.from_config(P.SD_SCHEDULER_CONFIG))
    ref = own_loop(euler, steps=4, output_type="latent")
    ours = P.generate_with_course_sampler(euler, PROMPTS, num_steps=4, sampler="euler",
                                          timesteps=make_timesteps(4, spacing="linspace", integer=False),
                                          init_noise_sigma="sigma_max", generator=torch.Generator().manual_seed(0),
                                          output_type="latent")
    assert (ours.latents - ref).abs().max().item() <= TOL


def test_schedule_of_rejects_what_it_does_not_know(pipe):
    from diffusers import DDIMScheduler

    assert torch.equal(P.schedule_of(pipe.scheduler).alphas_cumprod, pipe.scheduler.alphas_cumprod)
    with pytest.raises(ValueError, match="scaled_linear"):
        P.schedule_of(DDIMScheduler.from_config({**P.SD_SCHEDULER_CONFIG, "beta_schedule": "linear"}))


def test_save_pretrained_round_trip_through_load_real_sd(pipe, saved, capsys):
    from diffusers.models.attention_processor import AttnProcessor2_0

    loaded = P.load_real_sd(saved, "cpu", torch.float32, allow_cpu=True)
    assert capsys.readouterr().out == ""  # loaded: nothing to explain
    assert loaded is not None and loaded is not pipe
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(isinstance(p, AttnProcessor2_0) for p in loaded.unet.attn_processors.values())
    # the course's sampler on the loaded pipeline equals the loaded pipeline's own loop, and the original
    ref = own_loop(loaded, steps=4, negative_prompt="green", output_type="latent")
    ours = P.generate_with_course_sampler(loaded, PROMPTS, "green", num_steps=4, output_type="latent",
                                          generator=torch.Generator().manual_seed(0))
    before = own_loop(pipe, steps=4, negative_prompt="green", output_type="latent")
    assert (ours.latents - ref).abs().max().item() <= TOL
    assert (ref - before).abs().max().item() <= TOL


def test_float16_asks_for_the_fp16_files_and_falls_back(saved):
    loaded = P.load_real_sd(saved, "cpu", torch.float16, allow_cpu=True)  # saved without an fp16 variant
    assert loaded is not None and loaded.unet.dtype == torch.float16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float16_sdpa(saved):
    loaded = P.load_real_sd(saved, "cuda", torch.float16)
    assert loaded is not None and loaded.unet.device.type == "cuda" and loaded.unet.dtype == torch.float16
    ref = own_loop(loaded, steps=4, output_type="latent")
    ours = P.generate_with_course_sampler(loaded, PROMPTS, num_steps=4, output_type="latent",
                                          generator=torch.Generator().manual_seed(0))
    assert (ours.latents.float() - ref.float()).abs().max().item() <= 1e-2  # float16 on the GPU


def test_no_cuda_skips_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert P.load_real_sd() is None
    out = capsys.readouterr().out
    assert P.SD15_MODEL_ID in out and "no CUDA GPU" in out and "Colab" in out
    assert P.load_real_sd(device="cuda") is None
    assert "not available" in capsys.readouterr().out


def test_offline_skips_with_a_message(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(P, "hub_reachable", lambda timeout=3.0: pytest.fail("offline: no network check"))
    assert P.load_real_sd("course-tests/not-a-model", "cpu", torch.float32, allow_cpu=True) is None
    assert "HF_HUB_OFFLINE" in capsys.readouterr().out


def test_unreachable_hub_skips_with_a_message(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(P, "_offline", lambda: False)
    monkeypatch.setattr(P, "hub_reachable", lambda timeout=3.0: False)
    assert P.load_real_sd("course-tests/not-a-model", "cpu", torch.float32, allow_cpu=True) is None
    assert "cannot be reached" in capsys.readouterr().out


def test_a_withdrawn_model_id_skips_with_a_message(monkeypatch, capsys):
    def from_pretrained(model_id, dtype, local_files_only):  # what diffusers raises for an id the Hub does not have
        raise OSError(f"{model_id} is not a local folder and is not a valid model identifier listed on "
                      "'https://huggingface.co/models'")

    monkeypatch.setattr(P, "_offline", lambda: False)
    monkeypatch.setattr(P, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(P, "_from_pretrained", from_pretrained)
    assert P.load_real_sd("stabilityai/stable-diffusion-2-1", "cpu", torch.float32, allow_cpu=True) is None
    out = capsys.readouterr().out
    assert "not a valid model identifier" in out and "withdrawn" in out


def test_hub_reachable_gives_up_quickly(monkeypatch):
    import time

    def slow(*args, **kwargs):  # a DNS lookup that hangs, then times out as a real one would
        time.sleep(5)
        raise TimeoutError("timed out")

    monkeypatch.setattr(P.socket, "create_connection", slow)
    start = time.perf_counter()
    assert P.hub_reachable(timeout=0.2) is False
    assert time.perf_counter() - start < 2


# ----------------------------------------------------------------------------------------------
# lesson 7's check-yourself checker
# ----------------------------------------------------------------------------------------------


def test_postprocess_reference_equals_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8
    pil = VaeImageProcessor().postprocess(x, output_type="pil")
    want = np.stack([np.asarray(im) for im in pil])
    assert np.array_equal(lesson07.postprocess(x).numpy(), want)


def test_checker_passes_the_reference(capsys):
    assert check("pipeline_shapes", lesson07.pipeline_shapes, lesson07.postprocess) is None  # every check passed


def test_checker_explains_the_usual_mistakes():
    def no_doubling(batch, height, width, guidance_scale, text_tokens=77, text_width=768, latent_channels=4, factor=8):
        shapes = lesson07.pipeline_shapes(batch, height, width, guidance_scale, text_tokens, text_width,
                                          latent_channels, factor)
        shapes["unet_input"] = shapes["latents"]
        shapes["text_embeddings"] = (batch, text_tokens, text_width)
        return shapes

    def truncating(images):
        return ((images / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)

    with pytest.raises(ExerciseIncomplete) as err:
        check("pipeline_shapes", no_doubling, truncating)
    checks = {c.name: c for c in err.value.result.checks}
    passed = [name for name, c in checks.items() if c.passed]
    assert len(passed) == 2  # latents/images and the ValueError
    doubling = next(c for name, c in checks.items() if "doubles" in name)
    assert "2 * batch" in doubling.hint
    rounding = next(c for name, c in checks.items() if name.startswith("postprocess"))
    assert "round" in rounding.hint and "differ" in rounding.got


def test_diffusers_sampling_loop_is_the_pipelines_own_loop(pipe):
    """The reference loop the samplers' tests and benchmarks use gives what ``pipe(...)`` gives."""
    from diffusers import DDIMScheduler

    from course_lib.samplers import unet_model

    assert P.sd_scheduler_config(timestep_spacing="trailing") == {**P.SD_SCHEDULER_CONFIG, "timestep_spacing": "trailing"}
    assert P.sd_scheduler_config() is not P.SD_SCHEDULER_CONFIG  # a new dict each time: changing it changes nothing
    ref = own_loop(pipe, steps=4, negative_prompt="green square", output_type="latent")
    cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, ["green square"] * 2)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))  # the pipeline's first draw
    ours = P.diffusers_sampling_loop(DDIMScheduler.from_config(P.sd_scheduler_config()), 4, noise,
                                     unet_model(pipe.unet), cond, uncond, guidance_scale=7.5)
    assert (ours - ref).abs().max().item() <= TOL


def test_every_sampler_has_a_diffusers_twin_and_unknown_names_are_refused():
    from course_lib.diffusers_bridge import scheduler_twin
    from course_lib.samplers import SAMPLERS

    for name in SAMPLERS:
        twin = scheduler_twin(name)
        scheduler = twin.scheduler.from_config(P.sd_scheduler_config(**twin.config))
        scheduler.set_timesteps(7)
        visited = scheduler.timesteps.double().unique_consecutive()  # Heun lists each inner timestep twice
        assert torch.equal(visited, torch.as_tensor(twin.timesteps(7)).double())
    with pytest.raises(ValueError, match="unknown sampler"):
        scheduler_twin("plms")
