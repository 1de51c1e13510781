"""An Apache Iceberg table as a row sink: rows upserted by ``source_path``, committed as one snapshot.

The same three steps as the other sinks (:mod:`segray.infer.sinks`):

    prepare()         the namespace and table exist (created from the rows' Arrow schema, the model
                      family's at run time), or the table's schema takes these rows (new columns
                      are added; a column of another type is refused, naming it)
    write(dataset)    Ray Data's ``write_iceberg`` in UPSERT mode on ``source_path``: the write
                      tasks put Parquet data files under the table's location, then the driver
                      commits them all in ONE snapshot (``IcebergDatasink.on_write_complete``:
                      copy-on-write of the files holding older rows of the same images, in the
                      same transaction). Killed before that commit, a run leaves no snapshot:
                      only unreferenced files, which no reader sees.
    commit(record)    the snapshot is the commit; this checks it: this run's snapshot is the
                      table's current one, the table holds exactly one row per image, one per
                      input of this run; a run that wrote no rows commits an empty snapshot (so
                      every committed run, a nightly one above all, is one snapshot). A failed
                      check rolls the table back to the snapshot before and raises.

The snapshot's summary carries the run (``segray.*`` properties: the job, the run_date of a
night, the checkpoint id, the counts known before the write, the attempt id) beside Iceberg's
own counts (added-records, total-records...). Spark, Trino, DuckDB and PyIceberg read the table
at its current snapshot; earlier snapshots keep the history (time travel).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import uuid
from collections import Counter
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.compute as pc

from segray.config import ConfigError, IcebergTableConfig, StorageOptions
from segray.io.fs import get_fs, join, pyarrow_fs, remove_tree

KEY = "source_path"  # the upsert key: one row per image
PREFIX = "segray."  # snapshot summary properties of segray
PREDICTIONS = "predictions"  # the infer job's light copy of its rows under output (see for_infer)
SUMMARY = "summary.parquet"
_LIGHT_COPY = re.compile(r"^part-[0-9a-f]{12}\.parquet$")
WRITE_RETRIES = 3  # of a write task (a retried task's files replace its own; only the last attempt is committed)


def open_catalog(cfg: IcebergTableConfig, storage: StorageOptions | None = None):
    """The table's PyIceberg catalog (a SQLite file's folder is created first)."""
    from pyiceberg.catalog import load_catalog

    path = cfg.catalog.sqlite_path()
    if path and os.path.dirname(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    kwargs = cfg.catalog_kwargs(storage)
    return load_catalog(kwargs.pop("name"), **kwargs)


def open_table(cfg: IcebergTableConfig, storage: StorageOptions | None = None):
    """The PyIceberg ``Table`` (``open_table(cfg.table, cfg.storage).scan().to_arrow()``)."""
    return open_catalog(cfg, storage).load_table(cfg.identifier)


def props_of(snapshot) -> dict[str, str]:
    """The ``segray.*`` properties of a snapshot's summary, without the prefix."""
    if snapshot is None or snapshot.summary is None:
        return {}
    extra = snapshot.summary.additional_properties
    return {k[len(PREFIX):]: v for k, v in extra.items() if k.startswith(PREFIX)}


def lineage(table) -> list:
    """The snapshots of the table's current state, oldest first (a rolled-back one is not there)."""
    from pyiceberg.table.snapshots import ancestors_of

    return list(reversed(list(ancestors_of(table.current_snapshot(), table.metadata))))


def committed_at(snapshot) -> str:
    return dt.datetime.fromtimestamp(snapshot.timestamp_ms / 1000, dt.timezone.utc).isoformat(timespec="seconds")


