"""The Stable Diffusion lineage as code: the published configs of SD 1.5, SD 2.1, SDXL and SD 3.

Lesson 8 (``notebooks/08_sd_lineage.ipynb``) builds every part from these configs with the real
``diffusers`` and ``transformers`` classes on PyTorch's **meta** device, so a 4.7-billion-parameter
T5 costs no memory and no download: the tensors have shapes but no data. Counting the parameters of
those models is then exact, and running them on meta tensors checks every shape end to end.

The configs are the ``config.json`` files that ship with the checkpoints on the Hugging Face Hub,
written out here as keyword arguments (only the keys that differ from the class defaults, or that the
lesson talks about, are spelled out; every one of them is what the checkpoint says). The Hub
repositories they come from are in ``Release.hub_id``; nothing here downloads anything.

Two ways of counting, which differ on purpose (see ``count``):

- ``parameters()`` yields each trainable tensor once, even when two modules share it;
- ``state_dict()`` is what a checkpoint file holds: it repeats a shared (tied) tensor under every
  name that refers to it, and adds persistent buffers, which are not parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers import AutoencoderKL, ControlNetModel, SD3Transformer2DModel, UNet2DConditionModel
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedModel,
    T5Config,
    T5EncoderModel,
)

# --------------------------------------------------------------------------------------------
# Text encoders (transformers configs)
# --------------------------------------------------------------------------------------------

# Each text encoder's config is written out in full, not derived from another: these are the published
# configs, compared field by field with their model cards.
# OpenAI CLIP ViT-L/14, text tower: SD 1.x's only text encoder, SDXL's first, SD 3's first.
CLIP_VIT_L14 = dict(
    vocab_size=49408,  # CLIP's byte-pair vocabulary
    hidden_size=768,  # width of every token's vector: SD 1.5's cross-attention width
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,  # the 77-token limit: learned positions for 77 tokens, no more
    hidden_act="quick_gelu",
    projection_dim=768,  # the pooled text embedding's width (used by SD 3, not by SD 1.5)
)

# OpenCLIP ViT-H/14, text tower, as SD 2.x ships it: the real tower has 24 layers, but SD 2 conditions
# on the penultimate layer, so its checkpoint keeps 23 (diffusers then applies the final LayerNorm).
OPENCLIP_VIT_H14_SD2 = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,  # unused by SD 2 (no projection head is loaded)
)

# OpenCLIP ViT-bigG/14, text tower with its projection head: SDXL's second encoder, SD 3's second.
OPENCLIP_VIT_BIGG14 = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,  # the pooled embedding that SDXL and SD 3 feed into their timestep embedding
)

# Google T5 v1.1 XXL, encoder only: SD 3's third text encoder (stable-diffusion-3-medium-diffusers/text_encoder_3).
T5_V1_1_XXL = dict(
    vocab_size=32128,
    d_model=4096,  # width of every token's vector: SD 3's joint_attention_dim
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,  # relative positions: no fixed token limit in the architecture
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,  # no LM head to tie; the encoder's embed_tokens still shares `shared`
    is_encoder_decoder=False,
    use_cache=False,
)

# --------------------------------------------------------------------------------------------
# VAEs (diffusers AutoencoderKL)
# --------------------------------------------------------------------------------------------

_VAE_BLOCKS = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),  # 4 levels: 3 downsamplings, so a factor 2**3 = 8 per side
    layers_per_block=2,
    act_fn="silu",
    norm_num_groups=32,
)
SD_VAE_4CH = dict(_VAE_BLOCKS, latent_channels=4, sample_size=512, scaling_factor=0.18215)  # SD 1.x and 2.x
SDXL_VAE_4CH = dict(_VAE_BLOCKS, latent_channels=4, sample_size=1024, scaling_factor=0.13025)  # same layers, retrained
SD3_VAE_16CH = dict(
    _VAE_BLOCKS,
    latent_channels=16,  # 4x the channels of SD 1/2/XL: more detail survives the compression
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,  # SD 3 also shifts its latents: z = (latent - 0.0609) * 1.5305
    use_quant_conv=False,  # SD 3's VAE drops the two 1x1 "quant" convolutions around the latent
    use_post_quant_conv=False,
)

# --------------------------------------------------------------------------------------------
# Denoisers (diffusers UNet2DConditionModel, SD3Transformer2DModel) and ControlNet
# --------------------------------------------------------------------------------------------

SD15_UNET = dict(
    sample_size=64,  # latent side: 64 * 8 = 512 pixels
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    cross_attention_dim=768,  # = CLIP ViT-L/14's hidden_size
    attention_head_dim=8,  # in SD 1.x configs this is in fact the number of heads (a diffusers naming quirk)
)

SD21_UNET = dict(
    SD15_UNET,
    sample_size=96,  # 96 * 8 = 768 pixels (the 512-pixel "2.1-base" has 64)
    cross_attention_dim=1024,  # = OpenCLIP ViT-H/14's hidden_size
    attention_head_dim=(5, 10, 20, 20),  # heads per level, 64 channels each
    use_linear_projection=True,  # 1x1 convs around each transformer replaced by Linear layers
    upcast_attention=True,  # attention in float32: the 768 model overflowed in float16
)

SDXL_BASE_UNET = dict(
    sample_size=128,  # 128 * 8 = 1024 pixels
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),  # 3 levels instead of 4
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),  # no attention at full res
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),  # 10 transformer layers per block at the lowest resolution
    cross_attention_dim=2048,  # = 768 (CLIP ViT-L) + 1280 (OpenCLIP bigG), concatenated per token
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",  # micro-conditioning: pooled text + size/crop numbers
    addition_time_embed_dim=256,  # each size/crop number gets a 256-wide sinusoidal embedding
    projection_class_embeddings_input_dim=2816,  # = 1280 (pooled bigG) + 6 numbers * 256
)

SDXL_REFINER_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=4,
    cross_attention_dim=1280,  # the refiner reads only OpenCLIP bigG
    attention_head_dim=(6, 12, 24, 24),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560,  # = 1280 (pooled bigG) + 5 numbers * 256 (aesthetic score, no target size)
)

SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128,  # latent side: 128 * 8 = 1024 pixels
    patch_size=2,  # 2x2 latent patches become tokens: a 128x128 latent is 64 * 64 = 4096 image tokens
    in_channels=16,
    out_channels=16,
    num_layers=24,  # 24 MMDiT (joint attention) blocks
    attention_head_dim=64,
    num_attention_heads=24,  # width 24 * 64 = 1536
    joint_attention_dim=4096,  # = T5-XXL's d_model; CLIP tokens (768 + 1280 = 2048) are zero-padded to 4096
    caption_projection_dim=1536,
    pooled_projection_dim=2048,  # = 768 + 1280, the two CLIPs' pooled embeddings concatenated
    pos_embed_max_size=192,  # a fixed 192x192 grid of sin-cos positions, cropped to the image's size
)

SD15_CONTROLNET = dict(
    {k: v for k, v in SD15_UNET.items() if k not in ("sample_size", "out_channels", "up_block_types")},
    conditioning_channels=3,  # the control image (edges, depth, pose) in RGB
    conditioning_embedding_out_channels=(16, 32, 96, 256),  # small conv net: 512x512 control image -> 64x64x320
)

# --------------------------------------------------------------------------------------------
# SDXL micro-conditioning
# --------------------------------------------------------------------------------------------


def sdxl_add_time_ids(original_size: tuple[int, int], crops_coords_top_left: tuple[int, int],
                      target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL base's six extra numbers: (orig h, orig w, crop top, crop left, target h, target w), shape (1, 6).

    Training images were often smaller than 1024 or cropped; SDXL is told by how much, so that at
    sampling time one can ask for "an uncropped 1024x1024 original" (the default) and get centred subjects.
    """
    return torch.tensor([list(original_size) + list(crops_coords_top_left) + list(target_size)], dtype=torch.float32)


