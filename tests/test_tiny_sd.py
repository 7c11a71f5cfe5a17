"""The whole tiny Stable Diffusion: generation API, determinism, and the shipped system's adherence bar."""

import pytest
import torch

from course_lib import data
from course_lib.clip import CONTEXT_LENGTH
from course_lib.evaluator import load_evaluator, prompt_adherence
from course_lib.tiny_sd import DEFAULT_GUIDANCE, TinySD, load_tiny_sd

PROMPTS = ["a large red circle in the centre", "small blue square, top left"]
ONE_OBJECT = (1.0, 0.0, 0.0)  # data.generate(object_counts=...): scenes of exactly one object


@pytest.fixture(scope="module")
def pipe() -> TinySD:
    return load_tiny_sd()


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator()


def test_generate_shapes_range_and_latents(pipe):
    images, latents = pipe.generate(PROMPTS, num_steps=3, generator=torch.Generator().manual_seed(0),
                                    return_latents=True)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert latents.shape == pipe.latent_shape(2) == (2, 4, 16, 16)  # the factor-4 VAE: 64x64x3 -> 16x16x4
    assert pipe.tokenizer.context_length == pipe.clip.config.context_length == CONTEXT_LENGTH
    assert pipe.encode_prompt(PROMPTS).shape == (2, CONTEXT_LENGTH, pipe.clip.config.width)


