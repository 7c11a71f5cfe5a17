"""The helpers behind lessons 1-3 (vae_viz, attention_viz, clip_viz) and their "check yourself" checks."""

import math

import pytest
import torch

from course_lib import data
from course_lib.attention import AttentionStore
from course_lib.viz.attention import mass_inside, object_mask, token_labels, token_maps, word_kind
from course_tools.checking import ExerciseIncomplete
from course_lib.checks import CHECKS, attention, check, clip, vae
from course_lib.clip import CLIP, CLIPConfig, Tokenizer
from course_lib.viz.clip import (attribute_options, binding_preference, binding_swaps, swappable, trained_values,
                                 zero_shot_accuracy)
from course_lib.schedules import sd_schedule
from course_lib.vae import VAE, VAEConfig
from course_lib.viz.vae import (apply_latent_to_rgb, compression_table, latent_to_rgb, snr_db_with_data_std,
                                trace_shapes)


def test_compression_table_ratio_is_constant_and_savings_quadratic():
    rows = {r["resolution"]: r for r in compression_table([256, 512, 1024])}
    assert all(r["ratio"] == 48 for r in rows.values())
    assert rows[1024]["saved_mib"] / rows[512]["saved_mib"] == pytest.approx(4.0)
    assert rows[512]["pixel_attention_entries"] / rows[512]["latent_attention_entries"] == 4096
    with pytest.raises(ValueError, match="multiple"):
        compression_table([500])


def test_trace_shapes_follows_the_vae_down_and_up():
    vae = VAE(VAEConfig(block_channels=(8, 8, 8, 8), layers_per_block=1, norm_groups=4)).eval()
    x = torch.zeros(1, 3, 64, 64)
    rows = trace_shapes(vae, lambda: vae.decode(vae.encode(x).mode()),
                        {"conv_out": vae.encoder.conv_out, "decoder out": vae.decoder.conv_out})
    assert rows[0][:2] == ("conv_out", (1, 8, 8, 8)) and rows[1][:2] == ("decoder out", (1, 3, 64, 64))
    assert rows[0][2] == sum(p.numel() for p in vae.encoder.conv_out.parameters())
    assert not any(m._forward_hooks for m in vae.modules())  # hooks removed


def test_latent_to_rgb_recovers_an_exact_linear_map():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 4, 8, 8, generator=g)
    w = torch.randn(5, 3, generator=g) * 0.05
    rgb8 = apply_latent_to_rgb(z, w)  # (16, 3, 8, 8), inside [-1, 1] for small weights
    images = rgb8.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)  # constant 8x8 blocks
    assert (rgb8.abs() < 1).all()  # nothing clamped, so the map is exactly linear
    fitted, r2 = latent_to_rgb(z, images)
    assert r2 == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(fitted, w, atol=1e-4, rtol=1e-4)


def test_snr_with_data_std_shifts_by_20_log10_std():
    ab = sd_schedule().alphas_cumprod
    base = snr_db_with_data_std(ab, 1.0)
    torch.testing.assert_close(snr_db_with_data_std(ab, 5.0) - base, torch.full_like(base, 20 * math.log10(5.0)))


def test_token_maps_average_layers_heads_and_keep_the_conditional_half(tiny_unet):
    unet = tiny_unet
    x, ctx = torch.randn(4, 4, 8, 8), torch.randn(4, 7, 24)  # 2 prompts x [uncond, cond]
    with torch.no_grad(), AttentionStore(unet, kind="cross") as store:
        for t in (900, 100):  # two "sampler steps"
            unet(x, t, ctx)
    maps = token_maps(store.maps, batch=2)
    assert maps.shape == (2, 2, 7, 8, 8)
    torch.testing.assert_close(maps.sum(dim=2), torch.ones(2, 2, 8, 8), atol=1e-5, rtol=0)  # softmax over tokens
    layer = store.maps["down_blocks.0.attentions.0.attn2"][0]  # (4, heads, 64, 7), 8x8 layer
    torch.testing.assert_close(token_maps({"l": [layer]}, 2), token_maps({"l": [layer]}, 4, guided=False)[:, 2:])
    with pytest.raises(ValueError, match="rows per call"):
        token_maps(store.maps, batch=3)


def test_object_mask_and_mass_inside():
    scenes = data.generate(32, seed=0)  # one to three objects, striped ones, every background and its gradient
    masks = object_mask(scenes.images_float())
    assert torch.equal(masks, scenes.masks.any(dim=1))  # exactly the pixels the objects cover
    masks = masks[:4]
    uniform = torch.ones(4, 1, 8, 8)
    torch.testing.assert_close(mass_inside(uniform, masks)[:, 0], masks.float().mean((1, 2)), atol=1e-5, rtol=0)
    spot = torch.zeros(4, 1, 8, 8)
    spot[:, 0, 0, 0] = 1.0
    inside_corner = mass_inside(spot, torch.ones(4, 64, 64, dtype=torch.bool))
    torch.testing.assert_close(inside_corner, torch.ones(4, 1))


