"""The terminal: rich tables for the end-of-job summaries, and one progress line per stage
(:func:`stage`) while a job runs (Ray's own output goes to a log file: segray.runtime.start_ray)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterable

from rich.console import Console
from rich.table import Table

console = Console()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:,.4f}" if abs(v) < 100 else f"{v:,.1f}"
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "-"
    return str(v)


def print_table(title: str, rows: Iterable[tuple[str, Any]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in rows:
        table.add_row(key, _fmt(value))
    console.print(table)


def reasons_text(reasons: Any) -> str:
    """A summary's ``error_reasons`` for a terminal: "truncated: 3, empty: 1" (older summaries
    held a list of kinds, or their text)."""
    if isinstance(reasons, str):
        return reasons
    return ", ".join(f"{r['kind']}: {r['count']}" if isinstance(r, dict) else str(r) for r in reasons)


def infer_rows(s: dict[str, Any], class_names: list[str] | None = None) -> list[tuple[str, Any]]:
    rows = [(k, s[k]) for k in ("num_inputs", "num_ok", "num_error", "num_with_ground_truth", "wall_s",
                                "images_per_s", "megapixels_per_s", "mean_decode_ms", "mean_predict_ms",
                                "model_name", "checkpoint_id") if k in s]
    if s.get("error_reasons"):
        rows.append(("error reasons", reasons_text(s["error_reasons"])))
    rows += [(k, s[k]) for k in ("miou", "pixel_accuracy", "mean_class_accuracy", "fwiou", "mean_dice") if k in s]
    rows += [(k, s[k]) for k in ("num_instances", "mean_instances_per_image", "segm_ap", "segm_ap50", "segm_ap75",
                                 "segm_ar", "bbox_ap", "bbox_ap50", "bbox_ap75", "bbox_ar") if k in s]
    rows += [(f"IoU {c}", s[f"iou/{c}"]) for c in class_names or [] if f"iou/{c}" in s]
    rows += [("predictions", s["predictions"]), ("summary", s["output"].rstrip("/") + "/summary.parquet")]
    return rows


# --------------------------------------------------------------------------- progress

PROGRESS_EVERY_ENV = "SEGRAY_PROGRESS_EVERY"  # seconds between plain progress lines (default 10)
_active: list["Stage"] = []


def _quiet_ray() -> bool:
    return os.environ.get("SEGRAY_RAY_LOGS") != "1"  # segray.runtime.verbose(), without importing it


class Stage:
    """One stage of a job on the terminal: a rich progress bar on a TTY, a plain line every
    few seconds otherwise (``infer: 120/300 rows, 14.2 rows/s``), and one closing line.

    Progress comes from ``update``/``advance`` calls, and from Ray Data: while a stage is open,
    every Dataset the driver executes reports the rows its last operator has produced (written,
    for a write) to it, through the progress manager of Ray Data's streaming executor.
    """

    def __init__(self, name: str, total: int | None = None, unit: str = "rows", every: float | None = None,
                 follow_datasets: bool = True):
        self.name, self.total, self.unit = name, total, unit
        # A stage made of several phases (the demo: data, training, inference) is not counted
        # by whichever Dataset ran last: it says it is running, and how long it took.
        self.follow_datasets = follow_datasets
        self.every = every if every is not None else float(os.environ.get(PROGRESS_EVERY_ENV, "10"))
        self.completed = 0
        self.what = ""  # what the count is of, when it is not the whole stage (a Ray Dataset's id)
        self._own_total = total is not None
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        self._task = None
        self._printed = (None, None)

    # ---- progress
    def update(self, completed: int | None = None, total: int | None = None, what: str | None = None) -> None:
        with self._lock:
            if completed is not None:
                self.completed = completed
            if total is not None:
                self.total = total
            if what is not None:
                self.what = what
        self._refresh_bar()

    def advance(self, k: int = 1) -> None:
        with self._lock:
            self.completed += k
        self._refresh_bar()

    def line(self, final: bool = False, failed: bool = False) -> str:
        elapsed = time.monotonic() - self._t0
        rate = self.completed / elapsed if elapsed > 0 else 0.0
        count = f"{self.completed}/{self.total}" if self.total else f"{self.completed}"
        if failed:
            return f"{self.name}: failed after {elapsed:.1f} s ({count} {self.unit})"
        if final:
            done = f", {count} {self.unit}, {rate:.1f} {self.unit}/s" if self.completed else ""
            return f"{self.name}: done in {elapsed:.1f} s{done}"
        if not self.completed and not self.total:
            return f"{self.name}: running, {elapsed:.0f} s"
        return f"{self.name}: {count} {self.unit}, {rate:.1f} {self.unit}/s, {elapsed:.0f} s"

    # ---- display
    def _refresh_bar(self) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=self.completed, total=self.total)

    def _ticker(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(min(1.0, self.every)):
            now = time.monotonic()
            if now - last < self.every:
                continue
            state = (self.completed, self.total)
            if state == self._printed and now - last < 6 * self.every:
                continue  # nothing new: a line a minute at most, to show it is alive
            last, self._printed = now, state
            console.print(self.line(), highlight=False, soft_wrap=True)

    def __enter__(self) -> "Stage":
        _hook_ray_data()
        _active.append(self)
        self._t0 = time.monotonic()
        if console.is_terminal and _quiet_ray():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn(self.unit), TimeElapsedColumn(), console=console, transient=True)
            self._task = self._bar.add_task(self.name, total=self.total)
            self._bar.start()
        else:
            self._thread = threading.Thread(target=self._ticker, name=f"segray-progress-{self.name}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._bar is not None:
            self._bar.stop()
        if self in _active:
            _active.remove(self)
        console.print(self.line(final=True, failed=exc_type is not None), highlight=False, soft_wrap=True)

    # ---- from Ray Data
    def dataset_progress(self, dataset_id: str, completed: int, total: int | None) -> None:
        if self._own_total or not self.follow_datasets:  # the job counts itself; Ray Data's rows are not its unit
            return
        if total is not None and total < completed:  # an estimate Ray Data has not caught up with
            total = None
        self.update(completed=completed, total=total or None, what=dataset_id)


def stage(name: str, total: int | None = None, unit: str = "rows", every: float | None = None,
          follow_datasets: bool = True) -> Stage:
    """``with stage("infer") as s: ...``: the stage's progress line(s), fed by Ray Data (or ``s.advance(k)``)."""
    return Stage(name, total, unit, every, follow_datasets)


