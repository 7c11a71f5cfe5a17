"""The grader's settings, shared by the command line, the batch and the executor."""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass
class Options:
    timeout: float = 600.0  # seconds for the whole notebook
    cell_timeout: float = 120.0  # seconds for one cell, or one call into the learner's code
    memory_mb: int = 4096  # address-space limit of the kernel
    file_mb: int = 256  # largest file the kernel may write
    seed: int = 0  # the checks' seeds are drawn from it
    deny: tuple[str, ...] = ()  # extra folders the kernel may not read (the submissions, the reports)
    python: str = sys.executable
    keep_scratch: bool = False
    cache_dir: str | None = None  # shared by the kernels of a batch (matplotlib's font cache)
    pid_dir: str | None = None  # where the kernel's pid is written, for the batch to clean up after a kill
