"""Nightly incremental inference over a growing archive: each image version exactly once.

Layout under ``cfg.output`` (local or object storage), one partition per night::

    run_date=2025-01-31/
        part-<attempt>_*.parquet        data files of the attempt that committed (the family's row schema)
        _inputs-<attempt>.parquet       what it processed: source_path, image_id, size, version
        _SUCCESS                        JSON commit record, written last; lists the files above

The rules (see README "Nightly incremental runs"):

- **Only committed partitions count.** A partition is committed when its ``_SUCCESS`` exists
  (a single atomic PUT on S3; write-to-temp + rename on local disks). Readers
  (:func:`read_committed`) and later runs look at nothing else, and read only the files the
  record lists, so half-written partitions, leftovers of killed drivers and late writes of
  zombie tasks are invisible.
- **What is new.** The archive is listed with size and version (S3 ETag; mtime elsewhere).
  An entry is done when its (path, size, version) is in the inputs of a committed partition
  of *another* night; everything else is processed tonight. A changed image (same path, new
  size or version) is processed again on the night it changed; readers take the latest
  committed row per path (the older row stays in its partition as history).
- **Attempts.** A run first removes its own partition (the ``_SUCCESS`` first, so a partition
  is never committed with missing files), writes data files named after a fresh attempt id,
  checks that they hold exactly one row per input, writes ``_inputs``, then ``_SUCCESS``.
- **Reruns.** Rerunning a committed night is a no-op (``rebuild: true`` rebuilds it: the
  night is uncommitted, then recomputed over the images no *other* night holds). Rerunning
  an uncommitted night (a killed driver) discards its leftovers and redoes it.

Hence every (path, size, version) of the archive is in at most one committed partition, and
after a successful run in exactly one: no duplicates, none lost. Two drivers must not run
the same night at the same time (the schedulers in cluster/ never start a second one).

**With ``table:``** (an Apache Iceberg table, :mod:`segray.infer.iceberg`) the same listing and
plan, but the table is the state: its rows (one per image, upserted on ``source_path``) carry
``run_date``, ``source_size`` and ``source_version`` beside the family's columns, and a night is
committed when a snapshot of the table's current lineage carries its ``segray.run_date``. What
is done is every (source_path, source_size, source_version) of the table's rows of *other*
nights. A night writes with ``write_iceberg`` (UPSERT): one snapshot, committed by the driver
after every write task finished, or none at all (a killed driver leaves unreferenced files
only); its rerun upserts the same images again, so each image has exactly one row. A changed
image's row is replaced on the night it changed (its older row stays in earlier snapshots).
No ``run_date=`` folders then (``output`` is not written): each night's files are its own, so
the column's min/max statistics prune a night's scan as a partition would, without a
partition spec whose folders hold a few files a night.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from segray.config import ConfigError, NightlyJobConfig, StorageOptions
from segray.core.checkpoint import Checkpoint
from segray.infer.families import family_of
from segray.infer.night_tables import run_table_night, table_plan
from segray.infer.night_workloads import WORKLOADS
from segray.infer.sinks import FORMAT, INPUTS_SCHEMA, SUCCESS, PartitionSink
from segray.infer.steps import error_reasons, open_checkpoint
from segray.io.fs import get_fs, join, pyarrow_fs
from segray.io.sources import list_archive
from segray.runtime import start_ray

log = logging.getLogger(__name__)

PARTITION = "run_date="


# --------------------------------------------------------------------------- commits


@dataclass(frozen=True)
class Commit:
    """A committed partition: its ``_SUCCESS`` record."""

    run_date: str
    partition: str  # URL of the run_date=... folder
    record: dict

    @property
    def files(self) -> list[str]:
        return [join(self.partition, f) for f in self.record["files"]]

    @property
    def inputs_file(self) -> str:
        return join(self.partition, self.record["inputs_file"])

    @property
    def task(self) -> str:
        """The model family of the rows (records from before families hold semantic rows)."""
        return self.record.get("task", "semantic")


def partition_url(output: str, run_date: dt.date | str) -> str:
    return join(output, f"{PARTITION}{run_date}")


def _url(root_url: str, path: str) -> str:
    """A filesystem path back to a URL with the scheme of ``root_url``."""
    return f"{root_url.split('://', 1)[0]}://{path}" if "://" in root_url else path


def committed_runs(output: str, storage: StorageOptions | None = None) -> list[Commit]:
    """Every committed partition under ``output``, oldest night first. A ``_SUCCESS`` that does
    not parse or names another night is ignored (with a warning): that night is uncommitted."""
    fs, root = get_fs(output, storage)
    found = fs.glob(posixpath.join(root.rstrip("/"), f"{PARTITION}*", SUCCESS))
    commits = []
    for path in sorted(found):
        folder = posixpath.basename(posixpath.dirname(path))
        night = folder[len(PARTITION):]
        try:
            record = json.loads(fs.cat_file(path))
            if record.get("format") != FORMAT or record.get("run_date") != night:
                raise ValueError(f"format {record.get('format')!r}, run_date {record.get('run_date')!r}")
            if not isinstance(record.get("files"), list) or not record.get("inputs_file"):
                raise ValueError("no file list")
        except (ValueError, OSError) as exc:
            log.warning("ignoring %s (not a valid commit record: %s)", path, exc)
            continue
        commits.append(Commit(night, partition_url(output, night), record))
    return sorted(commits, key=lambda c: c.run_date)


def _read_files(urls: list[str], storage: StorageOptions | None, columns: list[str] | None,
                schema: pa.Schema) -> pa.Table:
    if not urls:
        names = columns or schema.names
        return pa.schema([schema.field(n) for n in names]).empty_table()
    fs, _ = pyarrow_fs(urls[0], storage)
    paths = [u.split("://", 1)[1] if "://" in u else os.path.abspath(u) for u in urls]
    return pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=columns)


def committed_inputs(commit: Commit, storage: StorageOptions | None = None) -> pa.Table:
    return _read_files([commit.inputs_file], storage, None, INPUTS_SCHEMA)


def read_committed(output: str, storage: StorageOptions | None = None, columns: list[str] | None = None,
                   latest_only: bool = True) -> pa.Table:
    """The output rows of every committed night, with a ``run_date`` column.

    Reads only the data files that each ``_SUCCESS`` lists. ``latest_only`` (default) keeps
    one row per ``source_path``: the one of the latest committed night (an image that changed
    was processed again on a later night); ``latest_only=False`` returns every committed
    row (the history). ``columns`` limits what is read (e.g. leave out ``mask_png``).
    """
    commits = committed_runs(output, storage)
    family = family_of(commits[-1].task if commits else "semantic")
    # the rows' schema is the workload's (scene rows for workload scenes): an empty night has no file to say it
    schema = WORKLOADS[commits[-1].record.get("workload", "images")].schema(family) if commits else family.schema
    want = list(columns) if columns else list(schema.names)
    read_cols = want if "source_path" in want else want + ["source_path"]
    seen: set[str] = set()
    parts = []
    for commit in reversed(commits):  # newest night first
        table = _read_files(commit.files, storage, read_cols, schema)
        if latest_only:
            if seen:
                table = table.filter(pc.invert(pc.is_in(table["source_path"], pa.array(sorted(seen), pa.string()))))
            seen.update(table["source_path"].to_pylist())
        table = table.select(want)
        parts.append(table.append_column("run_date", pa.array([commit.run_date] * table.num_rows, pa.string())))
    if not parts:
        empty = pa.schema([schema.field(n) for n in want]).empty_table()
        return empty.append_column("run_date", pa.array([], pa.string()))
    return pa.concat_tables(reversed(parts), promote_options="default")


# --------------------------------------------------------------------------- the run


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def plan(cfg: NightlyJobConfig, commits: list[Commit] | None = None) -> dict[str, Any]:
    """What tonight would do, without changing anything: the night, its partition, whether it
    is already committed, the archive listing, and the entries to process."""
    if cfg.table is not None:
        return table_plan(cfg)
    night = cfg.night().isoformat()
    commits = committed_runs(cfg.output, cfg.storage) if commits is None else commits  # the run's own listing
    mine = next((c for c in commits if c.run_date == night), None)
    entries = list_archive(cfg.source, cfg.storage)
    # a rebuild recomputes this night's own images
    done = [committed_inputs(c, cfg.storage) for c in commits if c.run_date != night]
    todo = entries.not_in(done)
    return {"run_date": night, "partition": partition_url(cfg.output, night), "committed": mine,
            "entries": entries, "todo": todo, "num_done_before": len(entries) - len(todo),
            "num_commits": len(commits)}


def _already_committed(commit: Commit, t0: float) -> dict[str, Any]:
    rec = commit.record
    log.info("%s is already committed: nothing to do (rebuild: true recomputes it)", commit.partition)
    return {"run_date": commit.run_date, "partition": commit.partition, "archive_size": rec.get("archive_size"),
            "done_before": rec.get("done_before"), "status": "already committed", "processed": rec["num_inputs"],
            "num_ok": rec["num_ok"], "num_error": rec["num_error"], "files": len(rec["files"]),
            "committed_at": rec["committed_at"], "wall_s": time.perf_counter() - t0}


def _checked_family(cfg: NightlyJobConfig, ckpt: Checkpoint, commits: list[Commit]):
    """The checkpoint's family, if the output's other nights hold rows of the same schema."""
    family = family_of(ckpt)
    night = cfg.night().isoformat()
    workloads = sorted({c.record.get("workload", "images") for c in commits if c.run_date != night} - {cfg.workload})
    if workloads:
        raise ConfigError(f"workload: {cfg.output} holds nights of workload {workloads[0]!r}, not {cfg.workload!r}")
    others = sorted({c.task for c in commits if c.run_date != night} - {family.name})
    if others:  # one output, one row schema: readers concatenate the nights
        raise ConfigError(f"checkpoint: a {family.name!r} checkpoint, but {cfg.output} holds {others[0]!r} rows "
                          "(write another family's nights to another output)")
    return family


def run_nightly(cfg: NightlyJobConfig, init_ray: bool = True) -> dict[str, Any]:
    """Run one night (see the module doc); returns its summary (also in ``_SUCCESS``)."""
    t0 = time.perf_counter()
    started = _now()
    ckpt = open_checkpoint(cfg.checkpoint, cfg.storage)  # fail fast, before any listing
    if cfg.table is not None:
        return run_table_night(cfg, ckpt, init_ray, t0, started)
    commits = committed_runs(cfg.output, cfg.storage)
    family = _checked_family(cfg, ckpt, commits)
    mine = next((c for c in commits if c.run_date == cfg.night().isoformat()), None)
    if mine is not None and not cfg.rebuild:  # a committed night is final: not even a listing
        return _already_committed(mine, t0)
    p = plan(cfg, commits)
    todo = p["todo"]
    # A fresh attempt: whatever is in the partition (a killed run's files, or the committed
    # night being rebuilt) goes first; this attempt's files carry its own id.
    workload = WORKLOADS[cfg.workload]
    sink = PartitionSink(p["partition"], cfg.storage, workload.schema(family), subfolders=workload.subfolders)
    sink.prepare()
    if todo:
        if init_ray:
            start_ray()
        workload.write(cfg, sink, todo, ckpt)
    table = sink.rows(["status", "error"])
    status = table["status"].to_pylist()
    errors = [e for e, st in zip(table["error"].to_pylist(), status) if st != "ok"]
    inputs = todo.table.select(INPUTS_SCHEMA.names).cast(INPUTS_SCHEMA)
    record = sink.commit({
        "task": family.name, "workload": cfg.workload, "run_date": p["run_date"], "started_at": started, "committed_at": _now(),
        "num_inputs": len(todo), "num_rows": table.num_rows, "num_ok": sum(st == "ok" for st in status),
        "num_error": sum(st != "ok" for st in status), "error_reasons": error_reasons(errors),
        "archive_size": len(p["entries"]), "done_before": p["num_done_before"], "checkpoint": cfg.checkpoint,
        "checkpoint_id": ckpt.id, "model_name": ckpt.model_name,
        "source": cfg.source.model_dump(mode="json"), "wall_s": round(time.perf_counter() - t0, 3),
        "inputs": inputs,
    })
    return {"run_date": p["run_date"], "partition": p["partition"], "archive_size": len(p["entries"]),
            "done_before": p["num_done_before"], "status": "committed", "processed": len(todo),
            "num_ok": record["num_ok"], "num_error": record["num_error"], "files": len(record["files"]),
            "committed_at": record["committed_at"], "attempt": record["attempt"], "wall_s": time.perf_counter() - t0}


def summary_rows(s: dict[str, Any]) -> Iterable[tuple[str, Any]]:
    keys = ("run_date", "status", "archive_size", "done_before", "processed", "num_ok", "num_error", "files",
            "committed_at", "wall_s", "partition", "table", "snapshot_id")
    return [(k, s[k]) for k in keys if k in s]
