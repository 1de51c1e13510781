"""Nightly incremental inference over a growing archive: each image version exactly once.

Layout under ``cfg.output`` (local or object storage), one partition per night::

    run_date=2025-01-31/
        part-<attempt>_*.parquet        data files of the attempt that committed (steps.OUTPUT_SCHEMA)
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
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import posixpath
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from ray.data.datasource import FilenameProvider

from segray.config import ConfigError, NightlyJobConfig, SourceConfig, StorageOptions
from segray.infer.steps import OUTPUT_SCHEMA, error_reasons, read_checkpoint
from segray.io.fs import (
    Sample,
    _glob_base,
    get_fs,
    join,
    list_samples,
    pyarrow_fs,
    remove_tree,
)

log = logging.getLogger(__name__)

FORMAT = "segray-nightly/1"
SUCCESS = "_SUCCESS"
PARTITION = "run_date="
INPUTS_SCHEMA = pa.schema(
    [("source_path", pa.string()), ("image_id", pa.string()), ("size", pa.int64()), ("version", pa.string())]
)


# --------------------------------------------------------------------------- archive listing


@dataclass(frozen=True)
class ArchiveEntry:
    """One image of the archive as listed tonight."""

    url: str
    image_id: str
    mask: Optional[str]
    size: int
    version: str  # S3 ETag, else modification time

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.url, self.size, self.version)


def _version(info: dict) -> str:
    for k in ("ETag", "etag", "e_tag"):
        if info.get(k):
            return str(info[k]).strip('"')
    for k in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        v = info.get(k)
        if v is not None and v != "":
            return v.isoformat() if hasattr(v, "isoformat") else repr(v)
    return ""


def _listing_root(source: SourceConfig) -> Optional[str]:
    if source.images:
        return source.images
    if source.glob:
        scheme = source.glob.split("://", 1)[0] + "://" if "://" in source.glob else ""
        base = _glob_base(source.glob.split("://", 1)[1] if scheme else source.glob)
        return scheme + base if base else None
    return None  # manifest: entries can be anywhere


def list_archive(source: SourceConfig, storage: StorageOptions | None = None) -> list[ArchiveEntry]:
    """The images ``source`` names (the selection rules of ``list_samples``), each with its
    size and version: one recursive listing under the folder / glob base, ``info`` for the
    rest (manifest entries elsewhere)."""
    samples = list_samples(source, storage)
    if not samples:
        return []
    fs, _ = get_fs(samples[0].image, storage)
    details: dict[str, dict] = {}
    root = _listing_root(source)
    if root:
        rfs, rpath = get_fs(root, storage)
        details = dict(rfs.find(rpath, detail=True, withdirs=False))
    out = []
    for s in samples:
        path = fs._strip_protocol(s.image)
        info = details.get(path)
        if info is None:
            info = fs.info(path)
        out.append(ArchiveEntry(s.image, s.image_id, s.mask, int(info.get("size") or 0), _version(info)))
    return out


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
    want = list(columns) if columns else list(OUTPUT_SCHEMA.names)
    read_cols = want if "source_path" in want else want + ["source_path"]
    seen: set[str] = set()
    parts = []
    for commit in reversed(committed_runs(output, storage)):  # newest night first
        table = _read_files(commit.files, storage, read_cols, OUTPUT_SCHEMA)
        if latest_only:
            if seen:
                table = table.filter(pc.invert(pc.is_in(table["source_path"], pa.array(sorted(seen), pa.string()))))
            seen.update(table["source_path"].to_pylist())
        table = table.select(want)
        parts.append(table.append_column("run_date", pa.array([commit.run_date] * table.num_rows, pa.string())))
    if not parts:
        empty = pa.schema([OUTPUT_SCHEMA.field(n) for n in want]).empty_table()
        return empty.append_column("run_date", pa.array([], pa.string()))
    return pa.concat_tables(reversed(parts), promote_options="default")


# --------------------------------------------------------------------------- the run


class PartNames(FilenameProvider):
    """Ray Data file names of one attempt: part-<attempt>_<write uuid>_<task>.parquet
    (deterministic per write task, so a retried task overwrites its own file)."""

    def __init__(self, attempt: str):
        super().__init__(file_format="parquet")
        self.attempt = attempt

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{self.attempt}_{write_uuid}_{task_index:06}.parquet"


def _uncommit_and_clear(partition: str, storage: StorageOptions | None) -> None:
    """Delete ``_SUCCESS`` first (so the night is never committed with files missing), then
    everything else in the partition."""
    fs, path = get_fs(partition, storage)
    marker = posixpath.join(path.rstrip("/"), SUCCESS)
    if fs.exists(marker):
        fs.rm(marker)
    remove_tree(partition, storage)


def _write_atomic(url: str, data: bytes, storage: StorageOptions | None) -> None:
    """All or nothing: one PUT on object storage; temp file + rename on a local disk."""
    fs, path = get_fs(url, storage)
    if "://" in url and not url.startswith("file://"):
        fs.pipe_file(path, data)
        return
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _partition_files(partition: str, storage: StorageOptions | None) -> list[str]:
    """Names (relative to the partition) of every file in it."""
    fs, path = get_fs(partition, storage)
    root = path.rstrip("/")
    if not fs.exists(root):
        return []
    return sorted(n[len(root) + 1:] for n, info in fs.find(root, detail=True, withdirs=False).items()
                  if info.get("type") == "file" and not n.endswith("/"))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def plan(cfg: NightlyJobConfig) -> dict[str, Any]:
    """What tonight would do, without changing anything: the night, its partition, whether it
    is already committed, the archive listing, and the entries to process."""
    night = cfg.night().isoformat()
    commits = committed_runs(cfg.output, cfg.storage)
    mine = next((c for c in commits if c.run_date == night), None)
    entries = list_archive(cfg.source, cfg.storage)
    done: set[tuple[str, int, str]] = set()
    for c in commits:
        if c.run_date == night:
            continue  # a rebuild recomputes this night's own images
        t = committed_inputs(c, cfg.storage)
        done.update(zip(t["source_path"].to_pylist(), t["size"].to_pylist(), t["version"].to_pylist()))
    todo = [e for e in entries if e.key not in done]
    return {"run_date": night, "partition": partition_url(cfg.output, night), "committed": mine,
            "entries": entries, "todo": todo, "num_done_before": len(entries) - len(todo),
            "num_commits": len(commits)}


def _verify(table: pa.Table, todo: list[ArchiveEntry]) -> None:
    """Exactly one row per input, and nothing else, before the night may commit."""
    got = Counter(table["source_path"].to_pylist())
    want = {e.url for e in todo}
    dupes = [p for p, n in got.items() if n > 1]
    missing = want - set(got)
    extra = set(got) - want
    if dupes or missing or extra or table.num_rows != len(todo):
        raise RuntimeError(
            f"not committing: {table.num_rows} rows for {len(todo)} inputs "
            f"({len(dupes)} duplicated, {len(missing)} missing, {len(extra)} unexpected, "
            f"e.g. {sorted(dupes)[:2] + sorted(missing)[:2] + sorted(extra)[:2]})")


def run_nightly(cfg: NightlyJobConfig, init_ray: bool = True) -> dict[str, Any]:
    """Run one night (see the module doc); returns its summary (also in ``_SUCCESS``)."""
    t0 = time.perf_counter()
    started = _now()
    payload, ckpt_id = read_checkpoint(cfg.checkpoint, cfg.storage)  # fail fast, before any listing
    if payload.get("task", "semantic") != "semantic":
        raise ConfigError(f"checkpoint: nightly runs take semantic checkpoints (this one is {payload.get('task')!r})")
    night = cfg.night().isoformat()
    mine = next((c for c in committed_runs(cfg.output, cfg.storage) if c.run_date == night), None)
    if mine is not None and not cfg.rebuild:  # a committed night is final: not even a listing
        rec = mine.record
        log.info("%s is already committed: nothing to do (rebuild: true recomputes it)", mine.partition)
        return {"run_date": night, "partition": mine.partition, "archive_size": rec.get("archive_size"),
                "done_before": rec.get("done_before"), "status": "already committed", "processed": rec["num_inputs"],
                "num_ok": rec["num_ok"], "num_error": rec["num_error"], "files": len(rec["files"]),
                "committed_at": rec["committed_at"], "wall_s": time.perf_counter() - t0}
    p = plan(cfg)
    night, partition, todo = p["run_date"], p["partition"], p["todo"]
    base = {"run_date": night, "partition": partition, "archive_size": len(p["entries"]),
            "done_before": p["num_done_before"]}

    # A fresh attempt: whatever is in the partition (a killed run's files, or the committed
    # night being rebuilt) goes first; this attempt's files carry its own id.
    attempt = uuid.uuid4().hex[:12]
    _uncommit_and_clear(partition, cfg.storage)
    prefix = f"part-{attempt}_"
    if todo:
        import ray

        from segray.infer.pipeline import build_dataset

        if init_ray and not ray.is_initialized():
            ray.init(log_to_driver=False)
        samples = [Sample(image=e.url, mask=e.mask, image_id=e.image_id) for e in todo]
        fs, out_path = pyarrow_fs(partition, cfg.storage)
        build_dataset(cfg.infer_config(partition), samples, payload).write_parquet(
            out_path, filesystem=fs, filename_provider=PartNames(attempt))
    files = [f for f in _partition_files(partition, cfg.storage) if f.startswith(prefix) and f.endswith(".parquet")]
    cols = ["source_path", "status", "error", "decode_ms", "predict_ms"]
    table = _read_files([join(partition, f) for f in files], cfg.storage, cols, OUTPUT_SCHEMA)
    _verify(table, todo)

    inputs_file = f"_inputs-{attempt}.parquet"
    inputs = pa.table({"source_path": [e.url for e in todo], "image_id": [e.image_id for e in todo],
                       "size": [e.size for e in todo], "version": [e.version for e in todo]}, schema=INPUTS_SCHEMA)
    pfs, ppath = pyarrow_fs(join(partition, inputs_file), cfg.storage)
    if "://" not in partition or partition.startswith("file://"):
        os.makedirs(os.path.dirname(ppath), exist_ok=True)
    pq.write_table(inputs, ppath, filesystem=pfs)

    status = table["status"].to_pylist()
    errors = [e for e, s in zip(table["error"].to_pylist(), status) if s != "ok"]
    wall = time.perf_counter() - t0
    record = {
        "format": FORMAT,
        "run_date": night,
        "attempt": attempt,
        "started_at": started,
        "committed_at": _now(),
        "files": files,
        "inputs_file": inputs_file,
        "num_inputs": len(todo),
        "num_rows": table.num_rows,
        "num_ok": sum(s == "ok" for s in status),
        "num_error": sum(s != "ok" for s in status),
        "error_reasons": error_reasons(errors),
        "archive_size": len(p["entries"]),
        "done_before": p["num_done_before"],
        "checkpoint": cfg.checkpoint,
        "checkpoint_id": ckpt_id,
        "model_name": payload["model_config"]["name"],
        "source": cfg.source.model_dump(mode="json"),
        "wall_s": round(wall, 3),
    }
    _write_atomic(join(partition, SUCCESS), json.dumps(record, indent=1).encode(), cfg.storage)  # the commit

    # Best effort: files no record lists (late writes of a killed attempt's tasks).
    keep = set(files) | {inputs_file, SUCCESS}
    for name in _partition_files(partition, cfg.storage):
        if name not in keep:
            try:
                fs, path = get_fs(join(partition, name), cfg.storage)
                fs.rm(path)
            except OSError:
                pass
    return {**base, "status": "committed", "processed": len(todo), "num_ok": record["num_ok"],
            "num_error": record["num_error"], "files": len(files), "committed_at": record["committed_at"],
            "attempt": attempt, "wall_s": wall}


def summary_rows(s: dict[str, Any]) -> Iterable[tuple[str, Any]]:
    keys = ("run_date", "status", "archive_size", "done_before", "processed", "num_ok", "num_error", "files",
            "committed_at", "wall_s", "partition")
    return [(k, s[k]) for k in keys if k in s]
