"""Test-suite configuration shared by the unit tests and the notebooks (nbval).

- A warning printed on stderr never fails a checked notebook cell (nbval compares stderr by default).
- Each notebook's run time is collected and printed at the end of the run, and written to
  artifacts/notebook_times.md.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("COURSE_PROGRESS", "0")

_notebook_seconds: dict[str, float] = defaultdict(float)


def pytest_collectstart(collector):
    if collector.path is not None and collector.path.suffix == ".ipynb" and hasattr(collector, "skip_compare"):
        collector.skip_compare += ("stderr",)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::", 1)[0]
    if path.endswith(".ipynb"):
        _notebook_seconds[path] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _notebook_seconds:
        return
    rows = sorted(_notebook_seconds.items())
    total = sum(s for _, s in rows)
    terminalreporter.section("notebook run times")
    lines = ["| notebook | seconds |", "| --- | ---: |"]
    for path, seconds in rows:
        terminalreporter.write_line(f"{seconds:8.1f} s  {path}")
        lines.append(f"| {path} | {seconds:.1f} |")
    terminalreporter.write_line(f"{total:8.1f} s  all notebooks")
    lines.append(f"| all notebooks | {total:.1f} |")
    out = Path(__file__).parent / "artifacts"
    out.mkdir(exist_ok=True)
    (out / "notebook_times.md").write_text("\n".join(lines) + "\n")

