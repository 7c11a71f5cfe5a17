"""How long each lesson takes a learner to read and to play with, estimated from what the lesson contains.

Reading times that are guessed drift away from the lessons as they grow. This script counts, in each executed
lesson notebook:

- words of prose (markdown cells, display equations left out) and display equations (``$$ ... $$``);
- lines of code (neither blank nor comments) and lines of printed output;
- figures (PNG outputs) and widgets (interactive outputs a learner plays with);

and turns the counts into minutes with the rates of ``RATES``: careful reading of technical prose at 150 words a
minute (well below the 238 of ordinary non-fiction, Brysbaert 2019, because of the mathematics and the code next to
it), a minute per display equation and per figure, 30 lines of code a minute (a lesson's code is read once and
run; most of it is plotting), 40 lines of output a minute, and 3 minutes per widget. The notebook's run time is
small beside these and is left out.

A section whose heading ends with "(optional)" is counted apart, from its heading to the next heading of the same
or a higher level: the README states a lesson's core time and, after a "+", its optional part. Lessons are kept to
about 50 minutes of core time (``CORE_LIMIT_MIN``).

    python -m course_tools.lesson_times            # the table
    python -m course_tools.lesson_times --check    # also: does the README state these times? (exit 1 if not)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE_LIMIT_MIN = 50
OPTIONAL_MARK = "(optional)"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


@dataclass(frozen=True)
class ReadingRates:
    words_per_min: float = 150.0  # careful reading of technical prose
    equations_per_min: float = 1.0  # display equations
    code_lines_per_min: float = 30.0  # read once and run
    output_lines_per_min: float = 40.0  # printed tables and figures of speech
    minutes_per_figure: float = 1.0
    minutes_per_widget: float = 3.0  # moving a slider a few times and reading what changes


RATES = ReadingRates()


@dataclass
class Counts:
    words: int = 0
    equations: int = 0
    code_lines: int = 0
    output_lines: int = 0
    figures: int = 0
    widgets: int = 0

    def minutes(self, rates: ReadingRates = RATES) -> float:
        return (self.words / rates.words_per_min + self.equations / rates.equations_per_min
                + self.code_lines / rates.code_lines_per_min + self.output_lines / rates.output_lines_per_min
                + self.figures * rates.minutes_per_figure + self.widgets * rates.minutes_per_widget)

    def add(self, other: "Counts") -> "Counts":
        return Counts(**{k: getattr(self, k) + getattr(other, k) for k in self.__dataclass_fields__})


@dataclass
class LessonTime:
    name: str
    core: Counts = field(default_factory=Counts)
    optional: Counts = field(default_factory=Counts)

    @property
    def core_min(self) -> int:
        return round_to_5(self.core.minutes())

    @property
    def optional_min(self) -> int:
        return round_to_5(self.optional.minutes()) if self.optional.minutes() > 0 else 0

    @property
    def stated(self) -> str:
        """How the README states this lesson's time: "45 min" or "45 min + 15 optional"."""
        return f"{self.core_min} min" + (f" + {self.optional_min} optional" if self.optional_min else "")


def round_to_5(minutes: float) -> int:
    return max(5, int(5 * round(minutes / 5)))


_DISPLAY_MATH = re.compile(r"\$\$.*?\$\$", re.S)
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]*")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")


def cell_counts(cell: dict) -> Counts:
    """What one notebook cell (nbformat 4, as a dict) contributes."""
    source = "".join(cell.get("source", ""))
    if cell.get("cell_type") == "markdown":
        return Counts(words=len(_WORD.findall(_DISPLAY_MATH.sub(" ", source))),
                      equations=len(_DISPLAY_MATH.findall(source)))
    if cell.get("cell_type") != "code":
        return Counts()
    counts = Counts(code_lines=sum(1 for line in source.splitlines()
                                   if line.strip() and not line.strip().startswith("#")))
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        if WIDGET_MIME in data:
            counts.widgets += 1
        elif "image/png" in data:
            counts.figures += 1
        elif out.get("output_type") == "stream" or "text/plain" in data:
            text = out.get("text") if out.get("output_type") == "stream" else data.get("text/plain")
            text = "".join(text or "")
            if not text.startswith("<Figure size"):  # matplotlib's repr beside a figure: nothing to read
                counts.output_lines += len([line for line in text.splitlines() if line.strip()])
    return counts