def refiner_add_time_ids(original_size: tuple[int, int], crops_coords_top_left: tuple[int, int],
                         aesthetic_score: float = 6.0) -> torch.Tensor:
    """The refiner's five: (orig h, orig w, crop top, crop left, aesthetic score), shape (1, 5). Pipelines use 6.0 (and 2.5 for the negative prompt)."""
    return torch.tensor([list(original_size) + list(crops_coords_top_left) + [aesthetic_score]], dtype=torch.float32)


def added_embedding_input(add_time_ids: torch.Tensor, pooled_text: torch.Tensor, time_embed_dim: int = 256) -> torch.Tensor:
    """The vector that SDXL's ``add_embedding`` MLP reads, computed as ``UNet2DConditionModel`` does for "text_time".

    Each number of ``add_time_ids`` (B, n) gets a ``time_embed_dim``-wide sinusoidal embedding (the same
    ``Timesteps`` layer as the diffusion timestep); they are flattened and appended to the pooled text
    embedding (B, P): the result is (B, P + n * time_embed_dim), e.g. 1280 + 6 * 256 = 2816.
    """
    from diffusers.models.embeddings import Timesteps

    time_proj = Timesteps(time_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)  # no parameters
    time_embeds = time_proj(add_time_ids.flatten()).reshape(add_time_ids.shape[0], -1)  # (B, n * time_embed_dim)
    return torch.cat([pooled_text, time_embeds.to(pooled_text)], dim=-1)


