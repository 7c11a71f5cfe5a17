"""course_lib.personalize (lesson 10): the new-token tokeniser, textual inversion, LoRA (against peft's layer and
diffusers' loader), DreamBooth's loop, and the errors a learner gets for bad input."""

import warnings

import pytest
import torch
from torch import nn

from course_lib import data, personalize as P
from course_lib.clip import Tokenizer, UnknownWordsWarning
from course_lib.tiny_sd import load_tiny_sd

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def sd():
    return load_tiny_sd()


# --- the concept's pictures ---------------------------------------------------------------------------------------

def test_concept_scenes_show_the_concept_and_name_it():
    heart = P.concept_scenes("heart", 6, seed=1)
    assert (heart.shape[:, 0] == data.SHAPES.index("heart")).all() and (heart.n_objects == 1).all()
    assert all("heart" in c.lower() for c in heart.captions)
    assert not set(heart.colour[:, 0].tolist()) & {data.COLOURS.index(c) for c in data.RESERVED_COLOURS}
    brown = P.concept_scenes("brown", 6, seed=1)
    assert (brown.colour[:, 0] == data.COLOURS.index("brown")).all()
    assert all("brown" in c.lower() for c in brown.captions)  # a colour concept is always named
    assert P.with_word(["A red Heart!"], "heart", "<heart>") == ["A red <heart>!"]


@pytest.mark.parametrize("call, message", [
    (lambda: P.concept_scenes("heart", 2), "at least 3 pictures"),
    (lambda: P.concept_scenes("hexagon", 8), "unknown concept"),
    (lambda: P.with_word(["a red circle"], "heart", "sks"), "does not name"),
])
def test_bad_concept_arguments_get_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- new tokens ---------------------------------------------------------------------------------------------------

def test_an_added_token_is_one_id_read_before_the_byte_pair_encoding():
    tok = Tokenizer()
    n = len(tok)
    assert len(tok.encode("a <heart>")) == 2 + 1 + 3  # "<", "heart" (unknown), ">" before it is added
    new = tok.add_token("<heart>")
    assert new == n and len(tok) == n + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownWordsWarning)  # an added token is not an unknown word
        ids = tok.encode("A red <HEART> at the top")
    assert ids.count(new) == 1 and tok.unk_id not in ids
    assert tok.decode(ids) == "a red <heart> at the top"
    assert tok.encode("a red circle") == Tokenizer().encode("a red circle")  # other prompts unchanged


def test_truncation_names_dropped_added_tokens():
    tok = Tokenizer(context_length=6)
    tok.add_token("<x>")
    with pytest.warns(Warning, match="<x>"):
        ids = tok.encode("a red circle and <x>")
    assert len(ids) == 6


@pytest.mark.parametrize("token", ["red", "Circle", "red!", "", "two words", "<x>"])
def test_a_token_the_model_already_reads_is_refused(token):
    tok = Tokenizer()
    tok.add_token("<x>")
    with pytest.raises(ValueError, match="already|non-empty"):
        tok.add_token(token)


# --- textual inversion ----------------------------------------------------------------------------------------------

def test_textual_inversion_trains_only_the_new_row(sd):
    table = sd.clip.text.token_embedding.weight.detach().clone()
    unet = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    plain = sd.encode_prompt(["a red circle"])
    scenes = P.concept_scenes("heart", 4)
    result = P.textual_inversion(sd, scenes, "heart", token="<heart>", init="circle", steps=3, lr=0.1)
    assert result.trainable == sd.clip.config.width and len(result.losses) == 3
    emb = sd.clip.text.token_embedding
    assert torch.equal(emb.weight[:len(table)], table)  # the old table is untouched
    assert not torch.equal(P.token_embedding(sd, "<heart>"), table[sd.tokenizer.encode("circle")[1]])  # it moved
    assert all(torch.equal(v, unet[k]) for k, v in sd.unet.state_dict().items())
    torch.testing.assert_close(sd.encode_prompt(["a red circle"]), plain)  # prompts without the token unchanged


def test_textual_inversion_gradient_reaches_the_new_row_only(sd):
    P.add_token(sd, "<new>", init="circle")
    ids = sd.tokenizer(["a red <new>", "a red circle"])
    z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    loss = P.denoising_loss(sd.unet, sd.clip.text(ids).last_hidden_state, z0, torch.tensor([500, 500]),
                            torch.randn_like(z0), sd.schedule)
    loss.backward()
    (new,) = P.textual_inversion_parameters(sd)
    assert new.grad is not None and new.grad.abs().sum() > 0
    assert all(p.grad is None for p in sd.unet.parameters()) and sd.clip.text.token_embedding.base.weight.grad is None


