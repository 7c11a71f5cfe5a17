"""Inpainting (lesson 9): blending with the ordinary U-Net (+ RePaint's resampling) and the 9-channel U-Net.

What is checked: bad masks and images are refused with errors that say what to do; blending keeps the
known region's latent exactly after the last step (so its pixels are the VAE's round trip); RePaint's
schedule visits the steps it should; the inpainting U-Net built from the base U-Net is the base U-Net at
initialisation (and, fully masked, inpainting with it is text-to-image); the random training masks come in
the stated shares; the measures behave on cases with known answers. Parity with diffusers:
tests/test_inpainting_diffusers_parity.py.
"""

import math

import pytest
import torch

from course_lib import data, inpainting as I
from course_lib.tiny_sd import load_tiny_sd
from course_lib.weights import WEIGHTS_DIR, load_inpaint_unet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd():
    return load_tiny_sd()


@pytest.fixture(scope="module")
def scene():
    s = data.generate(2, seed=5, split="heldout")
    return s.images_float(), I.dilate(s.masks[:, :1], 2)  # (2, 3, 64, 64), (2, 1, 64, 64)


# --- Bad input. ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,words", [
    (torch.full((2, 1, 64, 64), 0.5), "only 0 and 1"),
    (torch.full((2, 1, 64, 64), 255, dtype=torch.uint8), "mask > 127"),
    (torch.ones(2, 1, 32, 32), "the image's size"),
    (torch.ones(2, 3, 64, 64), "one\nchannel".replace("\n", " ")),
    (torch.ones(3, 1, 64, 64), "3 masks for 2 images"),
    (torch.ones(2, 64, 64), "(1, 64, 64)"),
    ([[0, 1]], "torch tensor"),
])
def test_bad_masks_are_refused_clearly(sd, scene, bad, words):
    image, _ = scene
    for method in (lambda m: I.inpaint_blend(sd, image, m, "a red circle", 2),
                   lambda m: I.inpaint_with_unet(sd, I.inpaint_unet_from_base(sd.unet), image, m, "a red circle", 2)):
        with pytest.raises(ValueError, match="mask") as err:
            method(bad)
        assert words in str(err.value)


@pytest.mark.parametrize("bad,words", [
    (torch.zeros(2, 3, 32, 32), "64x64"),
    (torch.zeros(2, 1, 64, 64), "(B, 3, 64, 64)"),
    (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), "to_float"),
    (torch.full((2, 3, 64, 64), 200.0), "[-1, 1]"),
])
def test_bad_images_are_refused_clearly(sd, scene, bad, words):
    _, mask = scene
    with pytest.raises(ValueError, match="image") as err:
        I.inpaint_blend(sd, bad, mask, "a red circle", 2)
    assert words in str(err.value)


def test_other_bad_arguments(sd, scene):
    image, mask = scene
    with pytest.raises(ValueError, match="prompts for 2 images"):
        I.inpaint_blend(sd, image, mask, ["a", "b", "c"], 2)
    with pytest.raises(ValueError, match="resample"):
        I.inpaint_blend(sd, image, mask, "a red circle", 2, resample=0)
    with pytest.raises(ValueError, match="9 input channels"):
        I.inpaint_with_unet(sd, sd.unet, image, mask, "a red circle", 2)
    with pytest.raises(ValueError, match="guidance_scale"):
        I.inpaint_blend(sd, image, mask, "a red circle", 2, guidance_scale=0.5)


def test_masks_in_every_accepted_form_mean_the_same(scene):
    _, mask = scene
    one = mask[:1]
    ref = I.check_mask(one, 1)
    for form in (one[0, 0], one[0], one.bool(), one.to(torch.uint8), one.double()):
        assert torch.equal(I.check_mask(form, 1), ref)
    assert I.check_mask(one, 3).shape == (3, 1, 64, 64)  # one mask for every image


# --- The mask on the latent grid. ----------------------------------------------------------------------------