def lesson_time(path: str | Path) -> LessonTime:
    """Counts of one lesson notebook, its optional sections apart."""
    path = Path(path)
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the notebook {path}: {err}") from err
    if not isinstance(nb, dict) or "cells" not in nb:
        raise ValueError(f"{path} is not a Jupyter notebook (no 'cells')")
    result = LessonTime(name=path.stem)
    optional_level = None  # heading level of the optional section we are in, if any

    def add(counts: Counts) -> None:
        part = "optional" if optional_level is not None else "core"
        setattr(result, part, getattr(result, part).add(counts))

    for cell in nb["cells"]:
        if cell.get("cell_type") != "markdown":
            add(cell_counts(cell))
            continue
        # A heading may open a section anywhere in a markdown cell: count the cell piece by piece.
        piece: list[str] = []
        for line in "".join(cell.get("source", "")).split("\n"):
            match = _HEADING.match(line)
            if match:
                add(cell_counts({"cell_type": "markdown", "source": "\n".join(piece)}))
                piece = []
                level, title = len(match.group(1)), match.group(2).strip()
                if optional_level is not None and level <= optional_level:
                    optional_level = None
                if optional_level is None and title.lower().endswith(OPTIONAL_MARK):
                    optional_level = level
            piece.append(line)
        add(cell_counts({"cell_type": "markdown", "source": "\n".join(piece)}))
    return result


def lesson_paths(root: Path = ROOT) -> list[Path]:
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def readme_times(readme: str) -> dict[int, str]:
    """Lesson number -> the time the README's course map states ("45 min" or "45 min + 15 optional")."""
    times = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 4 and cells[1].isdigit():
            stated = next((c for c in cells[2:] if re.fullmatch(r"\d+ min( \+ \d+ optional)?", c)), None)
            if stated:
                times[int(cells[1])] = stated
    return times


def table(lessons: list[LessonTime]) -> str:
    head = (f"{'lesson':<32} {'words':>6} {'eqs':>4} {'code':>5} {'output':>7} {'figs':>5} {'widgets':>8} "
            f"{'core min':>9} {'optional':>9}  stated")
    rows = [head]
    for les in lessons:
        c = les.core.add(les.optional)
        rows.append(f"{les.name:<32} {c.words:>6} {c.equations:>4} {c.code_lines:>5} {c.output_lines:>7} "
                    f"{c.figures:>5} {c.widgets:>8} {les.core.minutes():>9.1f} {les.optional.minutes():>9.1f}  "
                    f"{les.stated}")
    total_core = sum(les.core.minutes() for les in lessons)
    total = total_core + sum(les.optional.minutes() for les in lessons)
    rows.append(f"total: {total_core / 60:.1f} h of core lessons, {total / 60:.1f} h with the optional sections")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the README's course map; exit 1 on a mismatch")
    args = parser.parse_args(argv)
    lessons = [lesson_time(p) for p in lesson_paths()]
    print(table(lessons))
    problems = [f"{les.name}: {les.core.minutes():.0f} min of core time, over {CORE_LIMIT_MIN}"
                for les in lessons if les.core.minutes() > CORE_LIMIT_MIN + 2.5]
    if args.check:
        stated = readme_times((ROOT / "README.md").read_text(encoding="utf-8"))
        for les in lessons:
            number = int(les.name[:2])
            if stated.get(number) != les.stated:
                problems.append(f"README states {stated.get(number)!r} for lesson {number}, the count gives {les.stated!r}")
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
