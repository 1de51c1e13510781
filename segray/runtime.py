"""Process settings for the processes that run models (predictor actors, Train workers).

glibc serves every allocation above 32 MiB (a batch's activations) with its own mmap and
unmaps it when freed, and a thread other than the main one allocates from an arena whose heaps
hold at most 64 MiB, so the same happens there whatever the thresholds. Each forward pass then
page-faults its activations back in: on CPU the kernel took about half of a U-Net's inference
time (benchmarks/README.md). Ray Data and Ray Train run user code in such threads, so the
settings must be in place when the process starts: ``MODEL_PROCESS_ENV`` goes into the
runtime_env of the actors and workers that run models. Peak memory is unchanged; freed blocks
stay in the process for the next batch.
"""

from __future__ import annotations

import ctypes
import sys

_KEEP = 1 << 30  # blocks up to 1 GiB come from (and go back to) the heap
MODEL_PROCESS_ENV = {
    "MALLOC_ARENA_MAX": "1",  # every thread allocates from the main (unbounded) arena
    "MALLOC_MMAP_THRESHOLD_": str(_KEEP),
    "MALLOC_TRIM_THRESHOLD_": str(_KEEP),
}

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def model_runtime_env() -> dict:
    """A Ray runtime_env (merged with the job's) for processes that run models."""
    return {"env_vars": dict(MODEL_PROCESS_ENV)}


def keep_freed_memory() -> bool:
    """The same thresholds for the calling process, from now on (for code that runs models on
    the main thread, e.g. a single-process loop). Returns whether glibc took them."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP))


def start_ray() -> None:
    """Join the cluster in RAY_ADDRESS (set inside a Ray job), or start a local Ray.

    Every job calls this after its checks that need no cluster (segray's fail-fast rule), so a
    wrong config never waits for Ray to start. Ray's own output stays off the terminal unless
    SEGRAY_RAY_LOGS=1.
    """
    import logging
    import os

    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=os.environ.get("SEGRAY_RAY_LOGS") == "1")
    logging.getLogger("ray").setLevel(logging.WARNING)