def test_latent_mask_max_pooling_and_diffusers_nearest():
    m = torch.zeros(1, 1, 64, 64)
    m[0, 0, 5, 6] = 1  # one pixel inside latent cell (1, 1), not its top-left pixel
    assert I.latent_mask(m).sum() == 1 and I.latent_mask(m)[0, 0, 1, 1] == 1
    assert I.latent_mask(m, mode="nearest").sum() == 0  # diffusers' resize looks at the top-left pixel only
    m[0, 0, 4, 4] = 1
    assert I.latent_mask(m, mode="nearest")[0, 0, 1, 1] == 1
    with pytest.raises(ValueError, match="mask mode"):
        I.latent_mask(m, mode="bilinear")


# --- RePaint's schedule. ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,r,j", [(10, 1, 1), (10, 2, 1), (10, 3, 1), (12, 2, 3), (7, 2, 3)])
def test_repaint_schedule(n, r, j):
    seq = I.repaint_schedule(n, r, j)
    assert seq[0] == 0 and seq[-1] == n and all(abs(b - a) == 1 for a, b in zip(seq, seq[1:]))
    downs = sum(b > a for a, b in zip(seq, seq[1:]))
    jumps = len(range(j, n, j))  # grid points that jump back, j steps, r - 1 times each
    assert downs == n + (r - 1) * jumps * j
    if r == 1:
        assert seq == list(range(n + 1))


# --- Blending keeps the known region. ------------------------------------------------------------------------------

@pytest.mark.parametrize("resample", [1, 2])
def test_blend_keeps_the_known_latent_exactly_and_its_pixels_up_to_the_vae(sd, scene, resample):
    image, mask = scene
    out, z = I.inpaint_blend(sd, image, mask, "a blue square", 6, 5.0, torch.Generator().manual_seed(0),
                             resample=resample, return_latents=True)
    z_image = sd.vae.encode(image).sample(torch.Generator().manual_seed(0)) * sd.vae.config.scaling_factor
    keep = I.latent_mask(mask) == 0  # (2, 1, 16, 16)
    assert keep.any() and (~keep).any()
    assert torch.equal(torch.where(keep, z, 0.0), torch.where(keep, z_image, 0.0))
    assert (z - z_image).abs().amax() > 0.1  # the masked region did change
    # pixels far (> 8 px) from anything repainted: the VAE round trip of the input, up to what the decoder's
    # mid-block self-attention carries across the whole image (a few 1/1000 on average, not exactly 0)
    region = torch.nn.functional.interpolate(I.latent_mask(mask), scale_factor=4)
    far = (I.dilate(region, 8) == 0).expand_as(out)
    round_trip = sd.decode_latents(z_image)
    assert far.any()
    assert (out - round_trip).abs()[far].mean() < 0.02
    assert I.psnr_outside(out, image, mask).min() > 22  # dB against the input itself


def test_blend_with_an_empty_mask_is_the_vae_round_trip(sd, scene):
    image, mask = scene
    out = I.inpaint_blend(sd, image, torch.zeros_like(mask), "a blue square", 3, 1.0, torch.Generator().manual_seed(2))
    z_image = sd.vae.encode(image).sample(torch.Generator().manual_seed(2)) * sd.vae.config.scaling_factor
    torch.testing.assert_close(out, sd.decode_latents(z_image), atol=1e-6, rtol=0)


def test_resampling_changes_the_result_and_is_seeded(sd, scene):
    image, mask = scene
    run = lambda r, seed: I.inpaint_blend(sd, image, mask, "a blue square", 5, 5.0, torch.Generator().manual_seed(seed),
                                          resample=r)
    assert torch.equal(run(2, 1), run(2, 1))
    assert (run(2, 1) - run(1, 1)).abs().amax() > 0.05


# --- The inpainting U-Net. ------------------------------------------------------------------------------------------

