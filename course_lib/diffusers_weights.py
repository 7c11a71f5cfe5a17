"""The course's VAE, U-Net and ControlNet as diffusers models, and back: configs, key maps, weight copies.

The course's networks and diffusers' are written independently; this module is where they meet,
as LLMs-from-scratch's ``load_weights_into_gpt`` meets GPT-2's checkpoint. For each network:

    course                      diffusers                  config                          key map
    unet.UNet                   UNet2DConditionModel       unet_diffusers_config           unet_key_map
    controlnet.ControlNet       ControlNetModel            controlnet_diffusers_config     controlnet_key_map
    vae.VAE                     AutoencoderKL              vae_diffusers_config            vae_key_map

and ``*_to_diffusers(course_model) -> diffusers_model``, ``*_from_diffusers(diffusers_model) -> course_model``.
So the shipped weights (``course_lib.weights.load_unet`` ...) run inside diffusers' classes, and a
diffusers model of the same layout runs inside the course's code. Lesson 7 uses it; the parity tests
(tests/test_unet_diffusers_parity.py, tests/test_controlnet_diffusers_parity.py,
tests/test_vae_diffusers_parity.py) prove the outputs agree to 1e-5 in float32.

A key map is a table ``{course module: diffusers module}``, one row per module that holds weights,
built by plain loops over the course's config; a state-dict key is ``module + "." + parameter name``
(``weight``/``bias``), the same on both sides. No regular expressions: print the table to read it.

One difference that no weight copy can remove, handled here: GroupNorm epsilon. diffusers builds
the U-Net transformers' norms with eps=1e-6 whatever the config says; the course's U-Net and
ControlNet use PyTorch's default 1e-5. ``unet_to_diffusers`` and ``controlnet_to_diffusers`` set
1e-5 on every GroupNorm of the model they return (``save_pretrained`` does not record it: a reloaded
model has 1e-6 again, a difference of the order of 1e-6 in the outputs). The course's VAE uses
diffusers' 1e-6 itself, so its map needs nothing of the kind.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .controlnet import ControlNet, ControlNetConfig
from .unet import UNet, UNetConfig, skip_channels
from .vae import VAE, VAEConfig

KeyMap = dict[str, str]  # course module path -> diffusers module path

COURSE_GROUP_NORM_EPS = 1e-5  # PyTorch's default, used by the U-Net's and ControlNet's GroupNorms (diffusers: 1e-6)
COURSE_IMAGE_SIDE = 64  # the course's scenes are 64x64 pixels (SD 1.5: 512)
COURSE_LATENT_SIDE = COURSE_IMAGE_SIDE // VAEConfig().downsample_factor  # 16: the U-Net's sample_size (SD 1.5: 64)


# ==============================================================================================
# Shared pieces: renaming state dicts, and the rows of the building blocks
# ==============================================================================================


def rename_state_dict(state: dict[str, torch.Tensor], key_map: KeyMap, what: str) -> dict[str, torch.Tensor]:
    """``state`` with each key's module path replaced through ``key_map`` (parameter names stay)."""
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module not in key_map:
            raise ValueError(f"{what}: {key!r} has no row in the key map; the model's layout differs from its config")
        out[f"{key_map[module]}.{param}"] = value
    return out


def invert(key_map: KeyMap) -> KeyMap:
    """diffusers module path -> course module path."""
    return {d: c for c, d in key_map.items()}


