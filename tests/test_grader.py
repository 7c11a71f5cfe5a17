"""The grader against wrong and adversarial submissions (tests/hostile/corpus.py), graded in one
batch with two workers, plus the pieces that need no kernel: check cells restored by id, the
sandbox's audit hook, the command line's exit codes."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from course_tools.grading import notebooks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "hostile"))
from corpus import EXPECTED, NAME, build  # noqa: E402

GRADE = [sys.executable, "-m", "course_tools.grading", "grade"]


def _fingerprint(folder: Path) -> dict:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    out = tmp_path_factory.mktemp("reports")
    paths = build(corpus)
    before = _fingerprint(corpus)
    proc = subprocess.run(GRADE + [str(corpus), "--out", str(out), "--workers", "2", "--cell-timeout", "6",
                                   "--timeout", "150", "--seed", "7"], capture_output=True, text=True, timeout=900)
    rows = {name: json.loads((out / f"{p.stem}.json").read_text()) for name, p in paths.items()
            if (out / f"{p.stem}.json").exists()}
    return {"proc": proc, "out": out, "rows": rows, "before": before, "corpus": corpus}


def test_the_batch_finishes_with_exit_code_0_and_every_report(graded):
    proc, out = graded["proc"], graded["out"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert set(graded["rows"]) == set(EXPECTED)
    with open(out / "grades.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(EXPECTED)
    assert {"submission", "status", "score", "max_score", "schedule_comparator", "flags", "seconds"} <= set(table[0])
    md = (out / "grades.md").read_text()
    assert md.startswith("| submission | status | score |") and f"{len(EXPECTED)} submissions graded in" in md
    print("\n" + md)  # the table, with the grading time of each submission (pytest -s shows it)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_submission_is_graded_as_it_should_be(graded, name):
    row, want = graded["rows"][name], EXPECTED[name]
    kinds = {i["kind"] for i in row["integrity"]}
    assert (row["status"], row["score"]) == (want.status, want.score), (want.why, row["events"], row["exercises"])
    assert want.flags <= kinds, (want.why, row["integrity"])
    assert row["max_score"] == 28
    if not want.flags:
        assert not row["flagged"], row["integrity"]
    assert row["grader"]["seed"] == 7 and row["seconds"] >= 0


def test_submission_files_are_never_written(graded):
    assert _fingerprint(graded["corpus"]) == graded["before"]


def test_feedback_comes_per_check_with_expected_got_and_hint(graded):
    ex = graded["rows"]["partial"]["exercises"][1]  # the noise-predictor evaluator, still a stub
    assert ex["score"] == 0 and ex["status"] == "checked"
    check = ex["checks"][0]
    assert "NotImplementedError" in check["got"] and check["expected"] and check["hint"]


def test_what_happened_is_on_the_record(graded):
    rows = graded["rows"]
    assert any(e["kind"] == "restarted" for e in rows["infinite_loop"]["events"])
    assert any(e["kind"] == "restarted" for e in rows["os_exit_in_check"]["events"])
    assert any(e["ename"] == "SyntaxError" for e in rows["syntax_error"]["cell_errors"])
    assert rows["huge_output"]["output_bytes"] >= 20_000_000
    assert rows["out_of_memory"]["events"][0]["kind"] == "out_of_memory"
    assert any(i["kind"] == "suspicious_code" for i in rows["monkeypatched_checker"]["integrity"])
    reads = [i["detail"] for i in rows["reads_solutions"]["integrity"] if i["kind"] == "forbidden_read"]
    assert reads and all("solutions" in d for d in reads)


def test_one_notebook_can_be_graded_on_its_own(tmp_path):
    nb = nbformat.read(ROOT / "solutions" / f"{NAME}.ipynb", as_version=4)
    path = tmp_path / "sub" / "carol.ipynb"  # no name match: found by its metadata
    path.parent.mkdir()
    nb.metadata["course"]["source"] = f"solutions/{NAME}.ipynb"
    nbformat.write(nb, path)
    out = tmp_path / "out"
    proc = subprocess.run(GRADE + [str(path), "--out", str(out), "--seed", "3"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads((out / "carol.json").read_text())
    assert (row["status"], row["score"], row["max_score"]) == ("graded", 28, 28)


@pytest.mark.parametrize("args", [["does/not/exist"], ["{empty}"], ["{empty}", "--workers", "0"], ["--bogus"]])
def test_usage_errors_exit_2(tmp_path, args):
    from course_tools.grading.__main__ import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["grade", *[a.format(empty=tmp_path / "empty") for a in args]])
    assert info.value.code == 2


# ----------------------------------------------------------------------------------------------
# Without a kernel
# ----------------------------------------------------------------------------------------------
def _pair():
    src = nbformat.read(ROOT / "solutions" / f"{NAME}.ipynb", as_version=4)
    sub = nbformat.read(ROOT / "exercises" / f"{NAME}.ipynb", as_version=4)
    return src, sub


def test_check_cells_are_restored_by_id_and_changes_reported():
    src, sub = _pair()
    cells = {c.id: c for c in sub.cells}
    cells["schedule-comparator-check"].source = "print('passed')"
    cells["unet-analyser-check"].metadata["tags"] = []
    sub.cells = [c for c in sub.cells if c.id != "noise-predictor-evaluator-check"]
    copy = nbformat.v4.new_code_cell(cells["unet-analyser-check"].source)
    copy.id = "my-own-copy"
    sub.cells.append(copy)
    restored = notebooks.restore_checker_cells(sub, src)
    kinds = {(i["kind"], i["cell_id"]) for i in restored.integrity}
    assert ("checker_cell_edited", "schedule-comparator-check") in kinds
    assert ("checker_cell_missing", "noise-predictor-evaluator-check") in kinds
    assert ("checker_cell_metadata_changed", "unet-analyser-check") in kinds
    assert restored.extra_checkers == {"my-own-copy"}
    ids = [c.id for c in restored.notebook.cells]
    assert ids.index("noise-predictor-evaluator-check") == ids.index("noise-predictor-evaluator-solution") + 1
    src_checks = {c.id: c.source for c in src.cells if notebooks.is_checker(c)}
    assert {c.id: c.source for c in restored.notebook.cells if notebooks.is_checker(c)} == src_checks
    assert notebooks.restore_checker_cells(_pair()[1], src).integrity == []  # an untouched copy: nothing to report


def test_a_submission_is_matched_to_its_source():
    src, sub = _pair()
    assert notebooks.source_for(Path("x/alice_00_recap_exercises.ipynb"), None).name == f"{NAME}.ipynb"
    assert notebooks.source_for(Path("x/whatever.ipynb"), sub).name == f"{NAME}.ipynb"
    assert notebooks.source_for(Path("x/whatever.ipynb"), None) is None


def test_the_sandbox_hook_refuses_and_logs(tmp_path):
    secret, scratch, log = tmp_path / "secret", tmp_path / "scratch", tmp_path / "log"
    secret.mkdir()
    scratch.mkdir()
    (secret / "answers.txt").write_text("42")
    (tmp_path / "public.txt").write_text("hello")
    script = textwrap.dedent(f"""
        import os, sys, gc, subprocess, signal
        from course_tools.grading.sandbox import make_hook
        fd = os.open({str(log)!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        hook = make_hook(({str(secret)!r},), ({str(scratch)!r},), fd)
        sys.addaudithook(hook)
        def attempt(name, f):
            try:
                f()
                print(name, "allowed")
            except Exception as err:
                print(name, "refused", type(err).__name__)
        attempt("read_public", lambda: open({str(tmp_path / "public.txt")!r}).read())
        attempt("write_scratch", lambda: open({str(scratch / "a.txt")!r}, "w").write("x"))
        attempt("read_secret", lambda: open({str(secret / "answers.txt")!r}).read())
        attempt("list_secret", lambda: os.listdir({str(secret)!r}))
        attempt("relative_read", lambda: (os.chdir({str(scratch)!r}), open("../secret/answers.txt").read()))
        attempt("symlink", lambda: os.symlink({str(secret / "answers.txt")!r}, {str(scratch / "link")!r}))
        attempt("write_outside", lambda: open({str(tmp_path / "evil.py")!r}, "w"))
        attempt("delete_outside", lambda: os.remove({str(tmp_path / "public.txt")!r}))
        attempt("import_checks", lambda: __import__("course_lib.checks.recap"))
        attempt("subprocess", lambda: subprocess.run(["true"]))
        attempt("kill_parent", lambda: os.kill(os.getppid(), signal.SIGTERM))
        attempt("gc_walk", lambda: gc.get_objects())
        attempt("patch_hook", lambda: setattr(hook, "__code__", (lambda e, a: None).__code__))
        attempt("patch_defaults", lambda: setattr(hook, "__defaults__", None))
        attempt("proc_of_parent", lambda: open(f"/proc/{{os.getppid()}}/environ", "rb").read())
        attempt("import_json", lambda: __import__("json"))
        import ctypes, socket
        attempt("ctypes_load", lambda: ctypes.CDLL(None))
        attempt("ctypes_read_memory", lambda: ctypes.string_at(id(hook), 16))
        attempt("ctypes_write_memory", lambda: ctypes.memmove(ctypes.create_string_buffer(8), b"x", 1))
        attempt("bind_local", lambda: socket.socket().bind(("127.0.0.1", 0)))
        attempt("connect_out", lambda: socket.create_connection(("10.255.255.1", 80), timeout=0.2))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    outcome = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    # ctypes.memmove raises no audit event in CPython: a known limit of any audit hook, reported by the
    # grader's scan of the source ("uses ctypes") and harmless to the score, computed in another process
    allowed = {"read_public", "write_scratch", "import_json", "ctypes_load", "bind_local", "ctypes_write_memory"}
    assert {k for k, v in outcome.items() if v == "allowed"} == allowed, proc.stdout + proc.stderr
    assert len(outcome) == 21
    logged = log.read_text()
    for kind in ("forbidden_read", "forbidden_write", "forbidden_import", "subprocess", "signal", "introspection",
                 "code_patching", "ctypes", "network"):
        assert kind in logged, logged