def test_same_generator_same_images(pipe):
    a = pipe.generate(PROMPTS, num_steps=3, generator=torch.Generator().manual_seed(1))
    b = pipe.generate(PROMPTS, num_steps=3, generator=torch.Generator().manual_seed(1))
    c = pipe.generate(PROMPTS, num_steps=3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_ancestral", "dpmpp_2m", "ddpm", "heun"])
def test_every_sampler_runs(pipe, sampler):
    out = pipe.generate(PROMPTS[:1], num_steps=2, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_callback_negative_prompt_and_no_guidance(pipe):
    seen = []
    pipe.generate(PROMPTS[:1], num_steps=4, negative_prompt="a small green triangle in the centre",
                  callback=lambda i, t, x, x0: seen.append((i, t)), generator=torch.Generator().manual_seed(0))
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    out = pipe.generate(PROMPTS[:1], num_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 64, 64)


def test_one_guidance_scale_per_prompt(pipe):
    prompts = [PROMPTS[0]] * 2
    swept = pipe.generate(prompts, num_steps=3, guidance_scale=[1.0, 5.0], generator=torch.Generator().manual_seed(3))
    noise = torch.randn(pipe.latent_shape(2), generator=torch.Generator().manual_seed(3))
    for i, w in enumerate((1.0, 5.0)):
        alone = pipe.generate(prompts[:1], num_steps=3, guidance_scale=w, latents=noise[i:i + 1])
        torch.testing.assert_close(swept[i:i + 1], alone, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="one per prompt"):
        pipe.generate(prompts, guidance_scale=[3.0, 3.0, 3.0])


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="sampler"):
        pipe.generate(PROMPTS, sampler="plms")
    with pytest.raises(ValueError, match="negative"):
        pipe.generate(PROMPTS, negative_prompt=["", "", ""])
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe.generate(PROMPTS, guidance_scale=0.5)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe.generate(PROMPTS, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="spacing"):
        pipe.generate(PROMPTS, spacing="uniform")
    with pytest.raises(ValueError, match="rescale_space"):
        pipe.generate(PROMPTS, guidance_rescale=0.7, rescale_space="x")


def test_rescale_in_v_space_holds_back_high_guidance(pipe):
    """At w = 20 the final latents spread far wider than at the default scale (lesson 4, section 5, measures 1.60
    against 0.78 on 12 prompts); guidance rescale in v-space brings them back, diffusers' rescale of the noise does not.
    Measured on these 6 prompts, 10 steps: std 0.82 (w = 5), 1.40 (w = 20), 1.36 (eps-space, phi 0.7), 0.84 (v-space)."""
    prompts = [data.template_caption(s) for s in
               (data.generate(6, seed=3, split="heldout", object_counts=ONE_OBJECT).described(i) for i in range(6))]
    noise = torch.randn(pipe.latent_shape(len(prompts)), generator=torch.Generator().manual_seed(0))
    std = {}
    for name, kw in {"default": dict(guidance_scale=DEFAULT_GUIDANCE), "w20": dict(guidance_scale=20.0),
                     "w20 eps": dict(guidance_scale=20.0, guidance_rescale=0.7),
                     "w20 v": dict(guidance_scale=20.0, guidance_rescale=0.7, rescale_space="v")}.items():
        _, z = pipe.generate(prompts, num_steps=10, latents=noise, return_latents=True, **kw)
        std[name] = z.std().item()
    assert std["w20"] > 1.3 * std["default"], std
    assert std["w20 eps"] > 0.9 * std["w20"], std  # rescaling the noise barely changes anything
    assert std["w20 v"] < 0.75 * std["w20"], std


def test_spacing_decides_what_one_step_can_do(pipe):
    """SD's "leading" spacing puts a 1-step sampler at t = 1: it returns the noise almost as it was.
    "trailing" starts at t = 999: its one DDIM step replaces the noise by the model's estimate of a clean latent."""
    captions = data.generate(32, seed=23, split="heldout", object_counts=ONE_OBJECT).captions
    noise = torch.randn(pipe.latent_shape(len(captions)), generator=torch.Generator().manual_seed(0))
    visited = {}
    kept = {}
    for spacing in ("leading", "trailing"):
        _, latents = pipe.generate(captions, num_steps=1, spacing=spacing, latents=noise.clone(), return_latents=True,
                                   callback=lambda i, t, x, x0, s=spacing: visited.setdefault(s, int(t)))
        kept[spacing] = torch.corrcoef(torch.stack([latents.flatten(), noise.flatten()]))[0, 1].item()
    assert visited == {"leading": 1, "trailing": 999}
    assert kept["leading"] > 0.95 and kept["trailing"] < 0.5, kept  # correlation of the result with the noise
    default = pipe.generate(captions[:2], num_steps=3, generator=torch.Generator().manual_seed(0))
    leading = pipe.generate(captions[:2], num_steps=3, spacing="leading", generator=torch.Generator().manual_seed(0))
    assert torch.equal(default, leading)  # None keeps SD's default spacing


def test_shipped_system_follows_prompts(pipe, evaluator):
    """A floor under the shipped system, not its goal. On these 48 held-out one-object captions, at the default
    scale and DDIM 20, it confirms 58% (colour and position 100%, shape 73%, size 64%); the course's target,
    95% at the best scale, is not reached yet (benchmarks/bench_tiny_sd.py prints it as a failed bar). A
    retrained model that falls below 45% here has lost something the lessons show."""
    captions = data.generate(48, seed=21, split="heldout", object_counts=ONE_OBJECT).captions
    result = prompt_adherence(pipe.generate(captions, num_steps=20, generator=torch.Generator().manual_seed(0)),
                              captions, evaluator)
    assert result["adherence"] >= 0.45, result["per_attribute"]
    assert result["per_attribute"]["colour"] >= 0.9 and result["per_attribute"]["position"] >= 0.9


def test_guidance_lifts_the_shipped_unet(pipe, evaluator):
    """The world's captions leave most attributes unsaid, so the conditional model alone follows them loosely:
    guidance at the default scale must add at least 10 points of adherence (benchmarks/bench_tiny_sd.py's bar)."""
    captions = data.generate(64, seed=22, split="heldout", object_counts=ONE_OBJECT).captions
    score = {w: prompt_adherence(pipe.generate(captions, num_steps=20, guidance_scale=w,
                                               generator=torch.Generator().manual_seed(0)), captions, evaluator)
             for w in (1.0, DEFAULT_GUIDANCE)}
    assert DEFAULT_GUIDANCE > 1.0
    assert score[1.0]["adherence"] <= score[DEFAULT_GUIDANCE]["adherence"] - 0.10, (
        score[1.0]["per_attribute"], score[DEFAULT_GUIDANCE]["per_attribute"])
