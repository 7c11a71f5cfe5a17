"""course_lib basics (device choice, generators, plotting) and the setup's consistency."""

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (pytest depends on it there)
    import tomli as tomllib

import numpy as np
import pytest
import torch

from course_lib import device
from course_lib.viz import plotting

ROOT = Path(__file__).resolve().parent.parent


def test_device_default_and_override(monkeypatch):
    monkeypatch.delenv(device.DEVICE_ENV, raising=False)
    d = device.get_device()
    expected = "cuda" if torch.cuda.is_available() else ("mps" if device._mps_available() else "cpu")
    assert d.type == expected
    monkeypatch.setenv(device.DEVICE_ENV, "cpu")
    assert device.get_device() == torch.device("cpu")


def test_unavailable_device_is_a_clear_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.setenv(device.DEVICE_ENV, "cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        device.get_device()
    with pytest.raises(ValueError, match="not a device name"):
        device.get_device("gpu-please")


def test_generators_reproduce():
    a = torch.randn(5, generator=device.make_generator(3))
    b = torch.randn(5, generator=device.make_generator(3))
    assert torch.equal(a, b)
    noise = device.randn((2, 4), device.make_generator(1), dtype=torch.float64)
    assert noise.dtype == torch.float64
    with pytest.raises(ValueError):
        device.make_generator("3")


def test_image_grid_layout():
    imgs = torch.zeros(5, 3, 4, 4)
    imgs[2] = 1.0
    grid = plotting.image_grid(imgs, nrow=3, padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3) and grid.dtype == np.uint8
    assert (grid[1:5, 11:15] == 255).all()  # image 2: top row, third column, white
    assert (grid[1:5, 1:5] == 128).all()  # image 0: 0.0 maps to mid-grey
    assert imgs[2].max() == 1.0  # input untouched


def test_to_uint8_rejects_bad_input():
    with pytest.raises(TypeError):
        plotting.to_uint8(np.zeros((3, 4, 4)))
    with pytest.raises(ValueError):
        plotting.to_uint8(torch.zeros(4, 4))


def test_show_images_titles():
    fig = plotting.show_images(torch.zeros(3, 3, 8, 8), titles=["a", "b", "c"], title="three")
    assert fig._suptitle.get_text() == "three"
    with pytest.raises(ValueError, match="titles"):
        plotting.show_images(torch.zeros(3, 3, 8, 8), titles=["a"])


def _package_names(requirements):
    return {re.split(r"[<>=!~\[ ;]", r.strip(), maxsplit=1)[0].lower().replace("_", "-") for r in requirements if r.strip()}


def _all_requirements(project: dict) -> list[str]:
    """The library's dependencies and every extra (lab, dev): what course.py installs."""
    return project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _package_names(_all_requirements(project))
    lines = (ROOT / "environment.yml").read_text().splitlines()
    deps = lines[lines.index("dependencies:") + 1:]
    entries = [line.strip()[2:] for line in deps if line.strip().startswith("- ") and line.strip() != "- pip:"]
    names = _package_names(entries) - {"python", "pip"}
    assert names == wanted, f"only in environment.yml: {names - wanted}; only in pyproject: {wanted - names}"


def test_environment_yml_pins_the_constraints():
    pins = dict(l.split("==") for l in (ROOT / "requirements/constraints.txt").read_text().splitlines() if "==" in l)
    pins = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    for line in (ROOT / "environment.yml").read_text().splitlines():
        m = re.match(r"\s+- ([A-Za-z0-9_.-]+)==([^\s]+)", line)
        if m and m.group(1).lower() != "torch":
            assert pins.get(m.group(1).lower().replace("_", "-")) == m.group(2), line


def test_constraints_pin_every_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = _package_names(l for l in (ROOT / "requirements/constraints.txt").read_text().splitlines() if "==" in l)
    wanted = _package_names(_all_requirements(project)) - {"torch"}
    assert wanted <= pinned, wanted - pinned
    assert "torch" not in pinned, "torch is installed on its own by course.py (see README)"


def test_course_py_installs_the_lab_and_dev_extras():
    text = (ROOT / "course.py").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) == {"lab", "dev"}
    assert '".[lab,dev]"' in text


def _course_py():
    import importlib.util

    spec = importlib.util.spec_from_file_location("course_entry", ROOT / "course.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lab_allows_root_only_as_root(monkeypatch):
    course = _course_py()
    py = Path("/venv/bin/python")
    monkeypatch.setattr(course.os, "geteuid", lambda: 0, raising=False)
    cmd = [str(c) for c in course.lab_command(py, [])]
    assert cmd[1:4] == ["-m", "jupyter", "lab"] and "--allow-root" in cmd
    assert [str(c) for c in course.lab_command(py, ["--allow-root"])].count("--allow-root") == 1
    monkeypatch.setattr(course.os, "geteuid", lambda: 1000, raising=False)
    assert "--allow-root" not in [str(c) for c in course.lab_command(py, ["--port", "9999"])]


def test_gpu_names_the_fix_for_a_cpu_only_torch(monkeypatch):
    course = _course_py()

    def fake_run(cmd, capture_output, text):
        return type("Done", (), {"stdout": answer})()

    monkeypatch.setattr(course.subprocess, "run", fake_run)
    answer = "cpu-only 2.13.0+cpu"
    message = course.cuda_problem(Path("python"))
    assert "CPU-only torch (2.13.0+cpu)" in message and "pip uninstall -y torch" in message and "COURSE_TORCH=" in message
    answer = "none 2.13.0+cpu"
    assert "no NVIDIA GPU" in course.cuda_problem(Path("python"))
    answer = "cuda 2.13.0+cu130"
    assert course.cuda_problem(Path("python")) is None


def test_python_310_has_its_own_known_good_set(monkeypatch):
    """The newest numpy, scipy, matplotlib ... of constraints.txt need Python 3.11; 3.10 gets its own pins."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    py310 = ROOT / "requirements" / "constraints-py310.txt"
    pinned = _package_names(l for l in py310.read_text().splitlines() if "==" in l)
    assert _package_names(_all_requirements(project)) - {"torch"} <= pinned and "torch" not in pinned
    monkeypatch.setattr(sys, "version_info", (3, 10, 13, "final", 0))
    assert _course_py().CONSTRAINTS == py310
    monkeypatch.setattr(sys, "version_info", (3, 13, 0, "final", 0))
    assert _course_py().CONSTRAINTS.name == "constraints.txt"