def test_inpainting_unet_at_initialisation_is_the_base_unet(sd):
    net = I.inpaint_unet_from_base(sd.unet)
    assert net.config.in_channels == 9 and torch.equal(net.conv_in.weight[:, 4:], torch.zeros_like(net.conv_in.weight[:, 4:]))
    g = torch.Generator().manual_seed(0)
    x, extra = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 5, 16, 16, generator=g)
    ctx = sd.encode_prompt(["a red circle", "", "a green star in the top left"])
    t = torch.tensor([999, 500, 10])
    with torch.no_grad():
        torch.testing.assert_close(net(torch.cat([x, extra], 1), t, ctx), sd.unet(x, t, ctx), atol=1e-6, rtol=0)
    assert net.conv_in.weight.data_ptr() != sd.unet.conv_in.weight.data_ptr()  # a copy: training it leaves the base


def test_fully_masked_inpainting_at_initialisation_is_text_to_image(sd, scene):
    """With every pixel masked and the extra channels zero, the 9-channel pipeline draws the same noise first
    and runs the same DDIM loop as TinySD.generate: the same latents."""
    image, _ = scene
    net = I.inpaint_unet_from_base(sd.unet)
    prompts = ["a red circle", "a small green star"]
    _, z = I.inpaint_with_unet(sd, net, image, torch.ones(1, 64, 64), prompts, 6, 5.0, torch.Generator().manual_seed(3),
                               return_latents=True)
    _, ref = sd.generate(prompts, 6, 5.0, generator=torch.Generator().manual_seed(3), return_latents=True)
    torch.testing.assert_close(z, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not (WEIGHTS_DIR / "inpaint_unet.json").exists(), reason="no weights/inpaint_unet.*")
def test_shipped_inpainting_unet_loads_and_learnt_to_use_its_extra_channels(sd):
    net = load_inpaint_unet()
    assert net.config.in_channels == 9 and net.card["steps"] > 0
    assert net.conv_in.weight[:, 4:].abs().amax() > 1e-3  # no longer zero: it reads the mask and masked image
    # it keeps the unmasked region better than the same network at initialisation, which cannot see the mask
    # (measured: 16.5 dB against 14.6 on these 8 tasks; the benchmark's 64: 18.2 dB, and 33.6 with blending)
    tasks = I.edit_tasks(data.generate(8, seed=0, split="heldout"), 8)
    psnr = {}
    for name, model in (("init", I.inpaint_unet_from_base(sd.unet)), ("trained", net)):
        out = I.inpaint_with_unet(sd, model, tasks.images, tasks.masks, tasks.prompts, 10, 5.0,
                                  torch.Generator().manual_seed(0))
        psnr[name] = I.psnr_outside(out, tasks.images, tasks.masks).mean().item()
    assert psnr["trained"] > psnr["init"] + 1.0, psnr


# --- Training masks. -----------------------------------------------------------------------------------------------

def test_random_masks_come_in_the_stated_shares_and_are_seeded():
    s = data.generate(400, seed=1)
    settings = I.MaskSettings()
    m = I.random_masks(s.masks, s.n_objects, torch.Generator().manual_seed(0), settings)
    assert m.shape == (400, 1, 64, 64) and set(m.unique().tolist()) <= {0.0, 1.0}
    full = (m.flatten(1).mean(1) == 1).float().mean()
    assert abs(full - settings.full) < 0.07
    # an object mask covers its object: most masks of kind "object" contain one of the scene's objects whole
    covers = ((s.masks.float() <= m).flatten(2).all(-1) & s.masks.flatten(2).any(-1)).any(1).float().mean()
    assert covers > settings.objects  # (full masks cover everything too)
    assert torch.equal(m, I.random_masks(s.masks, s.n_objects, torch.Generator().manual_seed(0), settings))


def test_stroke_and_rectangle_masks():
    g = torch.Generator().manual_seed(0)
    r = I.rectangle_masks(50, g)
    rows, cols = r.any(3)[:, 0], r.any(2)[:, 0]  # (50, 64) each
    assert torch.equal(r[:, 0].float().sum((1, 2)), rows.float().sum(1) * cols.float().sum(1))  # filled rectangles
    assert (rows.sum(1) >= 8).all() and (cols.sum(1) >= 8).all()
    s = I.stroke_masks(50, g, radius=(3.0, 3.0))
    area = s.float().sum((1, 2, 3))
    assert (area >= math.pi * 9 * 0.7).all()  # at least one brush dab


