"""Checks of the lineage SD 1.5 -> SD 2.1 -> SDXL -> SD 3: parameters counted on PyTorch's meta device
from the published configs (no weights, no download), and the numbers that tell the releases apart.

| id | where | kind |
| --- | --- | --- |
| parameter_count | solutions/08_lineage_exercises.ipynb | graded exercise |
| lineage_numbers | notebooks/08_sd_lineage.ipynb | check yourself |
"""

from __future__ import annotations

import torch

from course_tools.agent import Probe, probe_network
from course_tools.checking import Exercise, Run

# The U-Net configs as published with the checkpoints (unet/config.json), keys that differ from
# UNet2DConditionModel's defaults only.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD15_UNET_PARAMETERS = 859_520_964  # checked against diffusers by tests/test_checkers.py
SDXL_UNET_PARAMETERS = 2_567_463_684

# ==============================================================================================
# Reference implementations
# ==============================================================================================


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def meta_unet(config: dict) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel with every tensor on the meta device: shapes, no memory."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def parameter_breakdown(config: dict) -> dict[str, int]:
    unet = meta_unet(config)
    counts = {name: count_parameters(child) for name, child in unet.named_children()}
    return {name: n for name, n in counts.items() if n > 0}


def small_config(run: Run) -> dict:
    """A random small U-Net config with cross-attention, for a count no one can look up."""
    rng = run.rng(3)
    width = int(rng.choice([32, 64]))
    return dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=int(rng.integers(1, 3)),
                block_out_channels=[width, 2 * width], norm_num_groups=8,
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                cross_attention_dim=int(rng.choice([16, 24, 32])), attention_head_dim=int(rng.choice([2, 4, 8])))


# ==============================================================================================
# Exercise: parameter counts from configs
# ==============================================================================================
PARAMETER_COUNT = Exercise("parameter_count", "SD 1.5 and SDXL parameter counts",
                           targets=("count_parameters", "unet_parameter_count", "parameter_breakdown"),
                           call_timeout=60.0)


@PARAMETER_COUNT.check("count_parameters(module) counts every parameter (frozen ones too, buffers not)", points=2,
                       hint="sum(p.numel() for p in module.parameters()); with trainable_only=True keep only the "
                            "ones with p.requires_grad. Buffers such as BatchNorm's running mean are not parameters.")
def _(run, learner):
    for k in range(3):
        net = run.make(Probe.of("network", seed=run.seeds[k], depth=k + 2))
        ref = probe_network(seed=run.seeds[k], depth=k + 2)
        run.equal(run.call(learner.count_parameters, net), count_parameters(ref), f"count_parameters(<network {k}>)")
        run.equal(run.call(learner.count_parameters, net, trainable_only=True), count_parameters(ref, True),
                  f"count_parameters(<network {k}>, trainable_only=True)")


@PARAMETER_COUNT.check("unet_parameter_count(SD15_UNET) = 859,520,964",
                       hint="Build UNet2DConditionModel(**config) inside `with torch.device('meta'):` so that no "
                            "memory is allocated, then count its parameters.")
def _(run, learner):
    run.equal(run.call(learner.unet_parameter_count, SD15_UNET, label="unet_parameter_count(SD15_UNET)"),
              SD15_UNET_PARAMETERS, "unet_parameter_count(SD15_UNET)")


@PARAMETER_COUNT.check("Verify: SDXL's U-Net has 2,567,463,684 parameters, about 3x SD 1.5's",
                       hint="The same function with SDXL_UNET: 10 transformer layers per block at the lowest "
                            "resolution and 2048-wide text features account for most of the growth.")
def _(run, learner):
    n = run.call(learner.unet_parameter_count, SDXL_UNET, label="unet_parameter_count(SDXL_UNET)")
    run.equal(n, SDXL_UNET_PARAMETERS, "unet_parameter_count(SDXL_UNET)")
    run.expect(2.9 < n / SD15_UNET_PARAMETERS < 3.1, "a ratio near 3", f"{n / SD15_UNET_PARAMETERS:.2f}")


@PARAMETER_COUNT.check("unet_parameter_count works for any config (a small random one)",
                       hint="Pass the config through unchanged: UNet2DConditionModel(**config).")
def _(run, learner):
    config = small_config(run)
    run.equal(run.call(learner.unet_parameter_count, config, label="unet_parameter_count(<small config>)"),
              count_parameters(meta_unet(config)), "unet_parameter_count(<small random config>)")


