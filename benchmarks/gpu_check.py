"""The GPU check: everything the course claims about CUDA, run once on one GPU in at most ten minutes.

    python3 course.py gpu --check                 # on a machine with an NVIDIA GPU
    .venv/bin/python benchmarks/gpu_check.py      # the same; on a machine without CUDA: a dry run

Steps, each with its own time limit, each timed and logged (artifacts/gpu_check/: check.md, check.json
and one log per step):

1. environment: torch, its CUDA build, the GPU, TF32 settings;
2. tests: the unit and equivalence tests on CUDA (``COURSE_DEVICE=cuda``; TF32 is off in every test that
   compares at float32 tolerance, see tests/conftest.py);
3. lessons: every lesson notebook under nbval on CUDA, with each notebook's run time;
4. training: the quick training run twice, and whether the two runs give the same weights;
5. benchmarks: each benchmark on a small setting, on CUDA, writing to artifacts/ (never assets/);
6. real SD 1.5: load it from the Hub where the Hub is reachable and draw one image.

On a machine without CUDA the check is a dry run: each CUDA step is reported as skipped, with the reason
and the command it would have run, so that whoever first has a GPU knows what will happen. Run it with
``--cpu`` to go through the steps on the CPU instead (slow; a test of the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 600  # the whole check: ten minutes on one GPU


@dataclass
class Step:
    name: str
    what: str
    limit_s: int  # this step's time limit; the limits add up to BUDGET_S
    command: list[str] = field(default_factory=list)
    status: str = "not run"  # ok | failed | timeout | skipped
    seconds: float = 0.0
    detail: str = ""


def python_snippet(code: str) -> list[str]:
    return [sys.executable, "-c", code]


ENV_PROBE = """
import json, torch
info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
print(json.dumps(info))
"""

TRAIN_TWICE = """
import subprocess, sys, tempfile, time
from pathlib import Path
from safetensors.torch import load_file
runs = []
for k in range(2):
    out = Path(tempfile.mkdtemp(prefix=f"quick{k}-"))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "course_lib.train", "--quick", "--device", sys.argv[1], "--out", str(out)],
                   check=True)
    runs.append((out, time.perf_counter() - t))
    print(f"run {k + 1}: {runs[-1][1]:.1f} s")
worst = 0.0
for f in sorted(runs[0][0].glob("*.safetensors")):
    a, b = load_file(f), load_file(runs[1][0] / f.name)
    diff = max(((a[n].double() - b[n].double()).abs().max().item() for n in a), default=0.0)
    worst = max(worst, diff)
    print(f"{f.stem}: largest weight difference between the runs {diff:.3g}")
print("same weights" if worst == 0 else f"the two runs differ (largest difference {worst:.3g})")
"""

REAL_SD = """
import sys, time, torch
from course_lib import diffusers_bridge as bridge
if not bridge.hub_reachable(5.0):
    print("SKIP: the Hub cannot be reached from this machine"); sys.exit(0)
t = time.perf_counter()
pipe = bridge.load_real_sd(device=sys.argv[1])
if pipe is None:
    sys.exit(1)
print(f"loaded {bridge.SD15_MODEL_ID} in {time.perf_counter() - t:.1f} s")
t = time.perf_counter()
image = pipe("a red circle on a white background, flat illustration", num_inference_steps=25,
             generator=torch.Generator().manual_seed(0)).images[0]
