"""The bridge to diffusers (the course's own pipeline is ``tiny_sd.TinySD``): StableDiffusionPipeline, course samplers.

Lesson 7 (``notebooks/07_complete_pipeline.ipynb``) walks through ``TinySD.generate`` step by step and
maps every step onto ``StableDiffusionPipeline.__call__``. This module holds the parts of that lesson
that talk to ``diffusers`` (the course's weights in diffusers' model classes are ``diffusers_weights``):

- ``build_tiny_pipeline``: a real ``StableDiffusionPipeline`` made of tiny random parts (a
  ``UNet2DConditionModel``, an ``AutoencoderKL``, a ``CLIPTextModel`` and a ``CLIPTokenizer`` read from
  a letter-level vocabulary), built offline in a fraction of a second, as diffusers' own fast tests
  build theirs. Its weights are random, so its images are noise; its shapes and its arithmetic are
  the real pipeline's.
- ``generate_with_course_sampler``: the pipeline's own text encoder, U-Net and VAE, but the denoising
  loop is the course's (``samplers`` + ``guidance``). With the matching scheduler it gives the latents
  of ``pipe(...)`` itself (tests/test_pipeline.py, tests/test_real_unet_parity.py).
- ``sd_scheduler_config`` (SD 1.x's scheduler settings) and ``diffusers_sampling_loop`` (the pipeline's
  denoising loop on any model): the reference the course's samplers are compared with.
- ``load_real_sd``: a real Stable Diffusion checkpoint (SD 1.5 by default) in float16 on a GPU, or
  ``None`` with a message that says why not (no CUDA, offline, Hub unreachable, model id gone).

The pipeline's steps, and where each one lives (diffusers 0.42):

    step                                  StableDiffusionPipeline             this course
    1. tokenise                           encode_prompt (self.tokenizer)      TinySD.tokenizer
    2. encode the prompt and the negative encode_prompt; cat([neg, prompt])   TinySD.encode_prompt
    3. starting latents x_T               prepare_latents (* init_noise_sigma) torch.randn(generator=...)
    4. timesteps                          scheduler.set_timesteps             schedules.make_timesteps
    5. U-Net on [neg, prompt], guidance   the loop in __call__                guidance.guided_model
    6. sampler step x_t -> x_prev         scheduler.step                      samplers.ddim / euler / ...
    7. decode z / scaling_factor          vae.decode (+ run_safety_checker)   TinySD.decode_latents
    8. to 8-bit pictures                  image_processor.postprocess         (x / 2 + 0.5).clamp(0, 1) * 255
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch

from .guidance import guided_model
from .samplers import SamplerName, sample, unet_model
from .schedules import NoiseSchedule, make_timesteps, scaled_linear_betas

# The SD 1.5 checkpoint that exists on the Hub today. The original runwayml repository was taken down,
# and stabilityai/stable-diffusion-2-1 (the article's id) was withdrawn in late 2025.
SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# SD 1.x's scheduler settings (its scheduler_config.json); diffusers' DDIMScheduler defaults to
# clip_sample=True, which is wrong for latents. The one copy in the course: tests and benchmarks use it too.
SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                           beta_end=0.012, steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def sd_scheduler_config(**changes) -> dict:
    """SD 1.x's scheduler settings with ``changes`` on top, as a new dict for ``Scheduler.from_config``,
    e.g. ``sd_scheduler_config(prediction_type="v_prediction", timestep_spacing="trailing")``."""
    return {**SD_SCHEDULER_CONFIG, **changes}

@dataclass(frozen=True)
class SchedulerTwin:
    """The diffusers scheduler that computes what one course sampler computes, and how to set both alike.

    With SD's config plus ``config``, ``scheduler.set_timesteps(N)`` visits ``timesteps(N)``, and the
    course sampler called with those timesteps and ``sampler_kwargs`` gives the scheduler's latents
    (tests/test_samplers_vs_diffusers.py, tests/test_real_unet_parity.py, benchmarks/bench_sampler_speed.py).
    """

    scheduler: type  # the diffusers scheduler class
    config: dict  # changes to sd_scheduler_config()
    timesteps: Any  # N -> the course's timesteps that match set_timesteps(N)
    sampler_kwargs: dict  # what the course sampler needs besides


def scheduler_twin(sampler: SamplerName) -> SchedulerTwin:
    """The diffusers scheduler matching ``samplers.SAMPLERS[sampler]`` on SD's settings.

    Euler-type schedulers default to "linspace" spacing when SD's config does not name one, with
    fractional timesteps and a starting noise of sigma_max; DPM-Solver++'s last step goes to t = 0.
    """
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                           EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler)

    def euler_type(cls):
        return SchedulerTwin(cls, {}, lambda n: make_timesteps(n, spacing="linspace", integer=False),
                             {"init_noise_sigma": "sigma_max"})

    twins = {
        "ddpm": SchedulerTwin(DDPMScheduler, {}, make_timesteps, {}),
        "ddim": SchedulerTwin(DDIMScheduler, {}, make_timesteps, {}),
        "euler": euler_type(EulerDiscreteScheduler),
        "euler_ancestral": euler_type(EulerAncestralDiscreteScheduler),
        "heun": euler_type(HeunDiscreteScheduler),
        "dpmpp_2m": SchedulerTwin(DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2},
                                  lambda n: make_timesteps(n, spacing="linspace", count_final_step=True), {}),
    }
    if sampler not in twins:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(twins)}")
    return twins[sampler]


# SD 1.5's own scheduler is PNDMScheduler (its scheduler_config.json), in its PLMS form: skip_prk_steps=True.
SD15_SCHEDULER_CONFIG = dict(SD_SCHEDULER_CONFIG, skip_prk_steps=True)

OutputType = Literal["pil", "np", "pt", "latent"]


# ==============================================================================================
# A tiny StableDiffusionPipeline, offline
# ==============================================================================================


@contextlib.contextmanager
def _transformers_errors_only():
    """Importing StableDiffusionPipeline without torchvision makes transformers log that its image processors
    fall back to PIL (they are only used by the safety checker): keep that out of the lesson, then restore."""
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


def _pipeline_class():
    with _transformers_errors_only():
        from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline


@dataclass
class TinyPipelineConfig:
    """Sizes of the tiny random pipeline. SD 1.5's value is in each comment."""

    max_length: int = 77  # tokens per prompt, padded (SD 1.5: 77, CLIP's limit)
    text_width: int = 32  # text hidden size = the U-Net's cross-attention width (768)
    text_layers: int = 2  # text transformer blocks (12)
    unet_channels: tuple = (8, 16)  # U-Net block widths (320, 640, 1280, 1280)
    vae_channels: tuple = (4, 8, 8, 8)  # 4 VAE levels: 3 downsamplings, factor 8, as in SD ((128, 256, 512, 512))
    latent_size: int = 8  # the U-Net's sample_size: 8 * 8 = 64-pixel images (64: 512 pixels)
    seed: int = 0  # the random weights