def current_stage() -> Stage | None:
    return _active[-1] if _active else None


class _ProgressTee:
    """Ray Data's progress manager for one Dataset execution, plus the open stage's counter.

    Quiet (the default), Ray Data's own progress goes to its logger (the log file, see
    segray.runtime.start_ray) whether or not stdout is a TTY; with SEGRAY_RAY_LOGS=1 Ray Data
    picks its display as usual.
    """

    def __init__(self, inner, dataset_id: str, topology) -> None:
        self._inner, self._dataset_id, self._topology = inner, dataset_id, topology

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def _report(self) -> None:
        stage_ = current_stage()
        if stage_ is None:
            return
        try:
            ops = list(self._topology)
            last = ops[-1]
            if "Write" in last.name:  # rows into the write (its outputs are write statistics)
                done = last.metrics.num_row_inputs_received
                deps = getattr(last, "input_dependencies", None) or []
                total = deps[0].num_output_rows_total() if deps else None
            else:
                done = last.metrics.row_outputs_taken
                total = last.num_output_rows_total()
            if total is None and ops:
                total = ops[0].num_output_rows_total()
        except Exception:  # another Ray version's internals: no count, the stage still ticks
            return
        stage_.dataset_progress(self._dataset_id, int(done or 0), total)

    def refresh(self) -> None:
        self._inner.refresh()
        self._report()

    def close_with_finishing_description(self, desc: str, success: bool) -> None:
        self._report()
        self._inner.close_with_finishing_description(desc, success)


_hooked: list[bool] = []


def _hook_ray_data() -> None:
    """Once per process: Ray Data's streaming executor gets its progress managers through
    :class:`_ProgressTee`. Ray's internals (2.60): where they differ, nothing is hooked."""
    if _hooked:
        return
    _hooked.append(True)
    try:
        from ray.data._internal.execution import streaming_executor as se
        from ray.data._internal.progress.logging_progress import LoggingExecutionProgressManager
    except ImportError:
        return
    original = getattr(se, "get_progress_manager", None)
    if original is None:
        return

    def get_progress_manager(ctx, dataset_id, topology, verbose_progress):
        if _quiet_ray() and ctx.enable_progress_bars:  # into Ray Data's log, never the terminal
            inner = LoggingExecutionProgressManager(dataset_id, topology, ctx.enable_operator_progress_bars,
                                                    verbose_progress)
        else:
            inner = original(ctx, dataset_id, topology, verbose_progress)
        return _ProgressTee(inner, dataset_id, topology)

    se.get_progress_manager = get_progress_manager
