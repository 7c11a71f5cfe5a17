"""The instructor's report of a batch, and the feedback each learner would see.

Written beside ``grades.csv`` from the batch's JSON reports (nothing is re-graded):

- ``report.md``: statuses and flags; per exercise the score distribution (mean, median, full marks,
  zero); per check the pass rate and a discrimination index, and the checks that fail most (item
  analysis); with the figures ``report_totals.png``, ``report_exercises.png`` and ``report_checks.png``.
- ``feedback/<key>.md``: per submission, the tables its check cells show in the notebook (each
  check, its points, and for a failed one what was expected, what came and the hint).

The discrimination index of a check is the classical upper-lower index of item analysis
(Kelley 1939; Ebel and Frisbie, *Essentials of Educational Measurement*): the pass rate among the
27% of submissions with the highest total score minus that among the 27% with the lowest. Near 0: the
check does not separate strong from weak work (too easy, too hard, or testing something else);
negative: the strong fail it more often, which usually means the check or its hint is wrong.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from course_tools.grading.batch import write_atomically

UPPER_LOWER = 0.27  # the share of submissions in each of the upper and lower groups (Kelley)


def _pct(row: dict) -> float:
    return float(row.get("percent", 0.0))


def item_analysis(rows: list[dict]) -> dict:
    """Per exercise and per check: counts, score distribution, pass rate, discrimination index."""
    exercises: dict[str, dict] = {}
    for row in rows:
        for ex in row.get("exercises", []):
            e = exercises.setdefault(ex["exercise_id"], {"title": ex.get("title", ""), "max_score": ex["max_score"],
                                                          "scores": [], "checks": {}, "rows": []})
            e["scores"].append(ex["score"])
            e["rows"].append(row)
            for c in ex.get("checks", []):
                e["checks"].setdefault(c["name"], {"points": c["points"], "results": []})["results"].append(
                    (bool(c["passed"]), _pct(row)))
    for e in exercises.values():
        n = len(e["scores"])
        top = e["max_score"] or 1
        e.update(n=n, mean=sum(e["scores"]) / n, median=statistics.median(e["scores"]),
                 full=sum(s >= top for s in e["scores"]) / n, zero=sum(s == 0 for s in e["scores"]) / n)
        for c in e["checks"].values():
            res = sorted(c.pop("results"), key=lambda r: r[1])
            k = max(1, round(UPPER_LOWER * len(res)))
            lower, upper = res[:k], res[-k:]
            c.update(n=len(res), pass_rate=sum(p for p, _ in res) / len(res),
                     discrimination=(sum(p for p, _ in upper) - sum(p for p, _ in lower)) / k)
        del e["rows"]
    return exercises


def _md_cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _figures(rows: list[dict], analysis: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist([_pct(r) for r in rows], bins=[i * 5 for i in range(21)], color="#4c72b0", edgecolor="white")
    ax.set(xlabel="total score (%)", ylabel="submissions", title=f"Total scores of {len(rows)} submissions")
    fig.tight_layout()
    fig.savefig(out / "report_totals.png", dpi=100)
    plt.close(fig)
    names.append("report_totals.png")

    if analysis:
        n = len(analysis)
        cols = min(3, n)
        rows_ = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows_, cols, figsize=(4 * cols, 2.6 * rows_), squeeze=False)
        for ax, (ex_id, e) in zip(axes.flat, analysis.items()):
            top = e["max_score"] or 1
            values = sorted(set(e["scores"]) | {0, top})
            ax.bar([str(f"{v:g}") for v in values], [e["scores"].count(v) for v in values], color="#55a868")
            ax.set_title(ex_id, fontsize=9)
            ax.set_xlabel(f"points (of {top:g})", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "report_exercises.png", dpi=100)
        plt.close(fig)
        names.append("report_exercises.png")

        checks = [(f"{ex_id}: {name}"[:70], c) for ex_id, e in analysis.items() for name, c in e["checks"].items()]
        fig, ax = plt.subplots(figsize=(9, 0.28 * len(checks) + 1.2))
        y = range(len(checks))
        ax.barh(list(y), [c["pass_rate"] * 100 for _, c in checks],
                color=["#c44e52" if c["discrimination"] < 0.2 else "#4c72b0" for _, c in checks])
        ax.set_yticks(list(y), [n for n, _ in checks], fontsize=7)
        ax.invert_yaxis()
        ax.set(xlim=(0, 100), xlabel="pass rate (%); red: discrimination index below 0.2",
               title="Checks: how many pass")
        fig.tight_layout()
        fig.savefig(out / "report_checks.png", dpi=100)
        plt.close(fig)
        names.append("report_checks.png")
    return names


def report_markdown(rows: list[dict], analysis: dict, figures: list[str]) -> str:
    lines = ["# Grading report", ""]
    statuses: dict[str, int] = {}
    flags: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        for kind in {i["kind"] for i in r.get("integrity", []) if i["kind"] != "suspicious_code"}:
            flags[kind] = flags.get(kind, 0) + 1
    pcts = [_pct(r) for r in rows]
    lines += [f"{len(rows)} submissions; total score mean {statistics.fmean(pcts) if pcts else 0:.1f}%, "
              f"median {statistics.median(pcts) if pcts else 0:.1f}%. Statuses: "
              + (", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) or "none") + ". Flags: "
              + (", ".join(f"{k} {v}" for k, v in sorted(flags.items(), key=lambda kv: -kv[1])) or "none") + ".", ""]
    if "report_totals.png" in figures:
        lines += ["![total scores](report_totals.png)", ""]
    lines += ["## Exercises", "", "| exercise | submissions | points | mean | median | full marks | zero |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for ex_id, e in analysis.items():
        lines.append(f"| {ex_id} | {e['n']} | {e['max_score']:g} | {e['mean']:.2f} | {e['median']:g} | "
                     f"{100 * e['full']:.0f}% | {100 * e['zero']:.0f}% |")
    lines.append("")
    if "report_exercises.png" in figures:
        lines += ["![score distribution per exercise](report_exercises.png)", ""]
    checks = [(ex_id, name, c) for ex_id, e in analysis.items() for name, c in e["checks"].items()]
    hardest = sorted(checks, key=lambda t: (t[2]["pass_rate"], t[0], t[1]))[:10]
    lines += ["## The checks that fail most", "",
              "| exercise | check | pass rate | discrimination |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {ex_id} | {_md_cell(name)} | {100 * c['pass_rate']:.0f}% | {c['discrimination']:+.2f} |"
              for ex_id, name, c in hardest]
    lines += ["", "## Item analysis: every check", "",
              "Discrimination: the pass rate among the 27% highest total scores minus that among the 27% lowest "
              "(near 0: the check does not separate strong from weak work; negative: look at the check).", "",
              "| exercise | check | points | submissions | pass rate | discrimination |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {ex_id} | {_md_cell(name)} | {c['points']:g} | {c['n']} | {100 * c['pass_rate']:.0f}% | "
              f"{c['discrimination']:+.2f} |" for ex_id, name, c in checks]
    if "report_checks.png" in figures:
        lines += ["", "![pass rate per check](report_checks.png)"]
    lines += ["", "Per submission: `grades.csv`, `grades.md`, the JSON reports, and the feedback each learner "
              "would see in `feedback/`."]
    return "\n".join(lines) + "\n"


def feedback_markdown(row: dict) -> str:
    """The feedback a learner would see: the notebook's check tables, as Markdown."""
    lines = [f"# Feedback: {_md_cell(row['submission'])}", "",
             f"**{row['score']:g} / {row['max_score']:g} points** ({row.get('percent', 0):g}%), status `{row['status']}`."]
    if row["status"] != "graded":
        detail = next((e.get("detail", "") for e in row.get("events", []) if e.get("kind") == row["status"]), "")
        lines.append(f"The notebook did not run to the end: {_md_cell(detail)[:300] or row['status']}.")
    lines.append("")
    for ex in row.get("exercises", []):
        checks = ex.get("checks", [])
        n_ok = sum(bool(c["passed"]) for c in checks)
        lines += [f"## {ex['exercise_id']} · {_md_cell(ex.get('title', ''))}", "",
                  f"{n_ok}/{len(checks)} checks passed, {ex['score']:g}/{ex['max_score']:g} points"
                  + ("" if ex.get("status", "checked") == "checked" else f" (`{ex['status']}`)"), "",
                  "| | points | check | expected | got | hint |", "| --- | ---: | --- | --- | --- | --- |"]
        for c in checks:
            ok = bool(c["passed"])
            lines.append(f"| {'✔' if ok else '✘'} | {c['earned']:g}/{c['points']:g} | {_md_cell(c['name'])} | "
                         + ("| | |" if ok else f"{_md_cell(c.get('expected', ''))[:300]} | "
                                               f"{_md_cell(c.get('got', ''))[:300]} | {_md_cell(c.get('hint', ''))[:300]} |"))
        if checks and n_ok == len(checks):
            lines.append("\nAll checks passed.")
        lines.append("")
    errors = row.get("cell_errors", [])
    if errors:
        lines += [f"{len(errors)} cell(s) raised an error while the notebook ran.", ""]
    return "\n".join(lines)


def write_report(rows: list[dict], out: Path) -> Path:
    """``report.md`` with its figures, and ``feedback/<key>.md`` per submission, in ``out``."""
    analysis = item_analysis(rows)
    figures = _figures(rows, analysis, out) if rows else []
    write_atomically(out / "report.md", report_markdown(rows, analysis, figures))
    feedback = out / "feedback"
    feedback.mkdir(exist_ok=True)
    for row in rows:
        text = feedback_markdown(row)
        target = feedback / f"{row['key']}.md"
        if not target.exists() or target.read_text() != text:
            write_atomically(target, text)
    return out / "report.md"
