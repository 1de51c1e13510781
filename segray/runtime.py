"""Process settings for the processes that run models (predictor actors, Train workers).

glibc serves every allocation above 32 MiB (a batch's activations) with its own mmap and
unmaps it when freed, and a thread other than the main one allocates from an arena whose heaps
hold at most 64 MiB, so the same happens there whatever the thresholds. Each forward pass then
page-faults its activations back in: on CPU the kernel took about half of a U-Net's inference
time (benchmarks/README.md). Ray Data and Ray Train run user code in such threads, so the
settings must be in place when the process starts: ``MODEL_PROCESS_ENV`` goes into the
runtime_env of the actors and workers that run models. Peak memory is unchanged; freed blocks
stay in the process for the next batch.

``start_ray`` joins or starts Ray with segray's output settings: Ray's own output to a log file
(:func:`log_path`), the terminal for segray's progress lines and summaries (``--verbose``:
Ray's output on the terminal too).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import tempfile
import time

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


# --------------------------------------------------------------------------- Ray and its output


def node_env(num_cpus: float | None = None) -> dict[str, str]:
    """Settings for a Ray node that runs segray's pipelines; its raylet reads them when it starts.

    ``num_workers_soft_limit``: how many workers the raylet keeps before it kills idle ones.
    Measured on a 2-CPU node (benchmarks/README.md): with the variable unset, an image job of
    1,000 images started 8 to 11 worker processes, its 0.5-CPU read and encode task workers
    killed between blocks and started again (Python, Ray and torch imports: about a CPU second
    each); with it set, 7 every time and 1-2 s faster. Two per CPU, and a few for Ray Data's
    own actors, keeps the workers that fractional-CPU tasks and actors need."""
    cpus = int(num_cpus or os.cpu_count() or 1)
    return {"RAY_num_workers_soft_limit": str(2 * cpus + 4)}


def use_node_env(num_cpus: float | None = None) -> None:
    """``node_env`` for the local Ray that ``ray.init`` may start from this process (its raylet
    inherits the environment; a caller's own values win)."""
    for key, value in node_env(num_cpus).items():
        os.environ.setdefault(key, value)


VERBOSE_ENV = "SEGRAY_RAY_LOGS"  # "1": Ray's own output on the terminal (`segray --verbose`)
LOG_FILE_ENV = "SEGRAY_LOG_FILE"  # where Ray's output goes otherwise (default: log_path())
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "ray.util")
_state: dict = {}  # the quiet setup of this process: log path, saved stderr


def verbose() -> bool:
    """Whether Ray's own output goes to the terminal (``--verbose``, SEGRAY_RAY_LOGS=1)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def set_verbose(on: bool = True) -> None:
    """What ``segray --verbose`` does: SEGRAY_RAY_LOGS=1 for this process (and what it starts)."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def log_path() -> str:
    """This process's log file: $SEGRAY_LOG_FILE, else ``<tmp>/segray-logs/segray-<UTC time>-<pid>.log``."""
    if "path" in _state:
        return _state["path"]
    path = os.environ.get(LOG_FILE_ENV)
    if not path:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        path = os.path.join(tempfile.gettempdir(), "segray-logs", f"segray-{stamp}-{os.getpid()}.log")
    return os.path.abspath(path)


def _to_file(handler: logging.Handler) -> None:
    """Ray's Python loggers on the driver write to ``handler`` only (no terminal handlers)."""
    for name in _RAY_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)  # the terminal (Ray Data keeps its own ray-data.log handler)
        if name in ("ray", "ray.data"):  # the roots Ray configures with propagate=False
            lg.addHandler(handler)
            lg.propagate = False
    logging.getLogger("ray").setLevel(logging.INFO)


def _warnings_to_file(handler: logging.Handler) -> None:
    """Warnings raised inside Ray's code go to the log file; segray's own stay on the terminal."""
    import warnings

    shown = warnings.showwarning
    log = logging.getLogger("ray.segray_warnings")

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if f"{os.sep}ray{os.sep}" in str(filename):
            log.warning("%s:%s: %s: %s", filename, lineno, category.__name__, message)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def _native_stderr_to(path: str) -> None:
    """File descriptor 2 (where Ray's C++ core worker of this driver logs) -> the log file;
    Python's sys.stderr keeps writing to the terminal through a copy of the old descriptor."""
    import io

    if sys.stderr is not sys.__stderr__:  # captured (pytest) or replaced by the caller: leave it
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        return
    _state["saved_stderr"] = saved
    sys.stderr = io.TextIOWrapper(os.fdopen(saved, "wb", buffering=0), encoding="utf-8", errors="replace",
                                  line_buffering=True, write_through=True)


def _worker_output_to(handler: logging.Handler) -> bool:
    """Output of Ray's workers and actors (log_to_driver) -> the log file instead of the terminal.
    Ray 2.60's driver hands each batch of worker lines to a dispatcher; swap its printer."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    log = logging.getLogger("ray.segray_workers")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    def to_file(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who} pid={data.get('pid')}, ip={data.get('ip')})"
        for line in data.get("lines", []):
            log.info("%s %s", prefix, line)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("segray_log_file", to_file)
    return True


def _quiet(path: str) -> logging.Handler:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG if os.environ.get("RAY_DATA_LOG_LEVEL") == "DEBUG" else logging.INFO)
    import ray.data  # noqa: F401  (configures the 'ray.data' logger; replaced below)

    _to_file(handler)
    _warnings_to_file(handler)
    _native_stderr_to(path)
    return handler


def start_ray() -> None:
    """Join the cluster in RAY_ADDRESS (set inside a Ray job), or start a local Ray.

    Every job calls this after its checks that need no cluster (segray's fail-fast rule), so a
    wrong config never waits for Ray to start.

    Ray's own output (its driver-side loggers, Ray Data's progress and INFO blocks, Ray Train's
    and every worker's output, the core worker's native log lines) goes to one log file,
    :func:`log_path`, whose path is printed once; the terminal keeps segray's progress lines
    (:func:`segray.report.stage`) and summaries. With SEGRAY_RAY_LOGS=1 (``segray --verbose``)
    Ray prints as it always does. When Ray is already initialised (a test, a notebook), its
    caller's settings stay as they are.
    """
    import ray

    if ray.is_initialized():
        logging.getLogger("ray").setLevel(logging.WARNING)
        return
    use_node_env()
    if verbose():
        ray.init(log_to_driver=True)
        return
    path = log_path()
    handler = _quiet(path)
    _state["path"] = path
    # configure_logging=True keeps the handlers set above (False would clear them); it only sets
    # their format and the 'ray' logger's level.
    ray.init(log_to_driver=True, configure_logging=True, logging_level=logging.INFO)
    if not _worker_output_to(handler):  # another Ray: worker output stays in Ray's session logs
        ray.shutdown()
        ray.init(log_to_driver=False, configure_logging=True, logging_level=logging.INFO)
    print(f"Ray logs: {path}  (--verbose shows them here)", file=sys.stderr, flush=True)