def test_token_labels_and_word_kinds():
    labels = token_labels(Tokenizer(), "a large red circle in the top left")
    assert labels[:5] == ["<|startoftext|>", "a", "large", "red", "circle"] and len(labels) == 48
    kinds = [word_kind(t) for t in labels[:10]] + [word_kind(labels[-1])]
    assert kinds == ["start", "other word", "size", "colour", "shape", "other word", "other word", "position",
                     "position", "end", "padding"]
    # CLIP's BPE cuts rarer words into pieces: each piece keeps its word's kind ("an" of "cyan" is also the article)
    labels = token_labels(Tokenizer(), "A big stripy cyan ring, upper-left, on gray!")
    assert labels[1:16] == ["a", "big", "stri", "py", "cy", "an", "ring", ",", "upper", "-", "left", ",", "on",
                            "gray", "!"]
    assert [word_kind(t) for t in labels[1:16]] == [
        "other word", "size", "fill", "fill", "colour", "other word", "shape", "other word", "position",
        "other word", "position", "other word", "other word", "background", "other word"]


def test_zero_shot_candidates_and_binding_swaps():
    scenes = data.generate(64, seed=0)
    one = next(i for i in range(64) if int(scenes.n_objects[i]) == 1)
    two = next(i for i in range(64) if int(scenes.n_objects[i]) == 2)
    truth = scenes.attributes(one)
    values, options = attribute_options(truth, "colour")
    assert values == list(data.TRAIN_COLOURS) == trained_values("colour") and len(set(options)) == 8
    assert trained_values("shape") == list(data.TRAIN_SHAPES) and trained_values("position") == list(data.POSITIONS)
    for v, c in zip(values, options):  # each candidate says everything true of the scene but the colour
        said = {"objects": [dict(truth["objects"][0], colour=v)], "background": truth["background"]}
        assert data.parse_prompt(c) == said
        assert not Tokenizer().unknown_words(c)
    two = next(i for i in range(64) if swappable(scenes.attributes(i)))
    swaps = binding_swaps(scenes.attributes(two))
    parsed = {k: data.parse_prompt(v)["objects"] for k, v in swaps.items()}
    assert parsed["true"] == scenes.attributes(two)["objects"]
    assert sorted(o["colour"] for o in parsed["true"]) == sorted(o["colour"] for o in parsed["colours swapped"])
    assert parsed["true"][0]["colour"] == parsed["colours swapped"][1]["colour"] != parsed["true"][1]["colour"]
    assert parsed["true"][0]["position"] == parsed["positions swapped"][1]["position"] != parsed["true"][1]["position"]
    assert not swappable(scenes.attributes(one))
    with pytest.raises(ValueError):
        attribute_options(scenes.attributes(two), "colour")
    clip = CLIP(CLIPConfig(width=32, layers=1, heads=2, embed_dim=16, image_channels=(8, 8, 8, 8))).eval()
    singles = [i for i in range(64) if int(scenes.n_objects[i]) == 1][:8]
    pairs = [i for i in range(64) if swappable(scenes.attributes(i))][:8]
    assert 0.0 <= zero_shot_accuracy(clip, Tokenizer(), scenes, singles, "shape") <= 1.0
    prefs = binding_preference(clip, Tokenizer(), scenes, pairs)
    assert set(prefs) == {"colours swapped", "positions swapped"}
    assert all(0 <= v["preferred"] <= 1 and -1 <= v["text_cosine"] <= 1 + 1e-6 for v in prefs.values())


def _wrong_split(x, heads):
    b, n, c = x.shape
    return x.view(b, heads, n, c // heads)  # right shape, wrong layout


@pytest.mark.parametrize("check_id,objects", [
    ("scaling_factor", (vae.scaling_factor, vae.latent_snr_db)),
    ("attention_heads", (attention.split_heads, attention.merge_heads)),
    ("clip_context", (clip.clip_context, clip.zero_shot_probs)),
])
def test_lesson_checks_pass_the_references(check_id, objects, capsys):
    assert check(check_id, *objects) is None  # one table shown, nothing returned for the cell to show again
    assert capsys.readouterr().out.count(CHECKS[check_id].title) == 1


@pytest.mark.parametrize("check_id,objects,failing", [
    ("scaling_factor", (lambda z: z.std().item(), vae.latent_snr_db), 2),
    ("attention_heads", (_wrong_split, attention.merge_heads), 2),
    ("clip_context", (lambda ids, context_length=77, bos=49406, eos=49407, pad=0:
                      ([bos] + list(ids) + [eos] + [pad] * 77)[:context_length], clip.zero_shot_probs), 1),
])
def test_lesson_checks_catch_the_usual_mistakes(check_id, objects, failing):
    with pytest.raises(ExerciseIncomplete) as err:
        check(check_id, *objects)
    assert sum(not c.passed for c in err.value.result.checks) == failing
