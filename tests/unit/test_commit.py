"""Complete or absent: the commit protocol every job's output goes through (segray.io.commit), and
the Parquet row sink's resume on top of it. Real files on a local disk; the same code runs on
S3 in tests/integration/test_outputs_committed.py."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segray.config import ConfigError
from segray.infer.sinks import PREDICTIONS, SUMMARY, ParquetFolderSink, committed_rows
from segray.io.commit import ATTEMPT, SUCCESS, Publication, committed_files, folder_files, read_manifest


def _part(folder, name, paths):
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"source_path": paths, "status": ["ok"] * len(paths)}), folder / name)


def test_a_folder_is_committed_only_by_its_manifest_written_last(tmp_path):
    out = tmp_path / "out"
    pub = Publication(str(out), None, "infer")
    assert pub.prepare() is None
    assert (out / ATTEMPT).exists(), "a running job marks the folder as its own"
    (out / "data").mkdir()
    (out / "data" / "a.bin").write_bytes(b"a")
    (out / "_work").mkdir()
    (out / "_work" / "scratch").write_bytes(b"w")
    assert read_manifest(str(out)) is None
    with pytest.raises(ConfigError, match="no committed result"):
        committed_files(str(out))
    manifest = pub.commit({"num_ok": 1}, exclude=("_work",))
    assert manifest["files"] == ["data/a.bin"] and manifest["record"] == {"num_ok": 1}
    assert json.loads((out / SUCCESS).read_text())["attempt"] == pub.attempt
    assert not (out / ATTEMPT).exists()
    assert committed_files(str(out)) == [f"{out}/data/a.bin"]
    assert committed_files(str(out), under="other") == []


def test_a_committed_result_is_refused_kept_or_withdrawn_first(tmp_path):
    out = tmp_path / "out"
    Publication(str(out), None, "infer").prepare()
    (out / "a.bin").write_bytes(b"a")
    Publication(str(out), None, "infer").commit({"n": 1})
    with pytest.raises(ConfigError, match="output: .* already holds a committed result"):
        Publication(str(out), None, "infer").prepare()
    kept = Publication(str(out), None, "infer", resume=True).prepare()
    assert kept is not None and kept["record"] == {"n": 1} and (out / "a.bin").exists()
    again = Publication(str(out), None, "infer", overwrite=True)
    assert again.prepare() is None
    assert folder_files(str(out)) == [ATTEMPT], "the old manifest and files are gone before any new file"


def test_leftovers_of_a_killed_run_are_cleared_and_a_foreign_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    Publication(str(out), None, "infer").prepare()
    (out / "half.bin").write_bytes(b"h")  # then the driver was killed: no manifest
    Publication(str(out), None, "infer").prepare()
    assert folder_files(str(out)) == [ATTEMPT]
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"j")
    with pytest.raises(ConfigError, match="not empty and not a segray output"):
        Publication(str(foreign), None, "infer").prepare()
    assert (foreign / "holiday.jpg").exists()


def test_resume_keeps_finished_part_files_and_drops_cut_off_ones(tmp_path):
    out = tmp_path / "out"
    rows = out / PREDICTIONS
    first = ParquetFolderSink(str(out), None, ["a", "b", "c", "d"])
    first.prepare()
    _part(rows, "part-1_000.parquet", ["a", "b"])
    _part(rows, "part-1_001.parquet", ["b"])  # a row already kept: its file goes (b runs once)
    (rows / "part-1_002.parquet").write_bytes(pq.ParquetFile.__name__.encode())  # cut off mid-write
    # driver killed here; nothing is committed
    with pytest.raises(ConfigError):
        committed_rows(str(out))
    resumed = ParquetFolderSink(str(out), None, ["a", "b", "c", "d"], resume=True)
    resumed.prepare()
    assert resumed.done == {"a", "b"}
    assert folder_files(str(rows)) == ["part-1_000.parquet"]
    _part(rows, f"part-{resumed.publication.attempt}_000.parquet", ["c", "d"])
    record = resumed.commit({"num_ok": 4, "error_reasons": [{"kind": "empty", "count": 1}]})
    assert record["num_ok"] == 4
    assert sorted(committed_rows(str(out), columns=["source_path"])["source_path"].to_pylist()) == list("abcd")
    assert sorted(committed_rows(str(rows))["source_path"].to_pylist()) == list("abcd")
    assert pq.read_table(out / SUMMARY).to_pylist()[0]["error_reasons"] == [{"kind": "empty", "count": 1}]


def test_a_run_with_a_missing_or_duplicated_row_is_not_committed(tmp_path):
    out = tmp_path / "out"
    sink = ParquetFolderSink(str(out), None, ["a", "b"])
    sink.prepare()
    _part(out / PREDICTIONS, "part-x_000.parquet", ["a"])
    with pytest.raises(RuntimeError, match="not committing"):
        sink.commit({})
    assert read_manifest(str(out)) is None


def test_a_checkpoint_cut_off_mid_write_is_refused_with_a_reason():
    import io

    from segray.config import ModelConfig
    from segray.core.checkpoint import Checkpoint
    from segray.core.models import build_model

    cfg = ModelConfig(num_classes=3, depth=1, base_width=4)
    buf = io.BytesIO()
    Checkpoint.of(build_model(cfg), cfg.model_dump(mode="json"), ["a", "b", "c"], None).save(buf)
    data = buf.getvalue()
    assert Checkpoint.load(data).num_classes == 3
    for cut in (len(data) // 2, len(data) - 10, 0):
        with pytest.raises(ValueError, match="not a complete checkpoint file"):
            Checkpoint.load(data[:cut])
