"""Nightly runs into an Apache Iceberg table (``table:``): the table's snapshots are the nights.

See :mod:`segray.infer.nightly` for the rules: the same listing and plan, but the table is the
state. Its rows (one per image, upserted on ``source_path``) carry ``run_date``,
``source_size`` and ``source_version`` beside the family's columns, and a night is committed
when a snapshot of the table's current lineage carries its ``segray.run_date``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from segray.config import ConfigError, NightlyJobConfig
from segray.core.checkpoint import Checkpoint
from segray.infer.families import family_of
from segray.infer.iceberg import IcebergSink, committed_at, lineage, open_table, props_of
from segray.infer.steps import error_reasons
from segray.io.sources import list_archive
from segray.runtime import start_ray

log = logging.getLogger(__name__)

TABLE_FORMAT = "segray-nightly-iceberg/1"
NIGHT_COLUMNS = pa.schema([("run_date", pa.date32()), ("source_size", pa.int64()), ("source_version", pa.string())])


def table_schema(family) -> pa.Schema:
    """A nightly table's rows: the family's schema (at run time) and the night's columns."""
    clash = set(family.schema.names) & set(NIGHT_COLUMNS.names)
    if clash:
        raise ConfigError(f"table: the {family.name} rows already have a column {sorted(clash)[0]!r}")
    return pa.schema(list(family.schema) + list(NIGHT_COLUMNS))


@dataclass(frozen=True)
class TableNight:
    """A committed night of a table: a snapshot of its current lineage with ``segray.run_date``."""

    run_date: str
    snapshot_id: int
    committed_at: str
    props: dict  # the snapshot's segray.* properties (without the prefix)
    summary: dict  # Iceberg's own summary (added-records, total-records, ...)

    @property
    def task(self) -> str:
        return self.props.get("task", "semantic")


def table_nights(table) -> list[TableNight]:
    """The committed nights of ``table``, oldest snapshot first (a rebuilt night appears again)."""
    out = []
    for snap in lineage(table) if table is not None else []:
        props = props_of(snap)
        if props.get("format") == TABLE_FORMAT and props.get("run_date"):
            out.append(TableNight(props["run_date"], snap.snapshot_id, committed_at(snap), props,
                                  dict(snap.summary.additional_properties)))
    return out


def _table_or_none(cfg: NightlyJobConfig):
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    try:
        return open_table(cfg.table, cfg.storage)
    except (NoSuchTableError, NoSuchNamespaceError):
        return None  # nothing committed yet: the first night creates it


def table_plan(cfg: NightlyJobConfig, table=None) -> dict[str, Any]:
    """:func:`plan` for a table: done = the (path, size, version) of its rows of other nights."""
    night = cfg.night().isoformat()
    table = _table_or_none(cfg) if table is None else table
    nights = table_nights(table)
    mine = next((n for n in reversed(nights) if n.run_date == night), None)
    entries = list_archive(cfg.source, cfg.storage)
    done = []
    cols = ("source_path", *NIGHT_COLUMNS.names)
    if table is not None and table.current_snapshot() is not None and set(cols) <= set(table.schema().column_names):
        t = table.scan(selected_fields=cols).to_arrow()
        # Other nights' rows (a rebuild recomputes this night's own images), in Arrow columns.
        t = t.filter(pc.fill_null(pc.not_equal(t["run_date"], pa.scalar(dt.date.fromisoformat(night), pa.date32())), False))
        done = [pa.table({"source_path": t["source_path"], "size": t["source_size"], "version": t["source_version"]})]
    todo = entries.not_in(done)
    return {"run_date": night, "table": cfg.table.identifier, "committed": mine, "entries": entries, "todo": todo,
            "num_done_before": len(entries) - len(todo), "num_commits": len(nights)}


def _night_columns(batch: pa.Table, schema: pa.Schema, night: str, meta: dict) -> pa.Table:
    """The family's rows plus the night's columns (size and version as listed tonight)."""
    paths = batch.column("source_path").to_pylist()
    ids = batch.column("image_id").to_pylist() if "image_id" in batch.column_names else [None] * len(paths)
    listed = [meta.get(p) or meta[("id", i)] for p, i in zip(paths, ids)]
    cols = {n: batch.column(n) for n in batch.column_names}
    cols["run_date"] = pa.array([dt.date.fromisoformat(night)] * len(paths), pa.date32())
    cols["source_size"] = pa.array([m[0] for m in listed], pa.int64())
    cols["source_version"] = pa.array([m[1] for m in listed], pa.string())
    return pa.Table.from_arrays([cols[n] for n in schema.names], names=schema.names).cast(schema)