# --------------------------------------------------------------------------------------------
# Parts and releases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One network of a release: what it is, the library class that implements it, and its published config."""

    name: str  # e.g. "CLIP ViT-L/14 (text)"
    cls: type  # the diffusers or transformers class
    config: dict  # keyword arguments of the class (diffusers) or of its config class (transformers)

    def build(self, device: torch.device | str = "meta") -> nn.Module:
        """The network with this config. On the default meta device it has shapes but no data (no memory, instant)."""
        with torch.device(device):
            if issubclass(self.cls, PreTrainedModel):
                return self.cls(self.cls.config_class(**self.config))
            return self.cls(**self.config)


@dataclass(frozen=True)
class Release:
    """A Stable Diffusion release: its networks and what the lesson's comparison table needs."""

    name: str
    year: int
    denoiser: Part
    vae: Part
    text_encoders: tuple[Part, ...]
    extras: dict[str, Part] = field(default_factory=dict)  # optional add-ons by role, e.g. {"ControlNet": ...}
    objective: str = "epsilon"  # what the denoiser predicts
    extra_conditioning: str = "none"  # conditioning beyond the per-token text embeddings
    text_tokens: str = "77"  # how many text tokens the denoiser attends to
    hub_id: str | None = None  # the diffusers-format repository that exists today (text only: nothing is downloaded)
    hub_note: str = ""
    default_time_ids: Callable[[], torch.Tensor] | None = None  # SDXL's micro-conditioning at its pipeline defaults

    def parts(self) -> dict[str, Part]:
        """Every network by role, in pipeline order: {"denoiser": ..., "VAE": ..., "text encoder 1": ..., ...}."""
        roles = {"denoiser": self.denoiser, "VAE": self.vae}
        for i, enc in enumerate(self.text_encoders, start=1):
            roles[f"text encoder {i}" if len(self.text_encoders) > 1 else "text encoder"] = enc
        return roles | self.extras

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel along a side: 2 ** (number of VAE levels - 1), as diffusers computes it."""
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config["latent_channels"]

    @property
    def native_resolution(self) -> int:
        """The denoiser's training size in pixels: its latent sample_size times the VAE factor."""
        return self.denoiser.config["sample_size"] * self.vae_scale_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(channels, height / f, width / f) of the latent that the denoiser sees for a height x width image."""
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"{self.name}: height and width must be multiples of {f}, got {height}x{width}")
        return (self.latent_channels, height // f, width // f)


_L14 = Part("CLIP ViT-L/14 (text)", CLIPTextModel, CLIP_VIT_L14)
_L14_PROJ = Part("CLIP ViT-L/14 (text + projection)", CLIPTextModelWithProjection, CLIP_VIT_L14)
_H14 = Part("OpenCLIP ViT-H/14 (text, 23 of 24 layers)", CLIPTextModel, OPENCLIP_VIT_H14_SD2)
_BIGG = Part("OpenCLIP ViT-bigG/14 (text + projection)", CLIPTextModelWithProjection, OPENCLIP_VIT_BIGG14)
_T5 = Part("T5 v1.1 XXL (encoder)", T5EncoderModel, T5_V1_1_XXL)

SD15 = Release(
    "SD 1.5", 2022,
    denoiser=Part("U-Net", UNet2DConditionModel, SD15_UNET),
    vae=Part("VAE (4 latent channels)", AutoencoderKL, SD_VAE_4CH),
    text_encoders=(_L14,),
    extras={"ControlNet": Part("ControlNet (copy of the U-Net's encoder)", ControlNetModel, SD15_CONTROLNET)},
    hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
    hub_note="community mirror; the original runwayml repository was taken down",
)
SD21 = Release(
    "SD 2.1", 2022,
    denoiser=Part("U-Net", UNet2DConditionModel, SD21_UNET),
    vae=Part("VAE (4 latent channels)", AutoencoderKL, dict(SD_VAE_4CH, sample_size=768)),
    text_encoders=(_H14,),
    objective="v-prediction (768 model; 2.1-base: epsilon)",
    hub_id=None,
    hub_note="stabilityai/stable-diffusion-2-1 and -2-1-base were withdrawn from the Hub in late 2025",
)
SDXL_BASE = Release(
    "SDXL base", 2023,
    denoiser=Part("U-Net", UNet2DConditionModel, SDXL_BASE_UNET),
    vae=Part("VAE (4 latent channels)", AutoencoderKL, SDXL_VAE_4CH),
    text_encoders=(_L14, _BIGG),
    extra_conditioning="pooled bigG text + original size, crop, target size",
    hub_id="stabilityai/stable-diffusion-xl-base-1.0",
    default_time_ids=lambda: sdxl_add_time_ids((1024, 1024), (0, 0), (1024, 1024)),
)
SDXL_REFINER = Release(
    "SDXL refiner", 2023,
    denoiser=Part("U-Net", UNet2DConditionModel, SDXL_REFINER_UNET),
    vae=Part("VAE (4 latent channels)", AutoencoderKL, SDXL_VAE_4CH),
    text_encoders=(_BIGG,),
    extra_conditioning="pooled bigG text + original size, crop, aesthetic score",
    hub_id="stabilityai/stable-diffusion-xl-refiner-1.0",
    default_time_ids=lambda: refiner_add_time_ids((1024, 1024), (0, 0), 6.0),
)
SD3_MEDIUM = Release(
    "SD 3 medium", 2024,
    denoiser=Part("MMDiT", SD3Transformer2DModel, SD3_MEDIUM_TRANSFORMER),
    vae=Part("VAE (16 latent channels)", AutoencoderKL, SD3_VAE_16CH),
    text_encoders=(_L14_PROJ, _BIGG, _T5),
    objective="velocity (rectified flow)",
    extra_conditioning="pooled CLIP-L + bigG text (timestep embedding)",
    text_tokens="77 + 256 (CLIP + T5)",
    hub_id="stabilityai/stable-diffusion-3-medium-diffusers",
    hub_note="gated: accept the licence on the Hub and log in first",
)

RELEASES: dict[str, Release] = {r.name: r for r in (SD15, SD21, SDXL_BASE, SDXL_REFINER, SD3_MEDIUM)}

# --------------------------------------------------------------------------------------------
# What the denoiser reads: text widths and example inputs, derived from the text encoders' configs
# --------------------------------------------------------------------------------------------

SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length for T5


@dataclass(frozen=True)
class TextConditioning:
    tokens: int  # text tokens the denoiser attends to
    width: int  # width of each token's vector
    pooled: int | None  # width of the pooled text vector fed into the timestep embedding (None: not used)


def text_conditioning(release: Release) -> TextConditioning:
    """What the pipeline hands the denoiser, computed from the *text encoders'* configs only.

    - CLIP towers' per-token outputs are concatenated along the feature axis (SDXL: 768 + 1280 = 2048).
    - Pooled vectors come from the towers with a projection head, concatenated (SDXL: 1280; SD 3: 768 + 1280).
    - With T5 (SD 3), the CLIP features are zero-padded to T5's width and the T5 tokens are appended
      along the sequence: 77 CLIP + 256 T5 tokens, each 4096 wide.
    Running the denoiser on inputs of these shapes (``denoiser_inputs``) checks them against its config.
    """
    clips = [p for p in release.text_encoders if p.cls in (CLIPTextModel, CLIPTextModelWithProjection)]
    t5s = [p for p in release.text_encoders if p.cls is T5EncoderModel]
    width = sum(p.config["hidden_size"] for p in clips)
    tokens = max(p.config["max_position_embeddings"] for p in clips)
    pooled = sum(p.config["projection_dim"] for p in clips if p.cls is CLIPTextModelWithProjection) or None
    for t5 in t5s:
        width = max(width, t5.config["d_model"])
        tokens += SD3_T5_TOKENS
    return TextConditioning(tokens, width, pooled)


def denoiser_inputs(release: Release, batch: int = 1, height: int | None = None, width: int | None = None) -> dict:
    """Keyword arguments for a forward call of ``release.denoiser`` at ``height`` x ``width`` (default: native).

    The tensors are random and made on the current default device: call it inside ``with torch.device("meta"):``
    to get shape-only inputs for a network built on meta. The text shapes come from ``text_conditioning``, so a
    forward call that runs proves that the text encoders' widths fit the denoiser's config.
    """
    height = height or release.native_resolution
    width = width or release.native_resolution
    text = text_conditioning(release)
    latent = torch.randn(batch, *release.latent_shape(height, width))
    context = torch.randn(batch, text.tokens, text.width)
    t = torch.full((batch,), 500.0)
    if release.denoiser.cls is SD3Transformer2DModel:
        return dict(hidden_states=latent, encoder_hidden_states=context, pooled_projections=torch.randn(batch, text.pooled),
                    timestep=t)
    kwargs = dict(sample=latent, timestep=t, encoder_hidden_states=context)
    if release.default_time_ids is not None:
        time_ids = release.default_time_ids().to(latent.device).expand(batch, -1)
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, text.pooled), "time_ids": time_ids}
    return kwargs


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Count:
    """Parameter counts of one network, the two ways people quote them.

    parameters:  elements of ``model.parameters()``: each trainable tensor once, even if shared.
    state_dict:  elements of ``model.state_dict()``: what a checkpoint stores under distinct names.
    tied:        elements the state dict repeats because two names refer to the same tensor.
    buffers:     elements of persistent buffers (in the state dict, not parameters).
    So ``state_dict == parameters + tied + buffers``.
    """

    parameters: int
    state_dict: int
    tied: int
    buffers: int
    tied_names: tuple[str, ...] = field(default=())
    buffer_names: tuple[str, ...] = field(default=())


def count(model: nn.Module) -> Count:
    """Count ``model``'s parameters both ways (works on the meta device: only shapes are read)."""
    params = sum(p.numel() for p in model.parameters())  # parameters() skips a shared tensor's repeats
    state = model.state_dict(keep_vars=True)  # keep_vars: the Parameter objects themselves, so identity is visible
    seen: set[int] = set()
    tied_names, buffer_names = [], []
    tied = buffers = 0
    for name, tensor in state.items():
        if not isinstance(tensor, nn.Parameter):
            buffers += tensor.numel()
            buffer_names.append(name)
        elif id(tensor) in seen:
            tied += tensor.numel()
            tied_names.append(name)
        seen.add(id(tensor))
    total = sum(t.numel() for t in state.values())
    return Count(params, total, tied, buffers, tuple(tied_names), tuple(buffer_names))


