"""The helpers lessons 4 and 5 measure with (course_lib.viz.guidance, course_lib.viz.sampler) and their
"check yourself" exercises, on a tiny randomly initialised SD (no weights needed, seconds on a CPU)."""

import pytest
import torch

from course_lib import data
from course_lib.viz import guidance as gv
from course_tools.agent import LocalAgent
from course_lib.checks import CHECKS, guidance as guidance_checks, samplers as sampler_checks
from course_lib.clip import CLIP, CLIPConfig, Tokenizer
from course_lib.guidance import guided_model
from course_lib.viz.sampler import sample_latents, sampler_timesteps
from course_lib.samplers import ddim
from course_lib.schedules import make_timesteps, sd_schedule
from course_lib.tiny_sd import TinySD
from course_lib.unet import UNet, UNetConfig
from course_lib.vae import VAE, VAEConfig

PROMPTS = ["a large red circle in the centre", "small blue square, top left", "a small green triangle in the top right"]


@pytest.fixture(scope="module")
def sd() -> TinySD:
    torch.manual_seed(0)
    clip_cfg = CLIPConfig(width=32, layers=1, heads=2, embed_dim=16, image_channels=(8, 8, 8, 8))
    vae = VAE(VAEConfig(block_channels=(8, 8, 8, 8), layers_per_block=1, norm_groups=4)).eval()
    unet = UNet(UNetConfig(block_channels=(16, 16), layers_per_block=1, heads=2, context_dim=32, time_embed_dim=32,
                           norm_groups=8, ff_mult=1)).eval()
    clip = CLIP(clip_cfg).eval()
    return TinySD(vae=vae, clip=clip, unet=unet, tokenizer=Tokenizer.from_config(clip_cfg), schedule=sd_schedule())


def noise(n, seed=0):
    return torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def test_guided_model_with_one_scale_per_sample_equals_one_scale_at_a_time(sd):
    cond, uncond = sd.encode_prompt(PROMPTS), sd.encode_prompt([""] * 3)
    x, t = noise(3), torch.full((3,), 400)
    scales = torch.tensor([1.5, 4.0, 9.0])
    got = guided_model(sd.unet, cond, uncond, scales)(x, t)  # scales (B,): one per sample
    for i, w in enumerate(scales.tolist()):
        want = guided_model(sd.unet, cond[i:i + 1], uncond[i:i + 1], w)(x[i:i + 1], t[i:i + 1])
        assert torch.allclose(got[i:i + 1], want, atol=1e-5)


def test_scale_sweep_equals_separate_runs(sd):
    x = noise(3, 1)
    lat, std = gv.scale_sweep(sd, PROMPTS, [1.0, 3.0, 7.5], x, num_steps=4, return_pred_std=True)
    assert lat.shape == (3, 3, 4, 8, 8) and std.shape == (3, 4, 3)
    cond, uncond = sd.encode_prompt(PROMPTS), sd.encode_prompt([""] * 3)
    for k, w in enumerate([1.0, 3.0, 7.5]):
        want = ddim(guided_model(sd.unet, cond, uncond, w), x, sd.schedule, 4)
        assert torch.allclose(lat[k], want, atol=1e-4)
    # the same run through TinySD.generate (guidance against the empty prompt, leading spacing)
    _, z = sd.generate(PROMPTS, num_steps=4, guidance_scale=3.0, latents=x, return_latents=True)
    assert torch.allclose(lat[1], z, atol=1e-4)


def test_scale_sweep_negative_prompt_and_rescale(sd):
    x = noise(2, 2)
    a = gv.scale_sweep(sd, PROMPTS[:2], [5.0], x, num_steps=3, negative_prompt="red")[0]
    _, b = sd.generate(PROMPTS[:2], num_steps=3, guidance_scale=5.0, negative_prompt="red", latents=x,
                       return_latents=True)
    assert torch.allclose(a, b, atol=1e-4)
    c = gv.scale_sweep(sd, PROMPTS[:2], [5.0], x, num_steps=3, guidance_rescale=0.7)[0]
    _, d = sd.generate(PROMPTS[:2], num_steps=3, guidance_scale=5.0, guidance_rescale=0.7, latents=x,
                       return_latents=True)
    assert torch.allclose(c, d, atol=1e-4)
    with pytest.raises(ValueError, match="one starting latent per prompt"):
        gv.scale_sweep(sd, PROMPTS, [2.0], x)


