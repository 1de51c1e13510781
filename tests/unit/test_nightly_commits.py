"""The nightly commit protocol on a local disk, without Ray: what counts as committed, what is
new, and what readers see. (The full runs, on Ray and S3, are in tests/integration/test_nightly.py.)"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from segray.config import ModelConfig, NightlyJobConfig, build_config
from segray.core.checkpoint import FILENAME, make_payload
from segray.core.models import build_model
from segray.infer.nightly import (
    FORMAT,
    INPUTS_SCHEMA,
    SUCCESS,
    committed_runs,
    plan,
    read_committed,
    run_nightly,
)
from segray.infer.steps import OUTPUT_SCHEMA
from segray.io.sources import list_archive


def _rows(paths: list[str]) -> pa.Table:
    cols = {f.name: [None] * len(paths) for f in OUTPUT_SCHEMA}
    cols.update(source_path=paths, image_id=[Path(p).stem for p in paths], status=["ok"] * len(paths))
    return pa.table(cols, schema=OUTPUT_SCHEMA)


def _night(out: Path, night: str, entries: list[tuple[str, int, str]], commit: bool = True, attempt: str = "a1"):
    part = out / f"run_date={night}"
    part.mkdir(parents=True, exist_ok=True)
    paths = [e[0] for e in entries]
    pq.write_table(_rows(paths), part / f"part-{attempt}_0.parquet")
    pq.write_table(pa.table({"source_path": paths, "image_id": [Path(p).stem for p in paths],
                             "size": [e[1] for e in entries], "version": [e[2] for e in entries]},
                            schema=INPUTS_SCHEMA), part / f"_inputs-{attempt}.parquet")
    if commit:
        (part / SUCCESS).write_text(json.dumps({
            "format": FORMAT, "run_date": night, "attempt": attempt, "files": [f"part-{attempt}_0.parquet"],
            "inputs_file": f"_inputs-{attempt}.parquet", "num_inputs": len(paths), "num_ok": len(paths),
            "num_error": 0, "committed_at": "x"}))


def test_readers_see_committed_nights_only_latest_row_per_image(tmp_path):
    out = tmp_path / "out"
    _night(out, "2025-01-01", [("/a/x.png", 1, "v1"), ("/a/y.png", 1, "v1")])
    _night(out, "2025-01-02", [("/a/x.png", 2, "v2"), ("/a/z.png", 1, "v1")])  # x changed
    _night(out, "2025-01-03", [("/a/w.png", 1, "v1"), ("/a/y.png", 1, "v1")], commit=False)  # killed driver
    (out / "run_date=2025-01-04").mkdir()
    (out / "run_date=2025-01-04" / SUCCESS).write_text("{not json")  # a torn record is no commit
    # A stray file in a committed night that its record does not list (a zombie's late write).
    pq.write_table(_rows(["/a/y.png"]), out / "run_date=2025-01-02" / "part-old_0.parquet")

    assert [c.run_date for c in committed_runs(str(out))] == ["2025-01-01", "2025-01-02"]
    latest = read_committed(str(out), columns=["source_path", "status"])
    got = dict(zip(latest["source_path"].to_pylist(), latest["run_date"].to_pylist()))
    assert got == {"/a/x.png": "2025-01-02", "/a/y.png": "2025-01-01", "/a/z.png": "2025-01-02"}
    assert latest.column_names == ["source_path", "status", "run_date"]
    history = read_committed(str(out), columns=["image_id"], latest_only=False)
    assert history.num_rows == 4 and history.column_names == ["image_id", "run_date"]
    empty = read_committed(str(tmp_path / "nothing-yet"))
    assert empty.num_rows == 0 and "mask_png" in empty.column_names and "run_date" in empty.column_names


def _checkpoint(path: Path) -> str:
    cfg = ModelConfig(num_classes=2, depth=1, base_width=4)
    buf = io.BytesIO()
    torch.save(make_payload(build_model(cfg), cfg.model_dump(mode="json"), ["bg", "fg"], None), buf)
    path.mkdir(parents=True)
    (path / FILENAME).write_bytes(buf.getvalue())
    return str(path)


def test_plan_skips_what_committed_nights_hold_by_path_size_and_version(tmp_path):
    archive = tmp_path / "archive"
    (archive / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png"):
        (archive / name).write_bytes(b"png?" * 3)
    entries = {e.image_id: e for e in list_archive(build_config(NightlyJobConfig, {
        "source": {"images": str(archive)}, "checkpoint": "c", "output": "o"}).source)}
    assert set(entries) == {"a", "b", "sub/c"} and entries["a"].size == 12 and entries["a"].version

    out = tmp_path / "out"
    _night(out, "2025-01-01", [entries["a"].key, entries["b"].key])
    cfg = build_config(NightlyJobConfig, {"source": {"images": str(archive)}, "checkpoint": _checkpoint(tmp_path / "ck"),
                                          "output": str(out), "run_date": "2025-01-02"})
    assert [e.image_id for e in plan(cfg)["todo"]] == ["sub/c"]

    (archive / "b.png").write_bytes(b"changed, longer")  # same path, new size and mtime
    os.utime(archive / "b.png", (1e9, 1e9))
    p = plan(cfg)
    assert sorted(e.image_id for e in p["todo"]) == ["b", "sub/c"] and p["num_done_before"] == 1
    # Rebuilding night 1 itself recomputes its own images (other nights hold none of them).
    p1 = plan(cfg.model_copy(update={"run_date": cfg.run_date.replace(day=1), "rebuild": True}))
    assert sorted(e.image_id for e in p1["todo"]) == ["a", "b", "sub/c"]


def test_a_night_with_nothing_new_commits_an_empty_partition_without_ray(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "a.png").write_bytes(b"x")
    out = tmp_path / "out"
    cfg = build_config(NightlyJobConfig, {"source": {"images": str(archive)}, "checkpoint": _checkpoint(tmp_path / "ck"),
                                          "output": str(out), "run_date": "2025-01-02"})
    _night(out, "2025-01-01", [list_archive(cfg.source)[0].key])
    _night(out, "2025-01-02", [("/old/leftover.png", 1, "v")], commit=False, attempt="dead")  # a killed try

    s = run_nightly(cfg, init_ray=False)
    assert (s["status"], s["processed"], s["files"], s["done_before"]) == ("committed", 0, 0, 1)
    part = out / "run_date=2025-01-02"
    record = json.loads((part / SUCCESS).read_text())
    assert record["files"] == [] and record["num_inputs"] == 0 and record["run_date"] == "2025-01-02"
    assert sorted(os.listdir(part)) == sorted([SUCCESS, record["inputs_file"]]), "leftovers removed"
    assert read_committed(str(out), columns=["source_path"]).num_rows == 1
    again = run_nightly(cfg, init_ray=False)
    assert again["status"] == "already committed" and json.loads((part / SUCCESS).read_text()) == record


def test_the_nightly_diff_is_an_anti_join_in_listing_order():
    import pyarrow as pa

    from segray.infer.sinks import INPUTS_SCHEMA
    from segray.io.fs import Sample
    from segray.io.listing import Archive, ArchiveEntry

    entries = Archive.of([ArchiveEntry(Sample(f"s3://b/{name}.tif", None, name), size, version)
               for name, size, version in [("z", 1, "e1"), ("a", 2, "e2"), ("m", 3, ""), ("b", 4, "e4"), ("c", 5, "e5")]])

    def night(*rows):
        return pa.table({k: [r[i] for r in rows] for i, k in enumerate(INPUTS_SCHEMA.names)}, schema=INPUTS_SCHEMA)

    done = [night(("s3://b/z.tif", "z", 1, "e1"), ("s3://b/m.tif", "m", 3, None)),  # no version: the empty one
            night(("s3://b/b.tif", "b", 4, "old-etag"), ("s3://b/c.tif", "c", 99, "e5"))]  # changed since
    assert [e.image_id for e in entries.not_in(done)] == ["a", "b", "c"]
    assert list(entries.not_in([])) == list(entries) and not len(Archive.of([]).not_in(done))
