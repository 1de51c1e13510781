"""Row sinks: where a run's rows go, and how they are published. One seam for every output.

A sink is used in three steps, whatever the workload (images, nightly) and the model family:

    sink.prepare()          before any cluster work: refuse or clear what is in the way
    sink.write(dataset)     the rows, a Ray Dataset of the family's schema, streamed to storage
    sink.commit(record)     publish the run: what a reader trusts is written last

``ParquetFolderSink`` is a run's ``predictions/`` folder with ``summary.parquet`` beside it;
``PartitionSink`` is one night of the nightly layout, committed by its ``_SUCCESS`` record
(see :mod:`segray.infer.nightly`). A table format (Iceberg, Delta) is one more class here.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import uuid
from collections import Counter
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from segray.config import ConfigError, StorageOptions
from segray.io.fs import exists, get_fs, join, pyarrow_fs, remove_tree

PREDICTIONS = "predictions"  # the row folder under a run's output
SUMMARY = "summary.parquet"
FORMAT = "segray-nightly/1"
SUCCESS = "_SUCCESS"
INPUTS_SCHEMA = pa.schema(
    [("source_path", pa.string()), ("image_id", pa.string()), ("size", pa.int64()), ("version", pa.string())]
)


class RowSink(Protocol):
    def prepare(self) -> None: ...

    def write(self, dataset) -> None: ...

    def commit(self, record: dict[str, Any]) -> dict[str, Any]: ...


class ParquetFolderSink:
    """``<output>/predictions/*.parquet`` (Ray Data's files), then ``<output>/summary.parquet``."""

    def __init__(self, output: str, storage: StorageOptions | None, overwrite: bool = False,
                 num_cpus: float = 1.0):
        self.output, self.storage, self.overwrite, self.num_cpus = output, storage, overwrite, num_cpus
        self.rows_url = join(output, PREDICTIONS)

    def prepare(self) -> None:
        """Ray Data appends to existing Parquet folders: refuse unless asked to overwrite."""
        if exists(self.rows_url, self.storage):
            if not self.overwrite:
                raise ConfigError(f"output: {self.rows_url} already exists (set overwrite=true to replace it)")
            remove_tree(self.rows_url, self.storage)

    def write(self, dataset) -> None:
        fs, path = pyarrow_fs(self.rows_url, self.storage)
        # The write asks for the encode tasks' CPUs, so Ray Data fuses encode->Write into one task:
        # with its default 1 CPU the Write ran as separate tasks, one more object-store hop per
        # block, and waited for a whole free CPU beside the busy actors.
        dataset.write_parquet(path, filesystem=fs, ray_remote_args={"num_cpus": self.num_cpus})

    def commit(self, record: dict[str, Any]) -> dict[str, Any]:
        fs, path = pyarrow_fs(join(self.output, SUMMARY), self.storage)
        row = {k: [", ".join(v) if isinstance(v, list) else v] for k, v in record.items()}
        pq.write_table(pa.Table.from_pydict(row), path, filesystem=fs)
        return record


def part_names(attempt: str):
    """Ray Data file names of one attempt: part-<attempt>_<write uuid>_<task>.parquet
    (deterministic per write task, so a retried task overwrites its own file)."""
    from ray.data.datasource import FilenameProvider  # here: importing sinks needs no Ray

    class PartNames(FilenameProvider):
        def __init__(self):
            super().__init__(file_format="parquet")

        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{attempt}_{write_uuid}_{task_index:06}.parquet"

    return PartNames()


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


class PartitionSink:
    """One night's partition, written by a fresh attempt and committed by its ``_SUCCESS`` record.

    ``prepare`` removes whatever is there (the ``_SUCCESS`` first, so a partition is never
    committed with files missing); ``write`` names the data files after the attempt; ``commit``
    checks one row per input, writes the inputs table, then the record (the commit), then
    removes files no record lists (late writes of a killed attempt's tasks).
    """

    def __init__(self, partition: str, storage: StorageOptions | None, schema: pa.Schema):
        self.partition, self.storage, self.schema = partition, storage, schema
        self.attempt = uuid.uuid4().hex[:12]

    def prepare(self) -> None:
        _uncommit_and_clear(self.partition, self.storage)

    def write(self, dataset) -> None:
        fs, path = pyarrow_fs(self.partition, self.storage)
        dataset.write_parquet(path, filesystem=fs, filename_provider=part_names(self.attempt))

    def files(self) -> list[str]:
        """This attempt's data files (names relative to the partition)."""
        prefix = f"part-{self.attempt}_"
        return [f for f in _partition_files(self.partition, self.storage) if f.startswith(prefix) and f.endswith(".parquet")]

    def rows(self, columns: list[str]) -> pa.Table:
        urls = [join(self.partition, f) for f in self.files()]
        if not urls:
            return pa.schema([self.schema.field(n) for n in columns]).empty_table()
        fs, _ = pyarrow_fs(urls[0], self.storage)
        paths = [u.split("://", 1)[1] if "://" in u else os.path.abspath(u) for u in urls]
        return pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=columns)

    def commit(self, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` carries ``inputs`` (a table of INPUTS_SCHEMA: what this night processed)."""
        inputs: pa.Table = record.pop("inputs")
        files = self.files()
        verify_rows(self.rows(["source_path"]), inputs["source_path"].to_pylist())
        inputs_file = f"_inputs-{self.attempt}.parquet"
        pfs, ppath = pyarrow_fs(join(self.partition, inputs_file), self.storage)
        if "://" not in self.partition or self.partition.startswith("file://"):
            os.makedirs(os.path.dirname(ppath), exist_ok=True)
        pq.write_table(inputs, ppath, filesystem=pfs)
        record = {"format": FORMAT, **record, "attempt": self.attempt, "files": files, "inputs_file": inputs_file}
        _write_atomic(join(self.partition, SUCCESS), json.dumps(record, indent=1).encode(), self.storage)
        keep = set(files) | {inputs_file, SUCCESS}
        for name in _partition_files(self.partition, self.storage):
            if name not in keep:
                try:
                    fs, path = get_fs(join(self.partition, name), self.storage)
                    fs.rm(path)
                except OSError:
                    pass  # best effort: the record lists what counts
        return record


def verify_rows(table: pa.Table, want: list[str]) -> None:
    """Exactly one row per input, and nothing else, before a run may commit."""
    got = Counter(table["source_path"].to_pylist())
    dupes = [p for p, n in got.items() if n > 1]
    missing = set(want) - set(got)
    extra = set(got) - set(want)
    if dupes or missing or extra or table.num_rows != len(want):
        raise RuntimeError(
            f"not committing: {table.num_rows} rows for {len(want)} inputs "
            f"({len(dupes)} duplicated, {len(missing)} missing, {len(extra)} unexpected, "
            f"e.g. {sorted(dupes)[:2] + sorted(missing)[:2] + sorted(extra)[:2]})")