def test_colour_measures_on_real_scenes():
    scenes = data.generate(64, seed=0, split="heldout")
    images = scenes.images_float()
    stats = gv.colour_stats(images)
    # real scenes: every pixel near a colour of the world (shades, stripes and gradients included)
    assert 0.5 < stats["saturation"] <= 1 and stats["out_of_range"] == 0.0 and stats["off_palette"] < 1e-3
    tinted = gv.colour_stats(images * 1.5 + 0.3)
    assert tinted["out_of_range"] > 0.05 and tinted["off_palette"] > 0.05
    red = gv.colour_pixel_fraction(images, "red")
    has_red = torch.tensor([any(o["colour"] == "red" for o in scenes.attributes(i)["objects"]) for i in range(64)])
    assert has_red.any() and not has_red.all()
    assert torch.all(red[has_red] > 0) and red[~has_red].mean() < 0.01 * red[has_red].mean()
    with pytest.raises(ValueError, match="unknown colour"):
        gv.colour_pixel_fraction(images, "magenta")


class _TruthfulEvaluator:
    """Reads back the attributes of known scenes, in the format of Evaluator.read_attributes."""

    def __init__(self, scenes, colour_of=None):
        self.scenes, self.colour_of = scenes, colour_of or {}

    def read_attributes(self, images):
        assert images.shape[0] == len(self.scenes)
        out = []
        for i in range(len(self.scenes)):
            truth = self.scenes.attributes(i)
            objs = [dict(o, colour=self.colour_of.get(o["colour"], o["colour"])) for o in truth["objects"]]
            out.append({"objects": objs, "background": truth["background"]})
        return out


def test_colours_read_answers_each_prompts_first_object():
    scenes = data.generate(16, seed=3, split="heldout", object_counts=(0.0, 1.0, 0.0))
    scenes = scenes.select((scenes.shape[:, 0] != scenes.shape[:, 1]).nonzero().squeeze(1)[:8])  # shapes tell them apart
    truth = [scenes.attributes(i)["objects"] for i in range(8)]
    # a prompt without colour, naming the second object's shape and position: it is answered by that object
    prompts = [f"a {o[1]['shape']} at the {o[1]['position']}" for o in truth]
    assert gv.colours_read(_TruthfulEvaluator(scenes), scenes.images_float(), prompts) == [o[1]["colour"] for o in truth]
    swap = {"red": "blue", "blue": "red"}
    got = gv.colours_read(_TruthfulEvaluator(scenes, swap), scenes.images_float(), prompts)
    assert got == [swap.get(o[1]["colour"], o[1]["colour"]) for o in truth]
    class Blind(_TruthfulEvaluator):
        def read_attributes(self, images):
            return [{"objects": [], "background": "white"} for _ in range(images.shape[0])]
    assert gv.colours_read(Blind(scenes), scenes.images_float(), prompts) == [None] * 8
    with pytest.raises(ValueError, match="8 images but 2 prompts"):
        gv.colours_read(_TruthfulEvaluator(scenes), scenes.images_float(), prompts[:2])


def test_sample_latents_and_timesteps(sd):
    x = noise(2, 4)
    _, z = sd.generate(PROMPTS[:2], num_steps=5, guidance_scale=4.0, latents=x, return_latents=True)
    assert torch.allclose(sample_latents(sd, PROMPTS[:2], x, "ddim", 5, 4.0), z, atol=1e-5)
    assert sampler_timesteps("ddim", 10)[0].item() == 999
    assert torch.equal(sampler_timesteps("dpmpp_2m", 10, "leading"),
                       make_timesteps(10, 1000, "leading", 1, count_final_step=True))
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_timesteps("plms", 10)


def test_check_yourself_exercises_pass_the_references_and_fail_common_mistakes():
    def run(check_id, *objects):
        ex = CHECKS[check_id]
        return ex.run(LocalAgent(dict(zip(ex.targets, objects))))

    assert run("per_sample_guidance", guidance_checks.per_sample_cfg).passed
    no_reshape = run("per_sample_guidance", lambda u, c, w: u + torch.as_tensor(w) * (c - u))
    assert [c.passed for c in no_reshape.checks] == [True, False, False]
    assert run("timestep_spacing", sampler_checks.spaced_timesteps).passed
    article_style = run("timestep_spacing", lambda n, spacing, steps_offset=1: torch.arange(0, 1000, 1000 // n)[:n])
    assert not any(c.passed for c in article_style.checks)