def tiny_clip_tokenizer(folder: str | Path, max_length: int = 77):
    """A real ``CLIPTokenizer`` (byte-pair encoding, start/end tokens, padding to ``max_length``) over
    single letters, with no merges: each word becomes its letters, the last one marked with ``</w>``.

    It is read from ``vocab.json`` and ``merges.txt`` that this function writes into ``folder``, the
    way the real tokenizer is read from the files of a checkpoint.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for tok in list(letters) + [c + "</w>" for c in letters]:
        vocab[tok] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                         model_max_length=max_length)


def build_tiny_pipeline(config: TinyPipelineConfig | None = None, scheduler=None):
    """A ``StableDiffusionPipeline`` made of tiny random parts: no download, well under a second.

    scheduler: any diffusers scheduler; default ``DDIMScheduler`` with SD 1.x's settings.
    The safety checker is left out (``safety_checker=None``): there is nothing to check in noise.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    StableDiffusionPipeline = _pipeline_class()
    cfg = config or TinyPipelineConfig()
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = tiny_clip_tokenizer(folder, cfg.max_length)
    fork = torch.random.fork_rng(devices=[])  # random weights from cfg.seed, leaving the caller's RNG alone
    with fork:
        torch.manual_seed(cfg.seed)
        n = len(cfg.unet_channels)
        unet = UNet2DConditionModel(
            sample_size=cfg.latent_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=tuple(cfg.unet_channels),
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
            cross_attention_dim=cfg.text_width, norm_num_groups=2, attention_head_dim=2,
        )
        m = len(cfg.vae_channels)
        vae = AutoencoderKL(block_out_channels=list(cfg.vae_channels), in_channels=3, out_channels=3,
                            latent_channels=4, norm_num_groups=2, layers_per_block=1,
                            down_block_types=["DownEncoderBlock2D"] * m, up_block_types=["UpDecoderBlock2D"] * m,
                            sample_size=cfg.latent_size * 2 ** (m - 1), scaling_factor=0.18215)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()), hidden_size=cfg.text_width, intermediate_size=2 * cfg.text_width,
            num_attention_heads=2, num_hidden_layers=cfg.text_layers, max_position_embeddings=cfg.max_length,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ))
    scheduler = scheduler if scheduler is not None else DDIMScheduler.from_config(sd_scheduler_config())
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_unet_calls(pipe, *args, **kwargs) -> tuple[Any, list[int]]:
    """Run ``pipe(*args, **kwargs)`` and return its output and the batch size of every U-Net call it made."""
    calls: list[int] = []
    hook = pipe.unet.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    try:
        out = pipe(*args, **kwargs)
    finally:
        hook.remove()
    return out, calls