def breakdown(model: nn.Module) -> dict[str, int]:
    """Parameters by kind of layer: attention/transformer layers, ResNet blocks, embeddings, everything else.

    The kind comes from the parameter's name in the diffusers / transformers module tree. Shared tensors
    are counted once (where ``named_parameters`` first meets them), so the values add up to ``count(model).parameters``.
    """
    kinds = {"attention/transformer": 0, "ResNet blocks": 0, "embeddings": 0, "other": 0}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if any(k in parts for k in ("attentions", "transformer_blocks", "layers", "block", "layer")):
            kinds["attention/transformer"] += p.numel()  # U-Net transformers, MMDiT blocks, CLIP/T5 layers, VAE attention
        elif "resnets" in parts or any(k.startswith("resnet") for k in parts):
            kinds["ResNet blocks"] += p.numel()
        elif any("embed" in k or k == "shared" for k in parts):
            kinds["embeddings"] += p.numel()  # token, position, timestep, pooled-text and patch embeddings
        else:
            kinds["other"] += p.numel()  # in/out convolutions, down/upsamplers, final norms, ControlNet's zero convs
    return kinds


@dataclass(frozen=True)
class Row:
    release: str
    role: str
    part: str
    count: Count


def count_release(release: Release) -> list[Row]:
    """Build every network of ``release`` on the meta device and count it."""
    return [Row(release.name, role, part.name, count(part.build())) for role, part in release.parts().items()]


def fmt_params(n: int) -> str:
    """1_234_567 -> '1.23M', 2_567_463_684 -> '2.567B'."""
    if n >= 1e9:
        return f"{n / 1e9:.3f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}K"


def sd3_token_count(height: int, width: int, release: Release = SD3_MEDIUM) -> int:
    """Image tokens SD 3's MMDiT attends over for a height x width image: (h/8/p) * (w/8/p)."""
    _, h, w = release.latent_shape(height, width)
    p = release.denoiser.config["patch_size"]
    return (h // p) * (w // p)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (for ``IPython.display.Markdown``): the lesson's computed tables render in Jupyter and on GitHub."""
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, header)) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)
