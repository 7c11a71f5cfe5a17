"""The course's grader and the generator of the student version (``exercises/``).

    python -m course_tools.grading grade PATH [--out DIR] [--workers N] [--timeout S] [--cell-timeout S]
                                        [--trust-submissions]
    python -m course_tools.grading generate      # solutions/ -> exercises/
    python -m course_tools.grading check-sync    # exit 1 when exercises/ is out of date

Modules:
    notebooks.py  the one source: solution regions, generation, check cells restored by cell id
    isolation.py  the operating-system sandbox (Bubblewrap) of each kernel, and its read-only kernel tree
    sandbox.py    the kernel inside it: an IPython runner on pipes, the audit hook, the checks' agent
    executor.py   grades one submission: runs its cells, then the checks from the grader's process
    batch.py      a folder of submissions: one process each, in parallel; JSON, CSV and Markdown

``docs/grading.md`` is the instructor's guide and the threat model. This package's ``__init__``
imports nothing, because the sandboxed kernel starts from ``sandbox.py``, and its kernel tree holds
only that module of this package.
"""