def test_textual_inversion_file_round_trip(sd, tmp_path):
    P.add_token(sd, "<heart>", init=None, seed=3)
    path = P.save_textual_inversion(sd, "<heart>", tmp_path / "learned_embeds.safetensors")
    from safetensors.torch import load_file

    other = load_tiny_sd()
    assert P.load_textual_inversion(other, load_file(str(path))) == "<heart>"
    torch.testing.assert_close(other.encode_prompt(["a <heart>"]), sd.encode_prompt(["a <heart>"]))
    with pytest.raises(ValueError, match="already added"):
        P.load_textual_inversion(other, load_file(str(path)))
    with pytest.raises(ValueError, match="one known token"):
        P.add_token(other, "<y>", init="heart")  # an unknown word cannot start a new token


# --- LoRA -------------------------------------------------------------------------------------------------------

def test_lora_layer_starts_as_the_base_layer_and_adds_a_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = P.LoRALinear(base, rank=2, alpha=4)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), base(x))  # B starts at zero
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = base(x) + 2.0 * x @ (layer.lora_B @ layer.lora_A).T
    torch.testing.assert_close(layer(x), expected)
    assert torch.linalg.matrix_rank(layer.delta_weight()) <= 2
    torch.testing.assert_close(layer.merged()(x), expected)
    assert not base.weight.requires_grad and layer.lora_A.requires_grad


@pytest.mark.parametrize("rank", [0, -1, 2.0, True, 9])
def test_bad_lora_ranks_get_clear_errors(rank):
    with pytest.raises(ValueError, match="rank"):
        P.LoRALinear(nn.Linear(16, 8), rank=rank)