# ==============================================================================================
# diffusers' own loop, for comparison
# ==============================================================================================


@torch.no_grad()
def diffusers_sampling_loop(scheduler, num_steps: int, noise: torch.Tensor, model, cond: torch.Tensor | None = None,
                            uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                            guidance_rescale: float = 0.0, generator: torch.Generator | None = None,
                            **step_kwargs) -> torch.Tensor:
    """The denoising loop of ``StableDiffusionPipeline.__call__`` (diffusers 0.42), on any ``model(x, t, cond)``:
    what the course's samplers are compared with in the tests and benchmarks.

    noise: unit Gaussian (B, C, h, w); scaled by ``scheduler.init_noise_sigma`` here, as ``prepare_latents`` does.
    With ``uncond`` (B, L, D), every step runs the model once on the batch [uncond, cond] and combines the two
    halves with classifier-free guidance (and diffusers' ``rescale_noise_cfg`` when ``guidance_rescale > 0``).
    generator: passed to ``scheduler.step`` for the stochastic schedulers (leave it None for
    ``HeunDiscreteScheduler``, whose ``step`` takes none). Other keyword arguments go to ``step`` (``eta=``).
    """
    scheduler.set_timesteps(num_steps, device=noise.device)
    if generator is not None:
        step_kwargs = {**step_kwargs, "generator": generator}
    guided = uncond is not None
    embeds = torch.cat([uncond, cond]) if guided else cond  # (2B, L, D): the pipeline's [negative, prompt] order
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        latent_in = torch.cat([latents] * 2) if guided else latents  # (2B, C, h, w) with guidance
        latent_in = scheduler.scale_model_input(latent_in, t)
        out = model(latent_in, t.expand(latent_in.shape[0]), embeds)
        if guided:
            out_uncond, out_text = out.chunk(2)
            out = out_uncond + guidance_scale * (out_text - out_uncond)
            if guidance_rescale > 0.0:
                with _transformers_errors_only():
                    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
                out = rescale_noise_cfg(out, out_text, guidance_rescale=guidance_rescale)
        latents = scheduler.step(out, t, latents, **step_kwargs).prev_sample
    return latents


# ==============================================================================================
# The course's loop on a diffusers pipeline
# ==============================================================================================


