"""Row sinks: where a run's rows go, and how they are published. One seam for every output.

A sink is used in three steps, whatever the workload (images, nightly) and the model family:

    sink.prepare()          before any cluster work: refuse or clear what is in the way
    sink.write(dataset)     the rows, a Ray Dataset of the family's schema, streamed to storage
    sink.commit(record)     publish the run: what a reader trusts is written last

``ParquetFolderSink`` is a run's ``predictions/`` folder with ``summary.parquet`` beside it,
published by the ``_SUCCESS`` manifest every job writes (:mod:`segray.io.commit`);
``PartitionSink`` is one night of the nightly layout, committed by its ``_SUCCESS`` record
(see :mod:`segray.infer.nightly`). A table format (Iceberg, Delta) is one more class.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from segray.config import ConfigError, StorageOptions
from segray.io.commit import Publication, committed_files, folder_files, write_atomic
from segray.io.fs import get_fs, join, pyarrow_fs, remove_tree

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
    """``<output>/predictions/part-<attempt>_*.parquet``, ``<output>/summary.parquet``, published by
    ``<output>/_SUCCESS`` (:mod:`segray.io.commit`): complete or absent.

    ``inputs`` are the source paths the run must cover. With ``resume``, the part files a killed
    run finished are kept (a Parquet file is readable only once its footer is written, and an
    object only once its upload completes) and their inputs land in ``done``: the job runs the
    rest. ``complete`` is the manifest when ``resume`` finds the output already committed.
    """

    def __init__(self, output: str, storage: StorageOptions | None, inputs, overwrite: bool = False,
                 resume: bool = False, num_cpus: float = 1.0):
        self.output, self.storage, self.num_cpus = output, storage, num_cpus
        self.inputs = strings(inputs)  # an Arrow column: a million inputs are tens of MB, not a Python list
        self.rows_url = join(output, PREDICTIONS)
        self.publication = Publication(output, storage, "infer", overwrite=overwrite, resume=resume)
        self.done: set[str] = set()
        self.kept: list[str] = []  # part files of earlier attempts that this run keeps
        self.complete: dict[str, Any] | None = None

    def prepare(self) -> None:
        self.complete = self.publication.prepare()
        if self.complete is None and self.publication.resume:
            self._keep_finished()

    def _keep_finished(self) -> None:
        """Keep each finished part file of earlier attempts whose rows are new inputs of this run;
        remove the rest (unreadable: cut off mid-write; or rows already kept, or not asked for)."""
        for name in folder_files(self.rows_url, self.storage):
            url = join(self.rows_url, name)
            try:
                paths = _read_table(url, self.storage, ["source_path"])["source_path"].to_pylist()
            except Exception:  # a truncated file: its rows are not done
                paths = None
            if paths is None or not name.endswith(".parquet") or self.done & set(paths) \
                    or not pc.all(pc.is_in(pa.array(paths, pa.string()), value_set=self.inputs)).as_py():
                _remove_file(url, self.storage)
                continue
            self.done.update(paths)
            self.kept.append(name)

    def files(self) -> list[str]:
        """The part files of this run: those kept, and this attempt's (not a killed run's late ones)."""
        mine = f"part-{self.publication.attempt}_"
        return [n for n in folder_files(self.rows_url, self.storage) if n in self.kept or n.startswith(mine)]

    def write(self, dataset) -> None:
        fs, path = pyarrow_fs(self.rows_url, self.storage)
        # The write asks for the encode tasks' CPUs, so Ray Data fuses encode->Write into one task:
        # with its default 1 CPU the Write ran as separate tasks, one more object-store hop per
        # block, and waited for a whole free CPU beside the busy actors.
        dataset.write_parquet(path, filesystem=fs, filename_provider=part_names(self.publication.attempt),
                              ray_remote_args={"num_cpus": self.num_cpus})

    def rows(self, columns: list[str]) -> pa.Table:
        urls = [join(self.rows_url, n) for n in self.files()]
        if not urls:
            return pa.table({c: pa.array([], pa.string()) for c in columns})
        return pa.concat_tables([_read_table(u, self.storage, columns) for u in urls], promote_options="default")

    def commit(self, record: dict[str, Any]) -> dict[str, Any]:
        """One row per input or nothing; the summary file, then the manifest (the commit), then
        whatever else is in the folder goes (late writes of a killed run's tasks)."""
        files = self.files()
        verify_rows(self.rows(["source_path"]), self.inputs)
        fs, path = pyarrow_fs(join(self.output, SUMMARY), self.storage)
        pq.write_table(pa.Table.from_pylist([record]), path, filesystem=fs)
        self.publication.commit(record, files=[f"{PREDICTIONS}/{n}" for n in files] + [SUMMARY])
        for name in set(folder_files(self.rows_url, self.storage)) - set(files):
            _remove_file(join(self.rows_url, name), self.storage)
        return record


def committed_rows(url: str, storage: StorageOptions | None = None, columns: list[str] | None = None) -> pa.Table:
    """The committed rows of a run: ``url`` is its output folder or that folder's ``predictions/``.
    Raises ConfigError when the run is not committed (killed, or still running)."""
    output = url.rstrip("/")
    if posixpath.basename(output) == PREDICTIONS:
        output = output[: -len(PREDICTIONS)].rstrip("/") or "."
    urls = [u for u in committed_files(output, storage, under=PREDICTIONS) if u.endswith(".parquet")]
    if not urls:
        raise ConfigError(f"{url}: the committed run has no rows")
    return pa.concat_tables([_read_table(u, storage, columns) for u in urls], promote_options="default")


def _read_table(url: str, storage: StorageOptions | None, columns: list[str]) -> pa.Table:
    fs, path = pyarrow_fs(url, storage)
    return pq.read_table(path, filesystem=fs, columns=columns)


def _remove_file(url: str, storage: StorageOptions | None) -> None:
    fs, path = get_fs(url, storage)
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


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
    removes files no record lists (late writes of a killed attempt's tasks). ``subfolders`` hold
    this attempt's other outputs (a scenes night's rasters), kept by the commit.
    """

    def __init__(self, partition: str, storage: StorageOptions | None, schema: pa.Schema,
                 subfolders: tuple[str, ...] = ()):
        self.partition, self.storage, self.schema, self.subfolders = partition, storage, schema, subfolders
        self.attempt = uuid.uuid4().hex[:12]

    def prepare(self) -> None:
        _uncommit_and_clear(self.partition, self.storage)

    def write(self, dataset) -> None:
        fs, path = pyarrow_fs(self.partition, self.storage)
        dataset.write_parquet(path, filesystem=fs, filename_provider=part_names(self.attempt))

    def write_table(self, table: pa.Table) -> None:
        """Rows made on the driver (a scenes night's scene rows), as one data file of the attempt."""
        fs, path = pyarrow_fs(join(self.partition, f"part-{self.attempt}_driver.parquet"), self.storage)
        if "://" not in self.partition or self.partition.startswith("file://"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(table.cast(self.schema), path, filesystem=fs)

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
        verify_rows(self.rows(["source_path"]), inputs["source_path"])
        inputs_file = f"_inputs-{self.attempt}.parquet"
        pfs, ppath = pyarrow_fs(join(self.partition, inputs_file), self.storage)
        if "://" not in self.partition or self.partition.startswith("file://"):
            os.makedirs(os.path.dirname(ppath), exist_ok=True)
        pq.write_table(inputs, ppath, filesystem=pfs)
        record = {"format": FORMAT, **record, "attempt": self.attempt, "files": files, "inputs_file": inputs_file}
        write_atomic(join(self.partition, SUCCESS), json.dumps(record, indent=1).encode(), self.storage)
        keep = set(files) | {inputs_file, SUCCESS}
        for name in _partition_files(self.partition, self.storage):
            if name not in keep and not name.startswith(tuple(f"{d}/" for d in self.subfolders)):
                try:
                    fs, path = get_fs(join(self.partition, name), self.storage)
                    fs.rm(path)
                except OSError:
                    pass  # best effort: the record lists what counts
        return record


def strings(values) -> pa.Array:
    """``values`` (a list, an Arrow array or column) as one Arrow string array."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values.cast(pa.string()) if isinstance(values, pa.Array) else pa.array(list(values), pa.string())


def verify_rows(table: pa.Table, want) -> None:
    """Exactly one row per input, and nothing else, before a run may commit: in Arrow columns
    (``want`` a list or an Arrow array of source paths), so a million-input run is checked
    without a Python set of either side."""
    got, want = strings(table["source_path"]), strings(want)
    counts = pc.value_counts(got)
    dupes = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    missing = want.filter(pc.invert(pc.is_in(want, value_set=got)))
    extra = got.filter(pc.invert(pc.is_in(got, value_set=want)))
    if len(dupes) or len(missing) or len(extra) or len(got) != len(want):
        examples = [v for part in (dupes, missing, extra) for v in sorted(part.to_pylist())[:2]]
        raise RuntimeError(
            f"not committing: {len(got)} rows for {len(want)} inputs "
            f"({len(dupes)} duplicated, {len(missing)} missing, {len(extra)} unexpected, e.g. {examples})")