def _use_course_group_norm_eps(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            m.eps = COURSE_GROUP_NORM_EPS
    return model


def _like(model: nn.Module, reference: nn.Module) -> nn.Module:
    """``model`` on ``reference``'s device and dtype, in its train/eval mode."""
    p, q = next(reference.parameters()), next(model.parameters())
    model = model.to(p.device) if p.dtype == q.dtype else model.to(device=p.device, dtype=p.dtype)
    return model.train(reference.training)


def _resnet_rows(course: str, diffusers: str, shortcut: bool, time: bool = True) -> KeyMap:
    """course ``ResBlock`` -> diffusers ``ResnetBlock2D``: the same layers; the 1x1 skip is ``conv_shortcut``."""
    rows = {f"{course}.norm1": f"{diffusers}.norm1", f"{course}.conv1": f"{diffusers}.conv1"}
    if time:
        rows[f"{course}.time_emb_proj"] = f"{diffusers}.time_emb_proj"
    rows |= {f"{course}.norm2": f"{diffusers}.norm2", f"{course}.conv2": f"{diffusers}.conv2"}
    if shortcut:
        rows[f"{course}.skip"] = f"{diffusers}.conv_shortcut"
    return rows


def _transformer_rows(course: str, diffusers: str) -> KeyMap:
    """course ``unet.Transformer`` -> diffusers ``Transformer2DModel`` (use_linear_projection=True) holding one
    ``BasicTransformerBlock``; diffusers wraps to_out in a list (``to_out.0``) and the GEGLU in ``ff.net``."""
    block = f"{diffusers}.transformer_blocks.0"
    rows = {f"{course}.norm": f"{diffusers}.norm", f"{course}.proj_in": f"{diffusers}.proj_in"}
    for attn, norm in (("attn1", "norm1"), ("attn2", "norm2")):
        rows[f"{course}.{norm}"] = f"{block}.{norm}"
        for proj in ("to_q", "to_k", "to_v"):
            rows[f"{course}.{attn}.{proj}"] = f"{block}.{attn}.{proj}"
        rows[f"{course}.{attn}.to_out"] = f"{block}.{attn}.to_out.0"
    rows |= {f"{course}.norm3": f"{block}.norm3", f"{course}.ff.proj": f"{block}.ff.net.0.proj",
             f"{course}.ff.out": f"{block}.ff.net.2", f"{course}.proj_out": f"{diffusers}.proj_out"}
    return rows


def _require(config, settings: dict, what: str) -> None:
    """ValueError unless every diffusers config entry in ``settings`` has the value the course's code computes."""
    for name, want in settings.items():
        have = config.get(name, want)
        have = list(have) if isinstance(have, tuple) else have
        if have != (list(want) if isinstance(want, tuple) else want):
            raise ValueError(f"{what} has {name}={have!r}; the course's model computes what {name}={want!r} computes, "
                             "so this model has no course counterpart")


# ==============================================================================================
# U-Net <-> UNet2DConditionModel
# ==============================================================================================


def unet_diffusers_config(cfg: UNetConfig) -> dict:
    """The ``UNet2DConditionModel`` config of the course's U-Net. SD 1.5's value in each comment."""
    if cfg.ff_mult != 4:
        raise ValueError(f"diffusers' transformer blocks in UNet2DConditionModel expand by 4; ff_mult={cfg.ff_mult} "
                         "has no diffusers counterpart")
    return dict(
        sample_size=COURSE_LATENT_SIDE,  # latent side (64)
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,  # 4, 4
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(cfg.block_channels),  # (320, 640, 1280, 1280)
        layers_per_block=cfg.layers_per_block,  # 2
        cross_attention_dim=cfg.context_dim,  # 768
        attention_head_dim=cfg.heads,  # 8: for SD 1/2 U-Nets this field holds the number of heads (!)
        norm_num_groups=cfg.norm_groups,  # 32
        norm_eps=COURSE_GROUP_NORM_EPS,  # 1e-5
        time_embedding_dim=cfg.time_embed_dim,  # None there: 4 * block_out_channels[0] = 1280
        use_linear_projection=True,  # SD 1.5: False (1x1 convs), SD 2: True (linear layers, as the course)
    )


def _encoder_rows(cfg: UNetConfig) -> KeyMap:
    """The encoder half that U-Net and ControlNet share: time embedding, conv_in, down blocks, mid block."""
    rows = {"time_embedding.0": "time_embedding.linear_1", "time_embedding.2": "time_embedding.linear_2",
            "conv_in": "conv_in"}
    ch, n = cfg.block_channels, cfg.layers_per_block
    for i, c in enumerate(ch):
        cin = ch[max(i - 1, 0)]
        for j in range(n):
            rows |= _resnet_rows(f"down_blocks.{i}.resnets.{j}", f"down_blocks.{i}.resnets.{j}",
                                 shortcut=j == 0 and cin != c)
            if cfg.attention[i]:
                rows |= _transformer_rows(f"down_blocks.{i}.attentions.{j}", f"down_blocks.{i}.attentions.{j}")
        if i < len(ch) - 1:
            rows[f"down_blocks.{i}.downsampler"] = f"down_blocks.{i}.downsamplers.0.conv"
    rows |= _resnet_rows("mid_block.resnet1", "mid_block.resnets.0", shortcut=False)
    rows |= _transformer_rows("mid_block.attention", "mid_block.attentions.0")
    rows |= _resnet_rows("mid_block.resnet2", "mid_block.resnets.1", shortcut=False)
    return rows


def unet_key_map(cfg: UNetConfig) -> KeyMap:
    """course ``UNet`` module -> ``UNet2DConditionModel`` module, for every module with weights."""
    rows = _encoder_rows(cfg)
    ch = cfg.block_channels
    for i in range(len(ch)):
        level = len(ch) - 1 - i  # up_blocks[0] works at the lowest resolution
        for j in range(cfg.layers_per_block + 1):  # every up ResBlock reads a concatenated skip: always a 1x1 skip
            rows |= _resnet_rows(f"up_blocks.{i}.resnets.{j}", f"up_blocks.{i}.resnets.{j}", shortcut=True)
            if cfg.attention[level]:
                rows |= _transformer_rows(f"up_blocks.{i}.attentions.{j}", f"up_blocks.{i}.attentions.{j}")
        if level > 0:
            rows[f"up_blocks.{i}.upsampler"] = f"up_blocks.{i}.upsamplers.0.conv"
    rows |= {"conv_norm_out": "conv_norm_out", "conv_out": "conv_out"}
    return rows


_UNET_FIXED = dict(  # diffusers settings whose alternatives the course's U-Net does not compute
    flip_sin_to_cos=True, freq_shift=0, act_fn="silu", center_input_sample=False, use_linear_projection=True,
    transformer_layers_per_block=1, only_cross_attention=False, dual_cross_attention=False,
    time_embedding_type="positional", resnet_time_scale_shift="default", class_embed_type=None,
    addition_embed_type=None, encoder_hid_dim=None, conv_in_kernel=3, conv_out_kernel=3,
    mid_block_type="UNetMidBlock2DCrossAttn", time_cond_proj_dim=None, num_class_embeds=None,
)


def _unet_config_from_diffusers(config, what: str, *, up_blocks: bool = True) -> UNetConfig:
    _require(config, _UNET_FIXED, what)
    down = list(config["down_block_types"])
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        raise ValueError(f"{what} has down_block_types={down}; the course knows CrossAttnDownBlock2D and DownBlock2D")
    attention = tuple(t == "CrossAttnDownBlock2D" for t in down)
    if up_blocks:
        want_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
        if list(config["up_block_types"]) != want_up:
            raise ValueError(f"{what} has up_block_types={list(config['up_block_types'])}; the course's U-Net "
                             f"mirrors its down blocks: {want_up}")
    heads = config.get("num_attention_heads") or config["attention_head_dim"]
    channels = tuple(config["block_out_channels"])
    if not isinstance(heads, int) or not isinstance(config["layers_per_block"], int):
        raise ValueError(f"{what}: the course's U-Net has one head count and one layers_per_block for all levels, "
                         f"got heads={heads!r}, layers_per_block={config['layers_per_block']!r}")
    return UNetConfig(in_channels=config["in_channels"], out_channels=config.get("out_channels", 4),
                      block_channels=channels, layers_per_block=config["layers_per_block"], attention=attention,
                      heads=heads, context_dim=config["cross_attention_dim"],
                      time_embed_dim=config.get("time_embedding_dim") or 4 * channels[0],
                      norm_groups=config["norm_num_groups"], ff_mult=4)


def unet_config_from_diffusers(config) -> UNetConfig:
    """The course's ``UNetConfig`` for a ``UNet2DConditionModel`` config (ValueError if it has no counterpart)."""
    return _unet_config_from_diffusers(config, "this UNet2DConditionModel")


def unet_to_diffusers(unet: UNet):
    """A ``diffusers.UNet2DConditionModel`` computing what ``unet`` computes, with copies of its weights."""
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(**unet_diffusers_config(unet.config))
    model.load_state_dict(rename_state_dict(unet.state_dict(), unet_key_map(unet.config), "UNet"), strict=True)
    return _like(_use_course_group_norm_eps(model), unet)


def unet_from_diffusers(model, prediction_type: str = "epsilon") -> UNet:
    """The course's ``UNet`` computing what a ``UNet2DConditionModel`` computes, with copies of its weights.

    prediction_type: what the network was trained to output (diffusers keeps it in the scheduler's config).
    """
    cfg = dataclasses.replace(unet_config_from_diffusers(model.config), prediction_type=prediction_type)
    unet = UNet(cfg)
    unet.load_state_dict(rename_state_dict(model.state_dict(), invert(unet_key_map(cfg)), "UNet2DConditionModel"),
                         strict=True)
    return _like(unet, model)


# ==============================================================================================
# ControlNet <-> ControlNetModel
# ==============================================================================================


def controlnet_diffusers_config(cfg: ControlNetConfig) -> dict:
    """The ``ControlNetModel`` config of the course's ControlNet (its U-Net part is ``unet_diffusers_config``'s)."""
    u = cfg.unet
    if u.time_embed_dim != 4 * u.block_channels[0]:
        raise ValueError(f"ControlNetModel fixes the time embedding at 4 * block_channels[0] = {4 * u.block_channels[0]}, "
                         f"the course's config has time_embed_dim={u.time_embed_dim}")
    unet = unet_diffusers_config(u)
    for name in ("sample_size", "out_channels", "up_block_types", "time_embedding_dim"):  # no decoder, fixed width
        del unet[name]
    return dict(unet, conditioning_channels=cfg.conditioning_channels,  # 3 (RGB control images)
                conditioning_embedding_out_channels=tuple(cfg.conditioning_block_channels))  # (16, 32, 96, 256)


def controlnet_key_map(cfg: ControlNetConfig) -> KeyMap:
    """course ``ControlNet`` module -> ``ControlNetModel`` module: the U-Net's encoder rows, then the control
    image's encoder and the zero convolutions, which have the same names on both sides."""
    rows = _encoder_rows(cfg.unet)
    rows["controlnet_cond_embedding.conv_in"] = "controlnet_cond_embedding.conv_in"
    for k in range(2 * (len(cfg.conditioning_block_channels) - 1)):  # two convs per width change
        rows[f"controlnet_cond_embedding.blocks.{k}"] = f"controlnet_cond_embedding.blocks.{k}"
    rows["controlnet_cond_embedding.conv_out"] = "controlnet_cond_embedding.conv_out"
    for k in range(len(skip_channels(cfg.unet))):  # one zero conv per skip connection
        rows[f"controlnet_down_blocks.{k}"] = f"controlnet_down_blocks.{k}"
    rows["controlnet_mid_block"] = "controlnet_mid_block"
    return rows


def controlnet_config_from_diffusers(config) -> ControlNetConfig:
    """The course's ``ControlNetConfig`` for a ``ControlNetModel`` config (ValueError if it has no counterpart)."""
    what = "this ControlNetModel"
    _require(config, dict(controlnet_conditioning_channel_order="rgb", global_pool_conditions=False), what)
    return ControlNetConfig(unet=_unet_config_from_diffusers(config, what, up_blocks=False),
                            conditioning_channels=config["conditioning_channels"],
                            conditioning_block_channels=tuple(config["conditioning_embedding_out_channels"]))


def controlnet_to_diffusers(net: ControlNet):
    """A ``diffusers.ControlNetModel`` computing what ``net`` computes, with copies of its weights."""
    from diffusers import ControlNetModel

    model = ControlNetModel(**controlnet_diffusers_config(net.config))
    model.load_state_dict(rename_state_dict(net.state_dict(), controlnet_key_map(net.config), "ControlNet"),
                          strict=True)
    return _like(_use_course_group_norm_eps(model), net)


def controlnet_from_diffusers(model, prediction_type: str = "epsilon") -> ControlNet:
    """The course's ``ControlNet`` computing what a ``ControlNetModel`` computes, with copies of its weights."""
    cfg = controlnet_config_from_diffusers(model.config)
    cfg.unet = dataclasses.replace(cfg.unet, prediction_type=prediction_type)
    net = ControlNet(cfg)
    net.load_state_dict(rename_state_dict(model.state_dict(), invert(controlnet_key_map(cfg)), "ControlNetModel"),
                        strict=True)
    return _like(net, model)


# ==============================================================================================
# VAE <-> AutoencoderKL
# ==============================================================================================


def vae_diffusers_config(cfg: VAEConfig) -> dict:
    """The ``AutoencoderKL`` config of the course's VAE. SD 1.5's value in each comment."""
    m = len(cfg.block_channels)
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.in_channels,  # 3, 3
        down_block_types=("DownEncoderBlock2D",) * m, up_block_types=("UpDecoderBlock2D",) * m,
        block_out_channels=tuple(cfg.block_channels),  # (128, 256, 512, 512)
        layers_per_block=cfg.layers_per_block,  # 2 (the decoder has one more per level)
        latent_channels=cfg.latent_channels,  # 4
        norm_num_groups=cfg.norm_groups,  # 32
        sample_size=COURSE_IMAGE_SIDE,  # image side (512)
        scaling_factor=cfg.scaling_factor,  # 0.18215
        use_quant_conv=True, use_post_quant_conv=True,  # the 1x1 convs on the moments and on z
        mid_block_add_attention=cfg.mid_attention,  # True
    )


