"""A few steps of every training function on tiny models: they run, write loadable files, and are seeded."""

import json

import torch

from course_lib import build_weights, data, train
from course_lib.evaluator import load_evaluator
from course_lib.tiny_sd import load_tiny_sd
from course_lib.weights import load_clip, load_unet, load_vae, read_card


def test_quick_command_trains_every_model_and_the_pipeline_loads(tmp_path):
    build_weights.main(["--quick", "--out", str(tmp_path), "--quiet", "--threads", "1"])
    for name in train.MODELS:
        if name == "personalize":  # lesson 10's adapters: several files, 2 steps each in the quick run
            for adapter in ("ti_heart", "lora_heart_r1", "dreambooth_unet"):
                card = json.loads((tmp_path / f"{adapter}.json").read_text())
                assert card["steps"] == 2 and "concept_adherence" in card["metrics"] and "torch" in card["versions"]
            continue
        card = json.loads((tmp_path / f"{name}.json").read_text())
        assert card["steps"] == 5 and card["device"] == "cpu" and card["wall_time_s"] >= 0
        assert len(card["loss"]["curve"]) >= 1 and "torch" in card["versions"]
    for loader in (load_evaluator, load_vae, load_clip, load_unet):
        loader(tmp_path)
    assert read_card("vae", tmp_path)["config"]["scaling_factor"] > 0
    from course_lib import personalize

    pipe = load_tiny_sd(weights_dir=tmp_path)
    personalize.load_textual_inversion_file(pipe, "ti_heart", tmp_path)
    personalize.load_lora_file(load_tiny_sd(weights_dir=tmp_path).unet, "lora_heart_r1", tmp_path)
    personalize.load_dreambooth_unet(tmp_path)
    out = pipe.generate(["a small red circle in the centre"], num_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 64, 64)
    from course_lib.flow_sd import load_flow_sd
    from course_lib.lcm import load_lcm_sd

    flow_sd = load_flow_sd(weights_dir=tmp_path)  # lesson 11: the U-Net's loop with the rectified-flow objective
    assert flow_sd.unet.config.prediction_type == "flow_prediction"
    assert "adherence_one_object_guidance_5_flow_euler20" in read_card("flow_unet", tmp_path)["metrics"]
    assert flow_sd.generate("a red circle", num_steps=2).shape == (1, 3, 64, 64)
    lcm_sd = load_lcm_sd(weights_dir=tmp_path)  # and the U-Net distilled into a consistency model
    assert lcm_sd.unet.distilled_guidance == 5.0
    assert read_card("lcm_unet", tmp_path)["teacher_sha256"] == read_card("unet", tmp_path)["sha256"]
    assert lcm_sd.generate("a red circle", num_steps=2).shape == (1, 3, 64, 64)


def test_training_is_seeded(tmp_path):
    s = train.quick_settings()
    scenes, held = data.generate(64, seed=0), data.generate(16, seed=0, split="heldout")
    tc, cfg = s["evaluator"]
    a = train.train_evaluator(scenes, held, tc=tc, config=cfg, out_dir=tmp_path / "a", quiet=True)
    b = train.train_evaluator(scenes, held, tc=tc, config=cfg, out_dir=tmp_path / "b", quiet=True)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_vae_crops_hold_an_object_and_sit_on_the_latent_grid():
    scenes = data.generate(32, seed=4)
    g = torch.Generator().manual_seed(0)
    crops = train.object_crops(scenes, torch.arange(32), 32, g)
    assert crops.shape == (32, 3, 32, 32) and crops.dtype == torch.uint8
    # Backgrounds vary in brightness, so look for an object by contrast: some pixel far from the crop's median.
    median = crops.flatten(2).float().median(2).values  # (32, 3)
    differs = ((crops.float() - median[:, :, None, None]).abs().amax(1) > 40).flatten(1).any(1)
    assert differs.float().mean() > 0.9


def test_learning_rate_schedule():
    assert train.lr_at(0, 1000, 1.0, warmup=100) == 0.01
    assert train.lr_at(100, 1000, 1.0, warmup=100) == 1.0
    assert abs(train.lr_at(999, 1000, 1.0, warmup=100) - 0.05) < 1e-3
    assert train.lr_at(999, 1000, 1.0, warmup=100, cosine=False) == 1.0


def test_flow_training_and_distillation_are_seeded(tmp_path):
    """Lesson 11's two new runs give the same weights twice: the flow U-Net (the U-Net's loop, rectified-flow batch)
    and the LCM distillation (its noise, timesteps and batches from one CPU generator)."""
    from course_lib import lcm

    build_weights.main(["--quick", "--out", str(tmp_path / "base"), "--quiet", "--threads", "1",
                        "--only", "evaluator,vae,clip,unet"])
    s = train.quick_settings()
    scenes, held = data.generate(64, seed=0), data.generate(16, seed=0, split="heldout")
    tc, cfg = s["flow_unet"]
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        for f in (tmp_path / "base").iterdir():
            (out / f.name).write_bytes(f.read_bytes())
        flow_unet = train.train_unet(scenes, held, tc=tc, config=cfg, out_dir=out, quiet=True)
        student = lcm.distill_lcm(scenes, held, tc=lcm.quick_lcm(), out_dir=out, quiet=True)
        runs.append((flow_unet.state_dict(), student.state_dict()))
    for a, b in zip(runs[0], runs[1]):
        for (k, va), vb in zip(a.items(), b.values()):
            assert torch.equal(va, vb), k
    teacher = load_unet(tmp_path / "a")
    assert any(not torch.equal(v, teacher.state_dict()[k]) for k, v in runs[0][1].items())  # the student moved