print(f"one 512x512 image, 25 steps: {time.perf_counter() - t:.1f} s")
image.save(sys.argv[2])
"""


def plan(device: str, out: Path) -> list[Step]:
    py = sys.executable
    pytest = [py, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", "--timeout", "300"]
    bench = ROOT / "benchmarks"
    art = out / "bench"
    return [
        Step("environment", "torch, its CUDA build, the GPU", 15, python_snippet(ENV_PROBE)),
        Step("tests", "unit and equivalence tests on CUDA (no notebooks, no browser, no slow tests)", 150,
             pytest + ["tests", "-m", "not browser and not slow", "--ignore", "tests/test_exercises.py"]),
        Step("lessons", "every lesson under nbval on CUDA", 240, pytest + ["notebooks"]),
        Step("training", "quick training twice: the same weights?", 60,
             python_snippet(TRAIN_TWICE) + [device]),
        Step("benchmarks", "each benchmark on a small setting, into artifacts/", 75, [
            "bash", "-c", " && ".join([
                f"{py} {bench / 'bench_sampler_speed.py'} --device {device} --steps 5 --repeats 2",
                f"{py} {bench / 'bench_sampler_adherence.py'} --quick --device {device} --out {art / 'adherence'}",
                f"{py} {bench / 'bench_tiny_sd.py'} --n 32 --scales 1,3 --device {device} --assets {art / 'tiny_sd'}",
                f"{py} {bench / 'bench_controlnet.py'} --n 32 --n-sweep 16 --device {device} "
                f"--assets {art / 'controlnet'}",
            ])]),
        Step("real_sd15", "real SD 1.5 from the Hub (fp16, about 2.7 GB), one image", 60,
             python_snippet(REAL_SD) + [device, str(out / "sd15.png")]),
    ]


def run_step(step: Step, env: dict, log: Path) -> None:
    start = time.perf_counter()
    header = "$ " + " ".join(map(str, step.command)) + "\n" + "-" * 40 + "\n"
    with open(log, "w") as f:
        f.write(header)
        f.flush()
        try:
            proc = subprocess.run([str(c) for c in step.command], cwd=ROOT, env=env, stdout=f,
                                  stderr=subprocess.STDOUT, timeout=step.limit_s)
            step.status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            step.status = "timeout"
    step.seconds = round(time.perf_counter() - start, 1)
    lines = [line for line in log.read_text(errors="replace")[len(header):].splitlines() if line.strip()]
    step.detail = " | ".join(lines[-4:])[-600:]
    if step.name == "real_sd15" and step.status == "ok" and any(line.startswith("SKIP:") for line in lines):
        step.status, step.detail = "skipped", next(line for line in lines if line.startswith("SKIP:"))[6:]


def cuda_state() -> tuple[bool, str]:
    """(CUDA usable, why not)."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if torch.cuda.is_available():
        return True, ""
    if torch.version.cuda is None:
        return False, (f"this torch ({torch.__version__}) is a CPU-only build; on a GPU machine replace it with a "
                       "CUDA build (python3 course.py gpu says how)")
    return False, f"torch {torch.__version__} has CUDA {torch.version.cuda}, but no GPU or driver is visible"


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts" / "gpu_check", help="where the report and logs go")
    ap.add_argument("--only", default="", help="comma-separated step names (default: all)")
    ap.add_argument("--cpu", action="store_true", help="run the steps on the CPU (a test of this script; slow)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    has_cuda, why = cuda_state()
    device = "cuda" if has_cuda else "cpu"
    dry = not has_cuda and not args.cpu
    steps = plan(device, args.out)
    wanted = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = wanted - {s.name for s in steps}
    if unknown:
        ap.error(f"unknown step(s) {sorted(unknown)}; choose from {[s.name for s in steps]}")
    assert sum(s.limit_s for s in steps) <= BUDGET_S
    # NVIDIA_TF32_OVERRIDE=0: float32 stays float32 in cuBLAS and cuDNN, in the notebook kernels too
    env = dict(os.environ, COURSE_DEVICE=device, COURSE_PROGRESS="0", PYTHONHASHSEED="0", NVIDIA_TF32_OVERRIDE="0")
    env.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()
    print(f"GPU check: {'dry run (' + why + ')' if dry else 'on ' + device}; report in {args.out}", flush=True)
    for step in steps:
        if wanted and step.name not in wanted:
            step.status, step.detail = "skipped", "not asked for (--only)"
        elif dry and step.name != "environment":
            step.status, step.detail = "skipped", f"no CUDA: {why}"
        else:
            run_step(step, env, args.out / f"{step.name}.log")
        print(f"  {step.name:<12} {step.status:<8} {step.seconds:7.1f} s  {step.detail[:160]}", flush=True)
    total = time.perf_counter() - started
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(), "device": device,
              "dry_run": dry, "why_dry": why if dry else "", "seconds": round(total, 1), "budget_s": BUDGET_S,
              "steps": [asdict(s) for s in steps]}
    (args.out / "check.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [f"| {s.name} | {s.what} | {s.status} | {s.seconds:.1f} | {s.limit_s} | {s.detail.replace('|', '/')} |"
            for s in steps]
    (args.out / "check.md").write_text(
        f"# GPU check, {report['date']}\n\n"
        f"{'Dry run: ' + why if dry else 'Device: ' + device}. Total {total:.0f} s of a {BUDGET_S} s budget.\n\n"
        "| step | what | status | seconds | limit | last lines / why |\n| --- | --- | --- | ---: | ---: | --- |\n"
        + "\n".join(rows) + "\n\nCommands:\n\n"
        + "\n".join(f"- {s.name}: `{' '.join(map(str, s.command))[:400]}`" for s in steps) + "\n")
    print(f"total {total:.1f} s; report: {args.out / 'check.md'}")
    return 1 if any(s.status in ("failed", "timeout") for s in steps) else 0


if __name__ == "__main__":
    sys.exit(main())
