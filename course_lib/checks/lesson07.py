"""The "check yourself" cell of lesson 7 (notebooks/07_complete_pipeline.ipynb).

The learner writes two small pieces of the pipeline:

- ``pipeline_shapes(batch, height, width, guidance_scale, text_tokens=77, text_width=768,
  latent_channels=4, factor=8)``: the shape of every tensor that crosses a step of
  ``StableDiffusionPipeline`` (the check runs it for SD 1.5, SD 2.1, SDXL-sized inputs and the tiny SD,
  with and without guidance), the arithmetic behind the seed lesson's four claims;
- ``postprocess(images)``: decoder output in [-1, 1] -> uint8 pictures (B, H, W, 3), as diffusers'
  ``VaeImageProcessor.postprocess`` + ``numpy_to_pil`` do it.
"""

from __future__ import annotations

import torch

from course_tools.checking import Exercise, ExerciseResult, run_in_notebook

# ==============================================================================================
# Reference implementations
# ==============================================================================================


def pipeline_shapes(batch: int, height: int, width: int, guidance_scale: float, text_tokens: int = 77,
                    text_width: int = 768, latent_channels: int = 4, factor: int = 8) -> dict:
    """Shapes of the text states the U-Net reads, the latents, the U-Net's input and the decoded images.

    Guidance (diffusers: guidance_scale > 1) doubles the batch of the U-Net's input and of the text
    states it reads: [negative prompt, prompt] in one call.
    """
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
    unet_batch = 2 * batch if guidance_scale > 1 else batch
    h, w = height // factor, width // factor
    return {
        "text_embeddings": (unet_batch, text_tokens, text_width),
        "latents": (batch, latent_channels, h, w),
        "unet_input": (unet_batch, latent_channels, h, w),
        "image": (batch, 3, height, width),
    }


def postprocess(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) floats in about [-1, 1] -> (B, H, W, 3) uint8: x / 2 + 0.5, clamp to [0, 1], * 255, round."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)  # float32, as diffusers computes it
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # (B, H, W, 3)


# name -> (batch, height, width, guidance_scale, keyword arguments): the cases the shape check runs
SHAPE_CASES = {
    "SD 1.5, 512 px, guidance 7.5": (1, 512, 512, 7.5, {}),
    "SD 1.5, 4 images, guidance off": (4, 512, 512, 1.0, {}),
    "SD 2.1 (768 model), 768 px": (1, 768, 768, 7.5, {"text_width": 1024}),
    "SDXL, 2 images, 1024 x 768": (2, 1024, 768, 5.0, {"text_width": 2048}),
    "tiny SD, 64 px": (8, 64, 64, 5.0, {"text_tokens": 32, "text_width": 128}),
}

# ==============================================================================================
# Lesson 7: the shapes through the pipeline, and postprocessing
# ==============================================================================================
L07 = Exercise("l07_pipeline", "Lesson 7: shapes through the pipeline, and postprocessing",
               targets=("pipeline_shapes", "postprocess"))

_SHAPE_HINT = ("latents: (batch, latent_channels, height // factor, width // factor); the image: (batch, 3, height, "
               "width); with guidance (guidance_scale > 1) the U-Net input and the text states hold 2 * batch rows, "
               "[negative prompt, prompt], and without it batch rows.")


def _as_tuples(got):
    if isinstance(got, dict):
        return {k: tuple(v) if isinstance(v, (list, tuple, torch.Size)) else v for k, v in got.items()}
    return got


@L07.check("pipeline_shapes: latents and decoded images for SD 1.5, SD 2.1, SDXL and the tiny SD", points=2,
           hint=_SHAPE_HINT)
def _(run, learner):
    for name, (b, h, w, scale, kw) in SHAPE_CASES.items():
        got = _as_tuples(run.call(learner.pipeline_shapes, b, h, w, scale, **kw, label=f"pipeline_shapes(<{name}>)"))
        want = pipeline_shapes(b, h, w, scale, **kw)
        run.expect(isinstance(got, dict) and set(got) == set(want),
                   f"pipeline_shapes(<{name}>) to be a dict with keys {sorted(want)}",
                   repr(sorted(got)) if isinstance(got, dict) else type(got).__name__)
        for key in ("latents", "image"):
            run.equal(got[key], want[key], f"pipeline_shapes(<{name}>)[{key!r}]")


@L07.check("pipeline_shapes: guidance doubles the U-Net's batch (one call on [negative, prompt]), no guidance does not",
           points=2, hint=_SHAPE_HINT)
def _(run, learner):
    rng = run.rng(0)
    cases = dict(SHAPE_CASES)
    cases["random"] = (int(rng.integers(1, 9)), int(rng.integers(1, 65)) * 8, int(rng.integers(1, 65)) * 8,
                       float(rng.choice([1.0, 3.0, 7.5])), {"text_width": int(rng.choice([768, 1024]))})
    for name, (b, h, w, scale, kw) in cases.items():
        got = _as_tuples(run.call(learner.pipeline_shapes, b, h, w, scale, **kw, label=f"pipeline_shapes(<{name}>)"))
        want = pipeline_shapes(b, h, w, scale, **kw)
        for key in ("text_embeddings", "unet_input"):
            run.equal(got.get(key) if isinstance(got, dict) else got, want[key], f"pipeline_shapes(<{name}>)[{key!r}]")


@L07.check("pipeline_shapes raises ValueError for sizes the VAE cannot take", points=1,
           hint="The VAE halves the size factor = 8 = 2**3 times; say so with a ValueError instead of rounding.")
def _(run, learner):
    run.raises("ValueError", learner.pipeline_shapes, 1, 500, 512, 7.5)


@L07.check("postprocess: [-1, 1] floats -> (B, H, W, 3) uint8, rounded as diffusers rounds", points=2,
           hint="(images / 2 + 0.5).clamp(0, 1), times 255, .round(), .to(torch.uint8), then "
                ".permute(0, 2, 3, 1): channels last, as pictures are stored.")
def _(run, learner):
    for k, (b, h, w) in enumerate([(2, 8, 8), (1, 16, 24), (3, 4, 4)]):
        x = run.randn(b, 3, h, w, k=k) * 0.7  # some values fall outside [-1, 1]: clamp them
        got = run.call(learner.postprocess, x.clone(), label=f"postprocess(<images {(b, 3, h, w)}>)")
        want = postprocess(x)
        arr = run.tensor(got, f"postprocess(<images {(b, 3, h, w)}>)", shape=tuple(want.shape), kind="any")
        run.expect(str(getattr(got, "dtype", "")).endswith("uint8"), "a uint8 result (what pictures hold)",
                   f"dtype {getattr(got, 'dtype', type(got).__name__)}")
        off = abs(arr - want.double().numpy())
        # exact, up to a rare tie that float64 arithmetic rounds the other way; truncating instead of
        # rounding is off by one on about half of the values
        run.expect(off.max() <= 1 and (off > 0).mean() < 0.01,
                   f"postprocess(<images {(b, 3, h, w)}>) equal to the reference (rounded, not truncated)",
                   f"{int((off > 0).sum())} of {off.size} values differ, by up to {int(off.max())}")


def check_yourself(pipeline_shapes_fn, postprocess_fn) -> ExerciseResult:
    """Run lesson 7's checks on your two functions: a table of checks, or a one-line error while one fails."""
    return run_in_notebook(L07, (pipeline_shapes_fn, postprocess_fn))
