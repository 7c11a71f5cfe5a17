"""Each benchmark script runs end to end on a tiny setting and writes what its docstring promises.

The figures themselves come from full runs (see the README); these runs only keep the scripts working.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from course_lib.samplers import SAMPLERS

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run(script, *args, ok=(0,)):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode in ok, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_sampler_adherence(tmp_path):
    out = run("bench_sampler_adherence.py", "--samplers", "ddim", "euler", "--steps", 1, 4, "--scales", 1, 3,
              "--prompts", 6, "--out", tmp_path)
    result = json.loads((tmp_path / "adherence.json").read_text())
    assert result["steps"] == [1, 4] and result["spacing"] == "trailing" and result["prompts"] == 6
    for name in ("ddim", "euler"):
        for scale in ("1.0", "3.0"):
            row = result["adherence"][name][scale]
            assert len(row) == 2 and all(0 <= a <= 1 for a in row)
            assert result["steps_to_within_2_points"][name][scale] in (1, 4)
    assert (tmp_path / "adherence.png").stat().st_size > 0
    assert len((tmp_path / "adherence.csv").read_text().splitlines()) == 1 + 2 * 2 * 2
    assert "steps to come within 2 points" in out


def test_sampler_adherence_rejects_bad_steps(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "bench_sampler_adherence.py"), "--steps", "0", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--steps must lie between 1 and 1000" in proc.stderr


def test_sampler_speed():
    out = run("bench_sampler_speed.py", "--steps", 2, "--repeats", 1, "--batch", 1, "--size", 8)
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in SAMPLERS]
    assert {r[0] for r in rows} == set(SAMPLERS)
    assert all(float(r[-1]) <= 1e-5 for r in rows), rows  # the course's loop and diffusers' agree


@pytest.mark.parametrize("script, outputs", [
    ("bench_tiny_sd.py", ["bench_tiny_sd.json", "tiny_sd_guidance.png", "tiny_sd_samples.png"]),
    ("bench_controlnet.py", ["bench_controlnet.json", "controlnet_samples.png", "controlnet_scale.png"]),
])
def test_tiny_sd_and_controlnet_benchmarks(tmp_path, script, outputs):
    extra = ["--scales", "1,3"] if script == "bench_tiny_sd.py" else ["--n-sweep", 4]
    # 2 steps on 8 scenes cannot meet the quality bars, and a missed bar exits 1: both codes are a finished run
    out = run(script, "--n", 8, "--steps", 2, "--threads", 1, "--assets", tmp_path, *extra, ok=(0, 1))
    for name in outputs:
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / outputs[0]).read_text()) and "|" in out  # results and the markdown table


def test_flow_benchmark(tmp_path):
    """Lesson 11's comparison (DDPM vs flow at equal evaluations, straightness, LCM against its teacher) on 4 prompts."""
    out = run("bench_flow.py", "--n", 4, "--nfe", "1,2", "--lcm-steps", "1,2", "--straight-n", 2, "--threads", 1,
              "--assets", tmp_path)
    results = json.loads((tmp_path / "bench_flow.json").read_text())
    assert [r["nfe"] for r in results["equal_nfe"]] == [1, 2]
    assert {"ddpm_ddim", "flow_euler", "flow_euler_shift3"} <= set(results["equal_nfe"][0])
    assert 0 < results["straightness"]["flow_euler"]["mean"] <= 1
    assert [r["passes"] for r in results["distillation"]] == [40, 2, 4, 1, 2]
    for name in ("flow_vs_ddpm.png", "lcm_samples.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "| NFE |" in out