def schedule_of(scheduler) -> NoiseSchedule:
    """The ``NoiseSchedule`` a diffusers scheduler was configured with (SD's "scaled_linear" betas)."""
    cfg = scheduler.config
    if cfg.get("trained_betas") is not None:
        return NoiseSchedule.from_betas(torch.tensor(cfg["trained_betas"], dtype=torch.float32))
    if cfg.get("beta_schedule") != "scaled_linear":
        raise ValueError(f"the pipeline's scheduler uses beta_schedule={cfg.get('beta_schedule')!r}; this function "
                         "knows SD's 'scaled_linear' (and explicit trained_betas)")
    if cfg.get("rescale_betas_zero_snr"):
        raise ValueError("zero-terminal-SNR schedulers are not handled here; build the NoiseSchedule with "
                         "schedules.rescale_zero_terminal_snr yourself")
    return NoiseSchedule.from_betas(scaled_linear_betas(cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"]))


@dataclass
class CourseSDOutput:
    """What ``generate_with_course_sampler`` returns."""

    images: Any  # PIL images, a numpy array (B, H, W, 3) in [0, 1], a tensor (B, 3, H, W) in [0, 1], or the latents
    latents: torch.Tensor  # (B, 4, h, w) the sampler's final, scaled latents
    nsfw_content_detected: list[bool] | None  # the pipeline's safety checker's verdict (None: it has none)


def starting_latents(pipe, batch: int, height: int, width: int, generator: torch.Generator | None,
                     dtype: torch.dtype) -> torch.Tensor:
    """Unit Gaussian noise (B, 4, height / 8, width / 8), drawn exactly as ``pipe.prepare_latents`` draws it
    (on the generator's device, in ``dtype``, then moved), but *not* multiplied by ``init_noise_sigma``:
    the course's samplers take unit noise and scale it themselves where they need to (Euler)."""
    f = pipe.vae_scale_factor
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f} (the VAE's factor), got {height}x{width}")
    shape = (batch, pipe.unet.config.in_channels, height // f, width // f)
    device = pipe.unet.device
    draw_on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)  # (B, 4, h, w)


@torch.no_grad()
def generate_with_course_sampler(pipe, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                                 num_steps: int = 30, guidance_scale: float = 7.5, sampler: SamplerName = "ddim",
                                 timesteps: torch.Tensor | None = None, height: int | None = None,
                                 width: int | None = None, generator: torch.Generator | None = None,
                                 guidance_rescale: float = 0.0, output_type: OutputType = "pil",
                                 **sampler_kwargs) -> CourseSDOutput:
    """Prompt to image with ``pipe``'s text encoder, U-Net and VAE, and the course's sampler and guidance.

    The text goes through the pipeline's own ``encode_prompt``, the noise is drawn as its
    ``prepare_latents`` draws it, and decoding and postprocessing are its own; the loop in between
    is ``samplers.<sampler>`` on ``guidance.guided_model(unet)``. timesteps: the ones to visit
    (default: ``num_steps`` of SD's "leading" spacing, which is what ``DDIMScheduler`` with SD's config
    visits). Other keyword arguments go to the sampler (``eta=``, ``init_noise_sigma=``, ...).
    """
    if guidance_scale < 1.0:
        raise ValueError(f"guidance_scale must be >= 1 (1 turns guidance off), got {guidance_scale}")
    if output_type not in ("pil", "np", "pt", "latent"):
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompts)
    f = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * f
    width = width or pipe.unet.config.sample_size * f
    device = pipe.unet.device
    do_cfg = guidance_scale != 1.0

    # 1. text: (B, L, D) for the prompts and, with guidance, for the negative (or empty) prompts
    cond, uncond = pipe.encode_prompt(prompts, device, 1, do_cfg, negative_prompt)
    # 2. unit noise, as prepare_latents draws it
    noise = starting_latents(pipe, len(prompts), height, width, generator, cond.dtype)  # (B, 4, h, w)
    # 3.-5. the course's guided model and sampler on the pipeline's U-Net
    model = guided_model(unet_model(pipe.unet), cond, uncond, guidance_scale, guidance_rescale)
    latents = sample(sampler, model, noise, schedule_of(pipe.scheduler),
                     timesteps if timesteps is not None else num_steps, None,
                     prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"), generator=generator,
                     **sampler_kwargs)  # (B, 4, h, w)
    if output_type == "latent":
        return CourseSDOutput(latents, latents, None)
    # 6. decode: undo the latent scaling, then the VAE decoder: (B, 3, H, W) in about [-1, 1]
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    image, nsfw = pipe.run_safety_checker(image, device, cond.dtype)
    # 7. postprocess: [-1, 1] -> [0, 1] (-> uint8 PIL images); flagged images stay black
    denormalize = [True] * image.shape[0] if nsfw is None else [not flag for flag in nsfw]
    images = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
    return CourseSDOutput(images, latents, nsfw)


# ==============================================================================================
# A real checkpoint, when there is a GPU and a way to the Hub
# ==============================================================================================


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or flag in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub opens within ``timeout`` seconds (DNS included)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    result = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=connect, daemon=True)  # a stuck DNS lookup cannot hold the caller up
    worker.start()
    worker.join(timeout + 0.5)
    return bool(result and result[0])


