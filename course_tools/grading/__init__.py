"""The course's grader and the generator of the student version (``exercises/``).

    python -m course_tools.grading grade PATH [--out DIR] [--workers N] [--timeout S] [--cell-timeout S]
    python -m course_tools.grading generate      # solutions/ -> exercises/
    python -m course_tools.grading check-sync    # exit 1 when exercises/ is out of date

Modules:
    notebooks.py  the one source: solution regions, generation, check cells restored by cell id
    sandbox.py    the kernel a submission runs in: limits, audit hook, the checks' agent
    executor.py   grades one submission: runs its cells, then the checks from the grader's process
    batch.py      a folder of submissions: one process each, in parallel; JSON, CSV and Markdown

``docs/grading.md`` is the instructor's guide. This package's ``__init__`` imports nothing, because
the sandboxed kernel starts from ``course_tools.grading.sandbox`` and must not load the rest.
"""
