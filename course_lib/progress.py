"""Progress bars that work in a terminal, in JupyterLab and in Colab (``tqdm.auto`` picks the right one).

Set the environment variable ``COURSE_PROGRESS=0`` to silence them (the test suite does, so that
notebooks' stored outputs stay small).
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress_enabled() -> bool:
    return os.environ.get("COURSE_PROGRESS", "1") not in ("0", "false", "no")


def progress(iterable=None, *, desc: str | None = None, total: int | None = None, leave: bool = False, **kwargs):
    """``tqdm.auto.tqdm`` with the course's defaults: disappears when done, off when COURSE_PROGRESS=0."""
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=not progress_enabled(), **kwargs)