def _from_pretrained(model_id: str | Path, dtype: torch.dtype, local_files_only: bool):
    """``StableDiffusionPipeline.from_pretrained``, asking for the half-size ``fp16`` files first when dtype
    is float16 (the SD 1.5 repository has them), and the full ones if there are none."""
    StableDiffusionPipeline = _pipeline_class()
    variants = ["fp16", None] if dtype == torch.float16 else [None]
    for k, variant in enumerate(variants):
        try:
            # diffusers 0.42 renamed torch_dtype to dtype (with a FutureWarning); older versions know only torch_dtype
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*torch_dtype.*", FutureWarning)
                return StableDiffusionPipeline.from_pretrained(model_id, torch_dtype=dtype, variant=variant,
                                                               local_files_only=local_files_only)
        except (OSError, ValueError):
            if k == len(variants) - 1:
                raise
    raise AssertionError("unreachable")


def _skip(model_id: str, why: str) -> None:
    print(f"Real Stable Diffusion ({model_id}) not loaded: {why}\n"
          "The lesson goes on with the tiny model; every step above is the same.")


def load_real_sd(model_id: str | Path = SD15_MODEL_ID, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float16, *, allow_cpu: bool = False, hub_timeout: float = 3.0):
    """A real ``StableDiffusionPipeline`` on ``device`` in ``dtype`` with PyTorch's fused attention
    (SDPA), or ``None`` after printing why not.

    The checks, in order, each skipping cleanly with a message that says what to do:
      1. a CUDA GPU (SD 1.5 is about 2.7 GB in float16, safety checker included, and takes minutes per
         image on a CPU); the tests pass ``allow_cpu=True`` (with ``dtype=torch.float32``) to load a tiny
         saved pipeline on the CPU;
      2. the files, first from the local cache or a local folder (``local_files_only=True``), then,
         unless ``HF_HUB_OFFLINE`` is set, from the Hub after a quick connectivity check;
      3. a model id that exists (ids get withdrawn: stabilityai/stable-diffusion-2-1 was).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        _skip(model_id, "CUDA was asked for but is not available here.")
        return None
    if device.type != "cuda" and not allow_cpu:
        _skip(model_id, f"no CUDA GPU here (device {device.type!r}). A real checkpoint needs a GPU: on Colab, "
                        "Runtime > Change runtime type > GPU, then run this notebook again.")
        return None
    try:
        pipe = _from_pretrained(model_id, dtype, local_files_only=True)
    except (OSError, ValueError):
        pipe = None
        if _offline():
            _skip(model_id, "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
                            "Unset HF_HUB_OFFLINE on a machine with internet access to download it (about 2.7 GB).")
            return None
        if not hub_reachable(hub_timeout):
            _skip(model_id, f"it is not in the local cache and the Hub cannot be reached (no connection within "
                            f"{hub_timeout:g} s). Run this on a machine with internet access, e.g. Colab.")
            return None
        try:
            pipe = _from_pretrained(model_id, dtype, local_files_only=False)
        except Exception as err:  # RepositoryNotFoundError, GatedRepoError, HTTP errors, a full disk: say which
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            _skip(model_id, f"the download failed ({type(err).__name__}: {first}). Model ids get withdrawn "
                            "(stabilityai/stable-diffusion-2-1 was, in late 2025): check that the id exists on "
                            "https://huggingface.co.")
            return None
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = pipe.to(device)
    pipe.unet.set_attn_processor(AttnProcessor2_0())  # torch's scaled_dot_product_attention (diffusers' default
    pipe.vae.set_attn_processor(AttnProcessor2_0())  # in torch 2, said out loud)
    pipe.set_progress_bar_config(disable=True)
    return pipe
