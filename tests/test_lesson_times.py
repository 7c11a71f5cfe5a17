"""The lesson-time estimate counts what a lesson holds, and the README states the times it gives."""

import json

import pytest

from course_tools import lesson_times as lt


def _nb(cells):
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def _md(text):
    return {"cell_type": "markdown", "source": text, "metadata": {}}


def _code(text, outputs=()):
    return {"cell_type": "code", "source": text, "metadata": {}, "outputs": list(outputs), "execution_count": 1}


FIGURE = {"output_type": "display_data", "data": {"image/png": "iVBOR", "text/plain": "<Figure size 640x480 with 1 Axes>"}}
WIDGET = {"output_type": "display_data", "data": {lt.WIDGET_MIME: {"model_id": "x"}, "text/plain": "VBox(...)"}}
PRINTED = {"output_type": "stream", "name": "stdout", "text": "line one\nline two\n\n"}


def test_counts_words_equations_code_outputs_figures_widgets(tmp_path):
    path = tmp_path / "03_demo.ipynb"
    path.write_text(json.dumps(_nb([
        _md("# Title\n\nFive words of prose here.\n\n$$x = y + z$$\n"),
        _code("# a comment\nx = 1\n\nprint(x)\n", [PRINTED, FIGURE, WIDGET]),
    ])))
    les = lt.lesson_time(path)
    c = les.core
    assert (c.words, c.equations, c.code_lines, c.output_lines, c.figures, c.widgets) == (6, 1, 2, 2, 1, 1)
    r = lt.RATES
    expected = (6 / r.words_per_min + 1 / r.equations_per_min + 2 / r.code_lines_per_min + 2 / r.output_lines_per_min
                + r.minutes_per_figure + r.minutes_per_widget)
    assert c.minutes() == pytest.approx(expected)
    assert les.optional.minutes() == 0 and les.stated == "5 min"


def test_optional_sections_are_counted_apart_until_the_next_heading_of_their_level(tmp_path):
    words = " ".join(["word"] * 1500)  # 10 minutes at 150 words a minute
    path = tmp_path / "04_demo.ipynb"
    path.write_text(json.dumps(_nb([
        _md(f"## 1. Core\n\n{words}"),
        _md(f"## 2. Going further (optional)\n\n{words}"),
        _md(f"### 2.1 still optional\n\n{words}"),
        _md(f"## 3. Core again\n\n{words}"),
    ])))
    les = lt.lesson_time(path)
    assert les.core.minutes() == pytest.approx(2 * (1500 + 4) / 150, rel=0.01)
    assert les.optional.minutes() == pytest.approx((3000 + 10) / 150, rel=0.01)
    assert les.stated == "20 min + 20 optional"


def test_a_heading_inside_a_markdown_cell_opens_its_section_there(tmp_path):
    words = " ".join(["word"] * 300)  # 2 minutes
    path = tmp_path / "05_demo.ipynb"
    path.write_text(json.dumps(_nb([
        _md(f"## 1. Core\n\n{words}\n\n### 1.1 Deeper (optional)\n\n{words}"),
        _code("x = 1\n"),  # still inside the optional subsection
        _md(f"{words}\n\n## 2. Core again\n\n{words}"),
    ])))
    les = lt.lesson_time(path)
    assert les.optional.words == 300 + 4 + 300 and les.optional.code_lines == 1
    assert les.core.words == 2 + 300 + 3 + 300  # "## 1. Core" is 2 words, "## 2. Core again" 3


def test_bad_notebook_gets_a_clear_error(tmp_path):
    bad = tmp_path / "05_bad.ipynb"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the notebook"):
        lt.lesson_time(bad)
    bad.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="not a Jupyter notebook"):
        lt.lesson_time(bad)


def test_readme_times_are_parsed_from_the_course_map():
    readme = ("| # | Lesson | Time | What you do |\n|---|---|---|---|\n"
              "| 0 | [Welcome](x.ipynb) | 35 min | things |\n| 4 | [Guidance](y.ipynb) | 45 min + 15 optional | more |\n")
    assert lt.readme_times(readme) == {0: "35 min", 4: "45 min + 15 optional"}


def test_the_readme_states_every_lesson_time_the_count_gives_and_no_lesson_is_too_long():
    """The README's course map must be regenerated from the lessons whenever they grow or shrink."""
    stated = lt.readme_times((lt.ROOT / "README.md").read_text(encoding="utf-8"))
    lessons = [lt.lesson_time(p) for p in lt.lesson_paths()]
    assert len(lessons) >= 9
    mismatches = {les.name: (stated.get(int(les.name[:2])), les.stated) for les in lessons
                  if stated.get(int(les.name[:2])) != les.stated}
    assert not mismatches, f"README vs count (python -m course_tools.lesson_times): {mismatches}"
    too_long = {les.name: round(les.core.minutes()) for les in lessons if les.core.minutes() > lt.CORE_LIMIT_MIN + 2.5}
    assert not too_long, f"lessons over {lt.CORE_LIMIT_MIN} min of core time: {too_long}"