@PARAMETER_COUNT.check("parameter_breakdown(config): parameters per top-level part; Verify: SDXL's up blocks "
                       "hold the most", points=2,
                       hint="{name: count for name, child in unet.named_children()}, leaving out the parts without "
                            "parameters (time_proj, conv_act, ...).")
def _(run, learner):
    for name, config in (("<small config>", small_config(run)), ("SDXL_UNET", SDXL_UNET)):
        got = run.call(learner.parameter_breakdown, config, label=f"parameter_breakdown({name})")
        run.equal(got, parameter_breakdown(config), f"parameter_breakdown({name})")
    largest = max(got, key=got.get)
    run.expect(largest == "up_blocks", "the up blocks to hold the most parameters of SDXL's U-Net", largest)


# ==============================================================================================
# Check yourself (notebooks/08_sd_lineage.ipynb): the lineage in numbers
# ==============================================================================================
# The learner gives
# - ``sdxl_ratio``: SDXL base's U-Net parameters over SD 1.5's (a number, from the lesson's counts);
# - ``mmdit_sequence_length(height, width)``: tokens in one joint attention of SD 3 medium;
# - ``sdxl_time_ids(original_size, crops_coords_top_left, target_size)``: SDXL's six extra numbers.

SD3_PATCH_SIZE = 2  # SD 3 medium's transformer/config.json: 2x2 latent patches per token
SD3_TEXT_TOKENS = 77 + 256  # CLIP's 77 tokens, then T5's 256 (StableDiffusion3Pipeline's max_sequence_length)


def mmdit_sequence_length(height: int, width: int, factor: int = 8, patch_size: int = SD3_PATCH_SIZE,
                          text_tokens: int = SD3_TEXT_TOKENS) -> int:
    """Tokens in one joint attention of SD 3 medium: the image's patches plus the text's tokens."""
    return (height // factor // patch_size) * (width // factor // patch_size) + text_tokens


def sdxl_time_ids(original_size: tuple[int, int], crops_coords_top_left: tuple[int, int],
                  target_size: tuple[int, int]) -> torch.Tensor:
    """(orig h, orig w, crop top, crop left, target h, target w) as a (1, 6) float32 tensor, in the order of
    diffusers' ``StableDiffusionXLPipeline._get_add_time_ids``."""
    return torch.tensor([[*original_size, *crops_coords_top_left, *target_size]], dtype=torch.float32)


LINEAGE_NUMBERS = Exercise("lineage_numbers", "Check yourself: the lineage in numbers",
                           targets=("sdxl_ratio", "mmdit_sequence_length", "sdxl_time_ids"))


@LINEAGE_NUMBERS.check("sdxl_ratio: SDXL base's U-Net over SD 1.5's, from the parameters() counts",
                       hint="count(SDXL_BASE.denoiser.build()).parameters / count(SD15.denoiser.build()).parameters")
def _(run, learner):
    run.close(run.get(learner.sdxl_ratio, "sdxl_ratio"), SDXL_UNET_PARAMETERS / SD15_UNET_PARAMETERS, "sdxl_ratio",
              rtol=1e-3)


@LINEAGE_NUMBERS.check("mmdit_sequence_length(h, w): image tokens (latent side / 2 per axis) + 77 CLIP + 256 T5 "
                       "tokens", hint="latent = pixels / 8, then 2x2 patches: (h // 16) * (w // 16) image tokens, "
                                      "plus 77 + 256 text tokens.")
def _(run, learner):
    rng = run.rng(0)
    sizes = [(1024, 1024), (512, 768)] + [tuple(int(v) * 16 for v in rng.integers(16, 96, size=2)) for _ in range(3)]
    for h, w in sizes:
        got = run.call(learner.mmdit_sequence_length, h, w)
        run.equal(got, mmdit_sequence_length(h, w), f"mmdit_sequence_length({h}, {w})")


@LINEAGE_NUMBERS.check("sdxl_time_ids(original, crop, target): the six numbers, in the order the U-Net was trained "
                       "with", hint="(original h, original w, crop top, crop left, target h, target w), as a (1, 6) "
                                    "tensor, like diffusers' StableDiffusionXLPipeline._get_add_time_ids.")
def _(run, learner):
    rng = run.rng(1)
    for _ in range(3):
        orig = tuple(int(v) * 64 for v in rng.integers(4, 24, size=2))
        crop = tuple(int(v) * 8 for v in rng.integers(0, 32, size=2))
        got = run.call(learner.sdxl_time_ids, orig, crop, (1024, 1024))
        run.close(got, sdxl_time_ids(orig, crop, (1024, 1024)), f"sdxl_time_ids({orig}, {crop}, (1024, 1024))",
                  kind="tensor")
