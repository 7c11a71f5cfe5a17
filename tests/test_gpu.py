"""GPU runs that mean something: the same noise on every device, no TF32 in comparisons at float32
tolerance, benchmarks that honour $COURSE_DEVICE and leave assets/ alone, and the GPU check's dry run.
The CUDA tests skip cleanly without a GPU."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from course_lib.device import make_generator

ROOT = Path(__file__).resolve().parent.parent
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE_NOISE = re.compile(r"make_generator\([^()]*,\s*device\)|Generator\(device=device\)|"
                          r"randn\([^()]*generator=[^()]*device=device")


def test_tf32_is_off_in_the_tests():
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("folder", ["notebooks", "solutions"])
def test_notebooks_draw_noise_on_the_cpu_generator(folder):
    """A CUDA generator gives other numbers than a CPU one with the same seed: images on a GPU would differ
    from the committed ones. Noise is drawn on the CPU and moved (course_lib.device.randn)."""
    found = []
    for path in sorted((ROOT / folder).glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code":
                found += [f"{path.name} {cell.id}: {line.strip()}" for line in cell.source.splitlines() if DEVICE_NOISE.search(line)]
    assert not found, found


@pytest.mark.gpu
@cuda
def test_a_gpu_shows_the_same_images():
    from course_lib.tiny_sd import load_tiny_sd

    prompts = ["a large red circle in the top left", "a small blue square"]
    images = {}
    for device in ("cpu", "cuda"):
        pipe = load_tiny_sd(device=device)
        images[device] = pipe.generate(prompts, num_steps=10, generator=make_generator(0)).cpu()
    # same noise, same weights; only float32 rounding differs between the devices
    assert (images["cpu"] - images["cuda"]).abs().max() < 2e-2


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def test_benchmarks_write_to_artifacts_unless_told(tmp_path):
    before = _tree_digest(ROOT / "assets")
    out = ROOT / "artifacts" / "bench_sampler_adherence"
    stamp = out / "adherence.json"
    old = stamp.stat().st_mtime if stamp.exists() else 0.0
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sampler_adherence.py"), "--quick",
                           "--steps", "1", "--scales", "1", "--prompts", "2", "--samplers", "ddim"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COURSE_DEVICE": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _tree_digest(ROOT / "assets") == before, "a benchmark run without --write-assets changed assets/"
    assert stamp.exists() and stamp.stat().st_mtime > old
    for script in ("bench_tiny_sd.py", "bench_controlnet.py", "bench_sampler_adherence.py"):
        usage = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"],
                               capture_output=True, text=True, timeout=120).stdout
        assert "--write-assets" in usage and "--device" in usage, script


def test_benchmarks_honour_course_device():
    """An unavailable device named in $COURSE_DEVICE is an error, not a silent run on the CPU."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sampler_speed.py"), "--steps", "1",
                           "--repeats", "1", "--models", "none"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COURSE_DEVICE": "cuda"})
    assert proc.returncode != 0 and "CUDA is not available" in proc.stderr


def test_gpu_check_dry_run_reports_what_it_skipped_and_why(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the check would really run")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["dry_run"] and ("CPU-only" in report["why_dry"] or "no GPU" in report["why_dry"])
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["environment", "tests", "lessons", "training", "benchmarks", "real_sd15"]
    assert steps["environment"]["status"] == "ok" and '"cuda_available": false' in steps["environment"]["detail"]
    for name in ("tests", "lessons", "training", "benchmarks", "real_sd15"):
        assert steps[name]["status"] == "skipped" and steps[name]["detail"].startswith("no CUDA:"), steps[name]
        assert steps[name]["command"], name  # the report names what would have run
    assert sum(s["limit_s"] for s in report["steps"]) <= 600
    assert "| lessons |" in (tmp_path / "check.md").read_text()