def _night_counts(table, snapshot_id: int, night: str) -> tuple[int, int, list[str]]:
    """ok and error rows of a night at its snapshot, and the error texts."""
    from pyiceberg.expressions import EqualTo

    t = table.scan(row_filter=EqualTo("run_date", night), selected_fields=("status", "error"),
                   snapshot_id=snapshot_id).to_arrow()
    status = t["status"].to_pylist()
    errors = [e for e, st in zip(t["error"].to_pylist(), status) if st != "ok"]
    return sum(st == "ok" for st in status), sum(st != "ok" for st in status), errors


def run_table_night(cfg: NightlyJobConfig, ckpt: Checkpoint, init_ray: bool, t0: float, started: str) -> dict:
    """One night into ``cfg.table`` (see the module doc)."""
    family = family_of(ckpt)
    night = cfg.night().isoformat()
    ident = cfg.table.identifier
    table = _table_or_none(cfg)
    nights = table_nights(table)
    others = sorted({n.task for n in nights} - {family.name})
    if others:  # one table, one row schema
        raise ConfigError(f"checkpoint: a {family.name!r} checkpoint, but table {ident} holds {others[0]!r} rows "
                          "(write another family's nights to another table)")
    mine = next((n for n in reversed(nights) if n.run_date == night), None)
    if mine is not None and not cfg.rebuild:  # a committed night is final: not even a listing
        ok, bad, _ = _night_counts(table, mine.snapshot_id, night)
        log.info("night %s is committed in %s (snapshot %s): nothing to do", night, ident, mine.snapshot_id)
        return {"run_date": night, "table": ident, "snapshot_id": mine.snapshot_id,
                "archive_size": int(mine.props.get("archive_size", 0)),
                "done_before": int(mine.props.get("done_before", 0)), "status": "already committed",
                "processed": int(mine.props.get("num_inputs", 0)), "num_ok": ok, "num_error": bad,
                "files": int(mine.summary.get("added-data-files", 0)), "committed_at": mine.committed_at,
                "wall_s": time.perf_counter() - t0}
    p = table_plan(cfg, table)
    todo = p["todo"]
    schema = table_schema(family)
    props = {"format": TABLE_FORMAT, "job": "nightly", "task": family.name, "run_date": night,
             "started_at": started, "checkpoint": cfg.checkpoint, "checkpoint_id": ckpt.id,
             "model_name": ckpt.model_name, "num_inputs": len(todo), "archive_size": len(p["entries"]),
             "done_before": p["num_done_before"], "rebuild": cfg.rebuild}
    paths = todo.table["source_path"].to_pylist()
    sink = IcebergSink(cfg.table, cfg.storage, schema, paths, props,
                       num_cpus=cfg.infer.cpus_per_task, expect={"run_date": night})
    sink.prepare()
    if todo:
        from segray.infer.pipeline import build_dataset

        if init_ray:
            start_ray()
        listed = list(zip(todo.table["size"].to_pylist(), todo.table["version"].to_pylist()))
        meta: dict[Any, tuple[int, str]] = dict(zip(paths, listed))
        meta.update({("id", i): m for i, m in zip(todo.table["image_id"].to_pylist(), listed)})
        ds = build_dataset(cfg.infer_config(cfg.output), todo.listing(), ckpt)
        ds = ds.map_batches(_night_columns, fn_kwargs={"schema": schema, "night": night, "meta": meta},
                            batch_format="pyarrow", batch_size=None, num_cpus=cfg.infer.cpus_per_task)
        sink.write(ds)
    record = sink.commit(dict(props))
    ok, bad, errors = _night_counts(sink.table(), record["snapshot_id"], night)
    return {"run_date": night, "table": ident, "snapshot_id": record["snapshot_id"],
            "archive_size": len(p["entries"]), "done_before": p["num_done_before"], "status": "committed",
            "processed": len(todo), "num_ok": ok, "num_error": bad, "error_reasons": error_reasons(errors),
            "files": _added_files(sink.table(), record["snapshot_id"]), "committed_at": record["committed_at"],
            "attempt": record["attempt"], "wall_s": time.perf_counter() - t0}


def _added_files(table, snapshot_id: int) -> int:
    snap = table.snapshot_by_id(snapshot_id)
    return int(snap.summary.additional_properties.get("added-data-files", 0)) if snap is not None else 0
