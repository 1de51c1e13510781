"""Process-level settings for the processes that run models (predictor actors, Train workers)."""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_done = False


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Ask glibc to reuse freed large blocks instead of unmapping them.

    By default every allocation above 32 MiB (a batch's activations) is mmapped and unmapped
    again, so each forward pass page-faults its activations back in: on CPU the kernel time
    took half of a U-Net's inference time (benchmarks/README.md: 9.3 -> 21 images/s). Peak
    memory is unchanged; freed blocks stay in the process for the next batch. Returns whether
    the setting took (False off glibc).
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))
    return _done