def _strings(props: dict[str, Any]) -> dict[str, str]:
    return {PREFIX + k: (", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
            for k, v in props.items() if v is not None}


class IcebergSink:
    """Rows of one run into an Iceberg table, upserted on ``source_path``.

    ``schema`` is the Arrow schema of the rows (the family's, plus the nightly columns for a
    nightly table); ``inputs`` the source paths this run must leave one row each for;
    ``properties`` go into the snapshot summary (prefixed ``segray.``); ``expect`` are column
    values every row of this run must have (a night's ``run_date``), checked at commit.
    ``output``: the infer job's folder (see :meth:`for_infer`).
    """

    def __init__(self, table: IcebergTableConfig, storage: StorageOptions | None, schema: pa.Schema,
                 inputs: list[str], properties: Optional[dict[str, Any]] = None, num_cpus: float = 1.0,
                 expect: Optional[dict[str, Any]] = None, output: Optional[str] = None):
        if KEY not in schema.names:
            raise ConfigError(f"table: rows without a {KEY} column cannot be upserted")
        self.cfg, self.storage, self.schema, self.inputs = table, storage, schema, list(inputs)
        self.attempt = uuid.uuid4().hex[:12]
        self.properties = {**(properties or {}), "attempt": self.attempt}
        self.num_cpus, self.expect, self.output = num_cpus, dict(expect or {}), output
        self.parent_id: Optional[int] = None  # the table's snapshot before this run
        # The images pipeline's resume interface: an upsert redoes the whole run, idempotently.
        self.done: set[str] = set()
        self.complete: Optional[dict[str, Any]] = None

    @classmethod
    def for_infer(cls, cfg, ckpt, listed) -> "IcebergSink":
        """The sink of ``segray infer`` with ``table:`` (its rows, the family's schema). The run's
        summary goes to ``<output>/summary.parquet``, computed from a light copy of this run's rows
        (every column but ``mask_png``) in ``<output>/predictions/``, which the families' summaries
        read; the table is where the rows live."""
        from segray.infer.families import family_of

        family = family_of(ckpt)
        props = {"format": "segray-infer-iceberg/1", "job": "infer", "task": family.name,
                 "checkpoint": cfg.checkpoint, "checkpoint_id": ckpt.id, "model_name": ckpt.model_name,
                 "num_inputs": listed.num_rows}
        return cls(cfg.table, cfg.storage, family.schema, listed["image"].to_pylist(), props,
                   num_cpus=cfg.cpus_per_task, output=cfg.output)

    # ------------------------------------------------------------------ the table

    def catalog(self):
        return open_catalog(self.cfg, self.storage)

    def table(self):
        return self.catalog().load_table(self.cfg.identifier)

    def prepare(self) -> None:
        """Create the namespace and table if missing, else fit the table's schema to the rows."""
        from pyiceberg.exceptions import NoSuchTableError

        catalog = self.catalog()
        catalog.create_namespace_if_not_exists(self.cfg.namespace)
        try:
            table = catalog.load_table(self.cfg.identifier)
        except NoSuchTableError:
            table = catalog.create_table_if_not_exists(self.cfg.identifier, schema=self.schema,
                                                       properties=dict(self.cfg.properties))
        self._fit(table)
        table = catalog.load_table(self.cfg.identifier)
        snap = table.current_snapshot()
        self.parent_id = snap.snapshot_id if snap is not None else None
        if self.output:
            self._clear_light_copies()

    def _clear_light_copies(self) -> None:
        """Remove earlier runs' light copies; refuse an output whose predictions/ are a folder run's rows."""
        folder = join(self.output, PREDICTIONS)
        fs, path = get_fs(folder, self.storage)
        if not fs.exists(path):
            return
        names = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.find(path)]
        foreign = [n for n in names if not _LIGHT_COPY.match(n)]
        if foreign:
            raise ConfigError(f"output: {folder} holds rows of a Parquet run (e.g. {foreign[0]}); with table: "
                              "give another output (it receives the summary and a light copy of the rows)")
        remove_tree(folder, self.storage)

    def _fit(self, table) -> None:
        """New columns of the rows (a family's schema grew) are added, as ``write_iceberg`` would;
        a column of the table that the rows' type cannot be written to is refused, naming it."""
        names = set(table.schema().column_names)
        if KEY not in names:
            raise ConfigError(f"table: {self.cfg.identifier} has no {KEY} column (not a table of segray rows)")
        try:
            with table.update_schema() as update:
                update.union_by_name(self.schema)
        except Exception as exc:  # pyiceberg's ValidationError / ResolveError name the column
            raise ConfigError(f"table: {self.cfg.identifier} does not take this run's rows: {exc}") from None

    def write(self, dataset) -> None:
        from ray.data import SaveMode

        # Into a table without snapshots an upsert is an append (and Ray 2.60's upsert cannot start
        # one: it scans the missing ref "main").
        upsert = self.parent_id is not None
        dataset.write_iceberg(
            self.cfg.identifier,
            catalog_kwargs=self.cfg.catalog_kwargs(self.storage),
            snapshot_properties=_strings(self.properties),
            mode=SaveMode.UPSERT if upsert else SaveMode.APPEND,
            upsert_kwargs={"join_cols": [KEY]} if upsert else None,
            # The Write stays an operator of its own (remote args unlike the encode tasks'): fused
            # into them, Ray Data 2.60 hands on_write_start the fused operator's INPUT schema (the
            # predictor's columns: tensors), which write_iceberg would add to the table (or fail on).
            ray_remote_args={"num_cpus": self.num_cpus, "max_retries": WRITE_RETRIES},
        )
        if self.output:
            self._light_copy()

    def _light_copy(self) -> None:
        import pyarrow.parquet as pq

        mine = self.snapshot(self.table())
        cols = [n for n in self.schema.names if n != "mask_png"]
        rows = self.rows(cols, snapshot_id=mine.snapshot_id) if mine is not None else self.schema.empty_table()
        fs, path = pyarrow_fs(join(self.output, PREDICTIONS, f"part-{self.attempt}.parquet"), self.storage)
        if "://" not in self.output or self.output.startswith("file://"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(rows.select(cols), path, filesystem=fs)

    def snapshot(self, table):
        """This attempt's snapshot, if it is the table's current one."""
        snap = table.current_snapshot()
        return snap if snap is not None and props_of(snap).get("attempt") == self.attempt else None

    def rows(self, columns: Iterable[str], snapshot_id: Optional[int] = None, row_filter=None) -> pa.Table:
        """The rows of this run's inputs in the table (at ``snapshot_id``; default: the current one)."""
        cols = list(dict.fromkeys([*columns, KEY]))
        table = self.table()
        if table.current_snapshot() is None:
            return pa.schema([self.schema.field(n) for n in cols]).empty_table()
        kw = {"row_filter": row_filter} if row_filter is not None else {}
        got = table.scan(selected_fields=tuple(cols), snapshot_id=snapshot_id, **kw).to_arrow()
        got = got.filter(pc.is_in(got[KEY], pa.array(self.inputs, got.schema.field(KEY).type)))
        return got.select(list(columns))

    def commit(self, record: dict[str, Any]) -> dict[str, Any]:
        """Check this run's snapshot (an empty one if it wrote nothing); return ``record`` with it."""
        table = self.table()
        snap = self.snapshot(table)
        if snap is None:
            if self.inputs:
                raise RuntimeError(f"not committing: {len(self.inputs)} inputs, but the current snapshot of "
                                   f"{self.cfg.identifier} is not this run's (attempt {self.attempt})")
            with table.transaction() as txn:  # nothing to write: the run is still one snapshot
                with txn.update_snapshot(snapshot_properties=_strings(self.properties)).fast_append():
                    pass
            table = self.table()
            snap = self.snapshot(table)
        try:
            self._verify(table, snap)
        except RuntimeError:
            if snap.parent_snapshot_id is not None:
                table.manage_snapshots().rollback_to_snapshot(snap.parent_snapshot_id).commit()
            raise
        out = {**record, "table": self.cfg.identifier, "snapshot_id": snap.snapshot_id,
               "parent_snapshot_id": snap.parent_snapshot_id, "attempt": self.attempt,
               "committed_at": committed_at(snap)}
        if self.output:
            import pyarrow.parquet as pq

            fs, path = pyarrow_fs(join(self.output, SUMMARY), self.storage)
            pq.write_table(pa.Table.from_pylist([{k: (", ".join(map(str, v)) if isinstance(v, list) else v)
                                                  for k, v in out.items()}]), path, filesystem=fs)
        return out

    def _verify(self, table, snap) -> None:
        """One row per image in the whole table; one per input of this run, with ``expect``'s values."""
        cols = (KEY, *self.expect)
        got = table.scan(selected_fields=cols, snapshot_id=snap.snapshot_id).to_arrow()
        counts = Counter(got[KEY].to_pylist())
        dupes = sorted(p for p, n in counts.items() if n > 1)
        missing = sorted(set(self.inputs) - set(counts))
        wrong: list[str] = []
        if self.expect and self.inputs:
            mine = got.filter(pc.is_in(got[KEY], pa.array(self.inputs, got.schema.field(KEY).type)))
            for name, value in self.expect.items():
                vals = mine[name].to_pylist()
                wrong += [p for p, v in zip(mine[KEY].to_pylist(), vals) if str(v) != str(value)]
        if dupes or missing or wrong:
            raise RuntimeError(
                f"not committing snapshot {snap.snapshot_id} of {self.cfg.identifier} (rolled back): "
                f"{len(self.inputs)} inputs, {len(dupes)} images with several rows, {len(missing)} missing, "
                f"{len(wrong)} not of this run, e.g. {(dupes + missing + sorted(wrong))[:3]}")