# --- The measures. -------------------------------------------------------------------------------------------------

def test_measures_on_known_cases():
    img = torch.zeros(1, 3, 64, 64)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 20:40, 20:40] = 1
    other = img.clone()
    other[..., 20:40, 20:40] = 0.8  # changed inside the mask only
    assert I.psnr_outside(other, img, mask).item() == pytest.approx(100.0)  # identical outside (clamped)
    other[..., 0, 0] = 1.0  # one wrong pixel outside: MSE = (0.5^2 * 3) / (3 * (4096 - 400))
    assert I.psnr_outside(other, img, mask).item() == pytest.approx(10 * math.log10((4096 - 400) / 0.25), rel=1e-4)
    band = I.boundary_band(mask)
    assert band.sum() == (22 * 22 - 18 * 18)  # one pixel each side of the 20 x 20 square's edge
    assert I.band_gradient(img, mask).item() == 0
    step = img.clone()
    step[..., 20:40, 20:40] = 1.0  # an intensity step exactly on the mask's edge: a seam
    assert I.band_gradient(step, mask).item() > 0.3


def test_edit_tasks_ask_for_something_new_at_the_same_place():
    s = data.generate(12, seed=2, split="heldout")
    tasks = I.edit_tasks(s, 12)
    for i, (prompt, want) in enumerate(zip(tasks.prompts, tasks.wanted)):
        parsed = data.parse_prompt(prompt)["objects"][0]
        assert parsed["shape"] == want["shape"] and parsed["colour"] == want["colour"]
        k = int(s.masks[i].flatten(1).sum(1).argmax())
        old = s.attributes(i)["objects"][k]
        assert (want["colour"] != old["colour"]) if i % 2 == 0 else (want["shape"] != old["shape"])
        assert parsed["position"] == old["position"] and parsed["size"] == old["size"]
        assert (tasks.masks[i, 0] >= s.masks[i, k].float()).all()


@pytest.mark.skipif(not (WEIGHTS_DIR / "inpaint_unet.json").exists(), reason="no weights/inpaint_unet.*")
def test_benchmark_runs_and_writes_what_it_promises(tmp_path):
    import json
    import os
    import subprocess
    import sys

    root = WEIGHTS_DIR.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_inpainting.py"), "--n", "4", "--steps", "2",
                           "--resample", "2", "--jumps", "1", "--threads", "1", "--assets", str(tmp_path)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_inpainting.json").read_text())
    assert set(result["methods"]) == {"VAE round trip (no repainting)", "blend", "blend + RePaint (r=2, j=1)",
                                      "inpainting U-Net", "inpainting U-Net + blend"}
    assert result["methods"]["blend + RePaint (r=2, j=1)"]["unet_calls_per_image"] == 3  # 2 steps, the first twice
    assert (tmp_path / "inpainting_samples.png").stat().st_size > 0 and "| blend |" in proc.stdout


def test_inpainting_training_is_seeded_and_starts_from_the_base(sd, tmp_path):
    from course_lib.train import InpaintUNetTraining, train_inpaint_unet

    scenes, held = data.generate(16, seed=0), data.generate(4, seed=0, split="heldout")
    tc = InpaintUNetTraining(steps=3, batch_size=4, n_scenes=16, eval_scenes=0, snapshot_every=0)
    nets = [train_inpaint_unet(scenes, held, tc=tc, out_dir=tmp_path / name, vae=sd.vae, clip=sd.clip, unet=sd.unet,
                               quiet=True) for name in ("a", "b")]
    for (k, va), vb in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        assert torch.equal(va, vb), k
    w = nets[0].conv_in.weight
    assert w[:, 4:].abs().amax() > 0  # the new channels moved off zero ...
    assert (w[:, :4] - sd.unet.conv_in.weight).abs().amax() < 1e-2  # ... the base's stayed near where they were
    assert load_inpaint_unet(tmp_path / "a").card["steps"] == 3