def test_course_lora_equals_peft_lora_on_the_whole_unet(sd):
    """peft's ``inject_adapter_in_model`` with the same config picks the same layers; with the same A and B the
    two U-Nets give the same output."""
    from peft import LoraConfig, inject_adapter_in_model

    ref = load_tiny_sd().unet
    ref = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=list(P.LORA_TARGETS)), ref)
    names = P.add_lora(sd.unet, rank=4, alpha=8)
    peft_layers = {n: m for n, m in ref.named_modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")}
    assert sorted(peft_layers) == sorted(names)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in P.lora_layers(sd.unet).items():
            theirs = peft_layers[name]
            assert theirs.scaling["default"] == layer.scaling == 2.0
            assert torch.count_nonzero(theirs.lora_B["default"].weight) == 0  # both start at zero
            bound = 1 / layer.base.in_features ** 0.5  # both start A uniform in +-1/sqrt(in)
            assert theirs.lora_A["default"].weight.abs().max() <= bound and layer.lora_A.abs().max() <= bound
            layer.lora_B.normal_(0, 0.05, generator=g)
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
    z = torch.randn(2, 4, 16, 16, generator=g)
    ctx = sd.encode_prompt(["a red circle", "a blue square"])
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ours, theirs = sd.unet(z, t, ctx), ref(z, t, ctx)
        base = load_tiny_sd().unet(z, t, ctx)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert (ours - base).abs().max() > 1e-3  # the adapters change the output: not two no-ops compared


def _random_lora(unet, rank=3, alpha=None, seed=1):
    P.add_lora(unet, rank, alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in P.lora_layers(unet).values():
            layer.lora_B.normal_(0, 0.05, generator=g)


def test_lora_state_dict_round_trip_and_merge(sd):
    _random_lora(sd.unet, alpha=6)
    state = P.lora_state_dict(sd.unet)
    assert all(k.startswith("unet.") and k.endswith(("lora_A.weight", "lora_B.weight")) for k in state)
    fresh = load_tiny_sd()
    P.load_lora(fresh.unet, state)
    z = torch.randn(1, 4, 16, 16)
    ctx = sd.encode_prompt(["a red circle"])
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(z, 50, ctx), sd.unet(z, 50, ctx))
        P.remove_lora(fresh.unet, merge=True)
        assert not P.lora_layers(fresh.unet)
        torch.testing.assert_close(fresh.unet(z, 50, ctx), sd.unet(z, 50, ctx), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already has LoRA"):
        P.add_lora(sd.unet, 2)
    with pytest.raises(ValueError, match="not a LoRA tensor"):
        P.load_lora(load_tiny_sd().unet, {"unet.nowhere.lora_A.weight": torch.zeros(2, 2)})


def test_diffusers_load_lora_weights_gives_the_course_images(sd, tmp_path):
    """The course's LoRA file, read by ``StableDiffusionPipeline.load_lora_weights`` around the course's VAE and
    U-Net, gives the latents and images of the course's own loading."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    from course_lib import diffusers_weights as W
    from course_lib.diffusers_bridge import build_tiny_pipeline, sd_scheduler_config

    base = W.unet_to_diffusers(sd.unet)
    _random_lora(sd.unet, alpha=6)
    save_file(P.lora_state_dict(sd.unet), str(tmp_path / "pytorch_lora_weights.safetensors"))
    tiny = build_tiny_pipeline()
    pipe = StableDiffusionPipeline(vae=W.vae_to_diffusers(sd.vae), text_encoder=tiny.text_encoder,
                                   tokenizer=tiny.tokenizer, unet=base,
                                   scheduler=DDIMScheduler.from_config(sd_scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path))
    prompts = ["a red circle in the top left", "a large blue square"]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    images, ours = sd.generate(prompts, num_steps=8, latents=latents, return_latents=True)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=sd.encode_prompt(prompts), negative_prompt_embeds=sd.encode_prompt([""] * 2),
                      latents=latents, height=64, width=64, num_inference_steps=8, guidance_scale=5.0,
                      output_type="latent").images
        their_images = pipe.vae.decode(theirs / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(images, their_images, atol=1e-4, rtol=1e-4)
    P.set_lora_scale(sd.unet, 0.5)  # the LoRA scale: diffusers' set_adapters weight
    pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[0.5])
    half = sd.generate(prompts, num_steps=8, latents=latents, return_latents=True)[1]
    with torch.no_grad():
        their_half = pipe(prompt_embeds=sd.encode_prompt(prompts), negative_prompt_embeds=sd.encode_prompt([""] * 2),
                          latents=latents, height=64, width=64, num_inference_steps=8, guidance_scale=5.0,
                          output_type="latent").images
    torch.testing.assert_close(half, their_half, atol=1e-5, rtol=1e-5)
    assert (half - ours).abs().max() > 1e-3
    pipe.unload_lora_weights()
    with torch.no_grad():
        without = pipe(prompt_embeds=sd.encode_prompt(prompts), negative_prompt_embeds=sd.encode_prompt([""] * 2),
                       latents=latents, height=64, width=64, num_inference_steps=8, guidance_scale=5.0,
                       output_type="latent").images
    assert (without - ours).abs().max() > 1e-2  # the file mattered


# --- the loop, DreamBooth -------------------------------------------------------------------------------------------

def test_lora_training_changes_only_the_adapters(sd):
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    result = P.lora(sd, P.concept_scenes("heart", 4), "heart", rank=2, steps=3, lr=1e-2)
    assert result.trainable == P.count_parameters(P.lora_parameters(sd.unet)) and len(result.losses) == 3
    for name, layer in P.lora_layers(sd.unet).items():
        assert torch.equal(layer.base.weight, before[f"{name}.weight"])
        assert layer.lora_B.abs().sum() > 0


def test_dreambooth_trains_the_whole_unet_and_fits_the_prior(sd):
    images = data.to_float(data.generate(4, seed=2).images)
    prior = P.Encoded.from_images(sd, images, data.generate(4, seed=2).captions)
    n = sum(p.numel() for p in sd.unet.parameters())
    result = P.dreambooth(sd, P.concept_scenes("heart", 4), "heart", prior=prior, steps=2, batch_size=2)
    assert result.trainable == n and len(result.prior_losses) == 2
    assert not any(p.requires_grad for p in sd.unet.parameters())  # frozen again afterwards


def test_fit_refuses_too_few_pictures_and_no_parameters(sd):
    scenes = P.concept_scenes("heart", 3)
    two = P.Encoded.from_images(sd, scenes.images[:2], scenes.captions[:2])
    with pytest.raises(ValueError, match="at least 3"):
        P.fit(sd, list(sd.unet.parameters())[:1], two, steps=1, lr=1e-3)
    with pytest.raises(ValueError, match="nothing to train"):
        P.fit(sd, [], P.Encoded.from_images(sd, scenes.images, scenes.captions), steps=1, lr=1e-3)


def test_lora_scale_zero_is_the_base_model_and_bad_scales_are_refused(sd):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = sd.encode_prompt(["a red circle"])
    with torch.no_grad():
        base = sd.unet(z, 300, ctx)
        _random_lora(sd.unet)
        P.set_lora_scale(sd.unet, 0.0)
        torch.testing.assert_close(sd.unet(z, 300, ctx), base)
        P.set_lora_scale(sd.unet, 1.0)
        assert (sd.unet(z, 300, ctx) - base).abs().max() > 1e-3
    for bad in (float("nan"), "1", True):
        with pytest.raises(ValueError, match="finite number"):
            P.set_lora_scale(sd.unet, bad)
    with pytest.raises(ValueError, match="no LoRA layers"):
        P.set_lora_scale(load_tiny_sd().unet, 0.5)


# --- the shipped adapters and the benchmark ---------------------------------------------------------------------------

def _shipped(name):
    from course_lib.weights import WEIGHTS_DIR

    if not (WEIGHTS_DIR / f"{name}.json").exists():
        pytest.skip(f"no weights/{name}.* (python -m course_lib.train --only personalize)")


def test_shipped_adapters_load_with_their_checksums_and_change_only_what_they_should(sd):
    _shipped("dreambooth_unet")
    from course_lib.weights import read_card

    plain = sd.encode_prompt(["a red circle"])
    token = P.load_textual_inversion_file(sd, "ti_heart")
    assert token == "<heart>" and read_card("ti_heart")["config"]["concept"] == "heart"
    torch.testing.assert_close(sd.encode_prompt(["a red circle"]), plain)
    assert not torch.allclose(sd.encode_prompt(["a red <heart>"]), sd.encode_prompt(["a red circle"]))
    names = P.load_lora_file(sd.unet, "lora_heart_r4")
    assert len(names) == len(P.lora_layers(sd.unet)) > 0
    card = read_card("lora_heart_r4")
    assert card["num_parameters"] == P.count_parameters(P.lora_parameters(sd.unet)) and card["config"]["rank"] == 4
    db = P.load_dreambooth_unet()
    assert db.card["stored_dtype"] == "float16" and next(db.parameters()).dtype == torch.float32
    assert db.card["metrics"]["ordinary_adherence"] >= 0 and "without_prior_preservation" in db.card


def test_the_shipped_dreambooth_unet_draws_hearts_for_sks_more_often_than_the_shipped_unet(sd):
    """The effect the card reports, re-measured on 16 held-out prompts: more hearts than the unknown word gets."""
    _shipped("dreambooth_unet")
    from course_lib.evaluator import load_evaluator

    evaluator = load_evaluator()
    before = P.concept_adherence(sd, evaluator, "heart", P.TRIGGER, n=16)["concept"]
    sd.unet = P.load_dreambooth_unet()
    after = P.concept_adherence(sd, evaluator, "heart", P.TRIGGER, n=16)["concept"]
    assert after > before + 0.1, (before, after)


def test_the_benchmark_runs_end_to_end(tmp_path):
    _shipped("dreambooth_unet")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_personalize.py"), "--n", "2",
                           "--ordinary", "2", "--skip-retrain", "--threads", "1", "--assets", str(tmp_path)],
                          cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_personalize.json").read_text())
    methods = [row["method"] for row in result["rows"]]
    assert "textual inversion (heart)" in methods and "textual inversion (triangle)" in methods
    assert any(m == "LoRA rank 4 + prior preservation" for m in methods)
    assert methods[-1] == "DreamBooth + prior preservation" and (tmp_path / "personalize_samples.png").exists()
    assert "| method |" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_three_methods_train_on_cuda_with_the_cpus_first_steps():
    """The same seeded run on CPU and CUDA: noise and batches are drawn on the CPU, so the first losses agree."""
    losses = {}
    for device in ("cpu", "cuda"):
        sd = load_tiny_sd(device)
        scenes = P.concept_scenes("heart", 4)
        losses[device] = [P.textual_inversion(sd, scenes, "heart", token="<h>", steps=2).losses[0],
                          P.lora(load_tiny_sd(device), scenes, "heart", rank=2, steps=2).losses[0],
                          P.dreambooth(load_tiny_sd(device), scenes, "heart", steps=2).losses[0]]
    assert losses["cpu"] == pytest.approx(losses["cuda"], rel=1e-3)