def _vae_attention_rows(course: str, diffusers: str) -> KeyMap:
    """course ``vae.AttnBlock`` (GroupNorm + one-head attention with biased Q/K/V) -> diffusers ``Attention``
    with its own ``group_norm`` and a residual connection; diffusers wraps to_out in a list (``to_out.0``)."""
    rows = {f"{course}.norm": f"{diffusers}.group_norm"}
    for proj in ("to_q", "to_k", "to_v"):
        rows[f"{course}.attn.{proj}"] = f"{diffusers}.{proj}"
    rows[f"{course}.attn.to_out"] = f"{diffusers}.to_out.0"
    return rows


def _vae_mid_rows(course: str, diffusers: str, attention: bool) -> KeyMap:
    """course ``vae.mid_block`` (ResBlock, AttnBlock, ResBlock) -> diffusers ``UNetMidBlock2D``."""
    rows = _resnet_rows(f"{course}.0", f"{diffusers}.resnets.0", shortcut=False, time=False)
    if attention:
        rows |= _vae_attention_rows(f"{course}.1", f"{diffusers}.attentions.0")
    return rows | _resnet_rows(f"{course}.2", f"{diffusers}.resnets.1", shortcut=False, time=False)


def vae_key_map(cfg: VAEConfig) -> KeyMap:
    """course ``VAE`` module -> ``AutoencoderKL`` module, for every module with weights (all of them).

    The course's ``Encoder`` ends with ``quant_conv`` and its ``Decoder`` starts with ``post_quant_conv``;
    ``AutoencoderKL`` keeps both outside its Encoder and Decoder. Everything else has the same place.
    """
    ch, n = cfg.block_channels, cfg.layers_per_block
    rows: KeyMap = {"encoder.conv_in": "encoder.conv_in"}
    for i, c in enumerate(ch):  # encoder.down[i] = n ResBlocks (the first changes the width), then Downsample
        cin = ch[max(i - 1, 0)]
        for j in range(n):
            rows |= _resnet_rows(f"encoder.down.{i}.{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                                 shortcut=j == 0 and cin != c, time=False)
        if i < len(ch) - 1:
            rows[f"encoder.down.{i}.{n}.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
    rows |= _vae_mid_rows("encoder.mid", "encoder.mid_block", cfg.mid_attention)
    rows |= {"encoder.norm_out": "encoder.conv_norm_out", "encoder.conv_out": "encoder.conv_out",
             "encoder.quant_conv": "quant_conv"}
    rows |= {"decoder.post_quant_conv": "post_quant_conv", "decoder.conv_in": "decoder.conv_in"}
    rows |= _vae_mid_rows("decoder.mid", "decoder.mid_block", cfg.mid_attention)
    rch = ch[::-1]
    for i, c in enumerate(rch):  # decoder.up[i] = n + 1 ResBlocks (the first narrows), then Upsample
        cin = rch[max(i - 1, 0)]
        for j in range(n + 1):
            rows |= _resnet_rows(f"decoder.up.{i}.{j}", f"decoder.up_blocks.{i}.resnets.{j}",
                                 shortcut=j == 0 and cin != c, time=False)
        if i < len(ch) - 1:
            rows[f"decoder.up.{i}.{n + 1}.conv"] = f"decoder.up_blocks.{i}.upsamplers.0.conv"
    rows |= {"decoder.norm_out": "decoder.conv_norm_out", "decoder.conv_out": "decoder.conv_out"}
    return rows


_VAE_FIXED = dict(  # diffusers settings whose alternatives the course's VAE does not compute
    act_fn="silu", use_quant_conv=True, use_post_quant_conv=True, shift_factor=None, latents_mean=None,
    latents_std=None,
)


def vae_config_from_diffusers(config) -> VAEConfig:
    """The course's ``VAEConfig`` for an ``AutoencoderKL`` config (ValueError if it has no counterpart)."""
    what = "this AutoencoderKL"
    _require(config, _VAE_FIXED, what)
    m = len(config["block_out_channels"])
    for name, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(config[name]) != [kind] * m:
            raise ValueError(f"{what} has {name}={list(config[name])}; the course's VAE has {m} x {kind}")
    if config["out_channels"] != config["in_channels"]:
        raise ValueError(f"{what} maps {config['in_channels']} channels to {config['out_channels']}; the course's "
                         "VAE reconstructs its input, so both must be equal")
    return VAEConfig(in_channels=config["in_channels"], latent_channels=config["latent_channels"],
                     block_channels=tuple(config["block_out_channels"]), layers_per_block=config["layers_per_block"],
                     norm_groups=config["norm_num_groups"], mid_attention=config.get("mid_block_add_attention", True),
                     scaling_factor=float(config["scaling_factor"]))


def vae_to_diffusers(vae: VAE):
    """A ``diffusers.AutoencoderKL`` computing what ``vae`` computes, with copies of its weights."""
    from diffusers import AutoencoderKL

    model = AutoencoderKL(**vae_diffusers_config(vae.config))
    model.load_state_dict(rename_state_dict(vae.state_dict(), vae_key_map(vae.config), "VAE"), strict=True)
    return _like(model, vae)


def vae_from_diffusers(model) -> VAE:
    """The course's ``VAE`` computing what an ``AutoencoderKL`` computes, with copies of its weights."""
    cfg = vae_config_from_diffusers(model.config)
    vae = VAE(cfg)
    vae.load_state_dict(rename_state_dict(model.state_dict(), invert(vae_key_map(cfg)), "AutoencoderKL"),
                        strict=True)
    return _like(vae, model)
