"""Memory policy of the command-line scripts: keep freed memory in the process (glibc malloc).

A training step allocates and frees the same large temporaries every time. By default glibc serves blocks
over 128 KiB with fresh mmap pages and gives freed heap tops back to the kernel, so the next step faults
every page in again and the kernel zeroes it: measured in docs/SPEED.md, a large part of an RSICD step's CPU
time. Raising both thresholds keeps those blocks for reuse; the numbers computed do not change.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
KEEP_BYTES = 32 << 20  # glibc's largest mmap threshold on 64-bit: blocks up to 32 MiB come from the heap
GLIBC_DEFAULT_BYTES = 128 << 10


def keep_freed_memory(keep: bool = True) -> bool:
    """Set glibc's thresholds (keep=False: back to its 128 KiB defaults); False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    size = KEEP_BYTES if keep else GLIBC_DEFAULT_BYTES
    trim = 1 << 30 if keep else GLIBC_DEFAULT_BYTES
    return bool(mallopt(M_MMAP_THRESHOLD, size)) and bool(mallopt(M_TRIM_THRESHOLD, trim))
