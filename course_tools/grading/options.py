"""The grader's settings, shared by the command line, the batch and the executor."""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass
class Options:
    timeout: float = 600.0  # seconds for the whole notebook
    cell_timeout: float = 120.0  # seconds for one cell, or one call into the learner's code
    memory_mb: int = 4096  # address-space limit of each process of a kernel
    file_mb: int = 256  # largest file a kernel may write; also the size of its scratch folder and /tmp
    grader_memory_mb: int = 8192  # address-space limit of each grading process (it reads the kernels' replies)
    seed: int = 0  # the checks' seeds are drawn from it
    python: str = sys.executable
    trust_submissions: bool = False  # run kernels without the operating-system sandbox (one's own work only)
    kernel_tree: str | None = None  # the read-only copy of the course the kernels see (isolation.build_kernel_tree)
