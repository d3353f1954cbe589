"""This process's resident memory: hand freed memory back to the OS, and measure peaks over a window.

glibc keeps the pages of freed tensors for reuse instead of returning them, so after a long prompt a
process's resident size stays near its high-water mark. A server between batches and a benchmark between
runs call :func:`release_freed_memory` so that what they hold, and the next peak they measure, is their own.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
from pathlib import Path

_LIBC: ctypes.CDLL | bool | None = None  # loaded on first use; False where there is no glibc


def release_freed_memory() -> None:
    """Collect reference cycles, then return the heap's free pages to the OS (glibc's ``malloc_trim``)."""
    global _LIBC
    gc.collect()
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def reset_peak_rss() -> None:
    """Start a new peak-memory window (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    with contextlib.suppress(OSError):  # not Linux: peak_rss() falls back to the lifetime peak
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """Peak resident memory of this process since the last :func:`reset_peak_rss`, in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
