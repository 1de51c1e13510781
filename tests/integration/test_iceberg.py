"""Rows into an Apache Iceberg table, on a real local Ray, a real PyIceberg SQL catalog (a SQLite
file) and the warehouse on a local disk or on a real S3-compatible server (SeaweedFS).

Nights: night 1, then night 2 in a separate driver SIGKILLed mid-write (no snapshot, rows
unchanged), its rerun (exactly one row per image), a rerun of a committed night (no-op), a
changed image (its row replaced). Read back through PyIceberg; one snapshot per committed night,
whose summary carries the run_date. Then ``segray infer`` with ``table:``, run twice: one row per
image (upsert).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segray.config import InferJobConfig, NightlyJobConfig, build_config
from segray.demo.scenes import make_scene
from segray.infer.iceberg import lineage, open_table, props_of
from segray.infer.night_tables import table_nights
from segray.infer.nightly import run_nightly
from segray.infer.pipeline import run_inference
from segray.io.fs import get_fs, join, write_bytes

from scenes_util import write_unet_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]


def put_images(archive: str, storage, ids: range, size: int = 64, content_of=None) -> list[str]:
    urls = []
    for i in ids:
        img, _ = make_scene(size, np.random.default_rng([7, content_of if content_of is not None else i]))
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        url = join(archive, f"site_{i % 3}", f"scene_{i:04d}.png")
        write_bytes(url, buf.getvalue(), storage)
        urls.append(url)
    return urls


def table_section(tmp_path: Path, warehouse: str, identifier: str = "segray.nights") -> dict:
    return {"identifier": identifier, "catalog": {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog/segray.db",
                                                  "warehouse": warehouse}}


def rows_of(cfg) -> "dict[str, dict]":
    t = open_table(cfg.table, cfg.storage).scan(
        selected_fields=("source_path", "run_date", "status", "source_version")).to_arrow().to_pylist()
    paths = [r["source_path"] for r in t]
    assert len(paths) == len(set(paths)), "one row per image"
    return {r["source_path"]: r for r in t}


def data_files(table, storage) -> list[str]:
    fs, path = get_fs(join(table.location(), "data"), storage)
    return sorted(fs.find(path)) if fs.exists(path) else []


def kill_mid_write(tmp_path: Path, cfg: NightlyJobConfig, env: dict, table) -> int:
    """Runs ``cfg`` in a separate driver (the job entrypoint) and SIGKILLs it once the night has
    written data files, before its snapshot; returns how many new data files it left."""
    config = tmp_path / "night.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    before = set(data_files(table, cfg.storage))
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen([sys.executable, "jobs/nightly.py", str(config)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    new: set[str] = set()
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            new = set(data_files(table, cfg.storage)) - before
            if new:
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
    out = (tmp_path / "driver.log").read_text(errors="replace")[-3000:]
    assert proc.returncode == -signal.SIGKILL, f"the driver ended by itself (rc={proc.returncode}):\n{out}"
    assert new, f"the driver wrote no data file before it ended:\n{out}"
    return len(new)


# On S3 (a local warehouse is test_infer_job_into_a_table_rerun_upserts'): a minute a run in CI.
@pytest.mark.parametrize("where", ["s3"])
def test_nights_into_an_iceberg_table_exactly_one_row_per_image_across_a_killed_driver(tmp_path, ray_up, where,
                                                                                      request):
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        bucket = request.getfixturevalue("s3_bucket")
        storage = s3.storage_options()
        root, warehouse, env = f"s3://{bucket}", f"s3://{bucket}/warehouse", s3.env()
    else:
        storage, root, warehouse, env = None, str(tmp_path / "data"), str(tmp_path / "warehouse"), {}
    archive = join(root, "archive")
    write_unet_checkpoint(join(root, "ckpt"), storage)

    def night(date: str, **kw) -> NightlyJobConfig:
        return build_config(NightlyJobConfig, {
            "source": {"images": archive}, "checkpoint": join(root, "ckpt"), "output": join(root, "unused"),
            "run_date": date, "batch_size": 4, "num_actors": 1, "table": table_section(tmp_path, warehouse),
            "storage": storage.model_dump() if storage else {}, **kw})

    # Night 1: everything is new; the table is created.
    first = put_images(archive, storage, range(4))
    n1 = night("2025-04-01")
    s1 = run_nightly(n1)
    assert (s1["status"], s1["processed"], s1["num_ok"], s1["done_before"]) == ("committed", 4, 4, 0)
    table = open_table(n1.table, n1.storage)
    assert table.location().startswith("s3://" if where == "s3" else "file://")
    assert set(rows_of(n1)) == set(first)

    # Night 2, killed mid-write: data files on storage, but no snapshot: the table is as it was.
    more = put_images(archive, storage, range(4, 44), size=96)
    n2 = night("2025-04-02", batch_size=2)
    ray_env = {**os.environ, **env, "RAY_ADDRESS": ray_up.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    left = kill_mid_write(tmp_path, n2, ray_env, table)
    print(f"\n[{where}] killed with {left} data file(s) of night 2 written, no snapshot")
    table = open_table(n2.table, n2.storage)
    assert [n.run_date for n in table_nights(table)] == ["2025-04-01"], "no snapshot of the killed night"
    assert set(rows_of(n2)) == set(first)

    # The rerun upserts: exactly one row per image, the night's rows carry its run_date.
    s2 = run_nightly(n2)
    assert (s2["status"], s2["processed"], s2["done_before"], s2["num_ok"]) == ("committed", 40, 4, 40)
    rows = rows_of(n2)
    assert set(rows) == set(first) | set(more) and len(rows) == 44
    assert sorted(str(r["run_date"]) for r in rows.values()).count("2025-04-02") == 40

    # A committed night is final: the rerun changes nothing.
    again = run_nightly(n2)
    assert again["status"] == "already committed" and again["snapshot_id"] == s2["snapshot_id"]

    # An image changes: night 3 replaces its row; the older row stays in night 2's snapshot.
    changed = put_images(archive, storage, range(5, 6), size=96, content_of=99)[0]
    s3n = run_nightly(night("2025-04-03"))
    assert (s3n["processed"], s3n["done_before"]) == (1, 43)
    rows = rows_of(n2)
    assert len(rows) == 44 and str(rows[changed]["run_date"]) == "2025-04-03"
    old = open_table(n2.table, n2.storage).scan(snapshot_id=s2["snapshot_id"], selected_fields=("source_path", "run_date")
                                                 ).to_arrow().to_pylist()
    assert {str(r["run_date"]) for r in old if r["source_path"] == changed} == {"2025-04-02"}

    # One snapshot per committed night, each carrying its night and the run in its summary.
    table = open_table(n2.table, n2.storage)
    snaps = lineage(table)
    assert [props_of(s)["run_date"] for s in snaps] == ["2025-04-01", "2025-04-02", "2025-04-03"]
    p2 = props_of(snaps[1])
    assert (p2["num_inputs"], p2["done_before"], p2["archive_size"], p2["job"]) == ("40", "4", "44", "nightly")
    assert p2["checkpoint_id"] and p2["attempt"] == s2["attempt"]
    assert snaps[1].summary.additional_properties["added-records"] == "40"
    assert {f.name for f in table.schema().fields} >= {"source_path", "mask_png", "run_date", "source_size",
                                                        "source_version"}


def test_infer_job_into_a_table_rerun_upserts(tmp_path, ray_up):
    images = tmp_path / "images"
    paths = put_images(str(images), None, range(5))
    ckpt = write_unet_checkpoint(str(tmp_path / "ckpt"), None)
    cfg = build_config(InferJobConfig, {"source": {"images": str(images)}, "checkpoint": ckpt,
                                        "output": str(tmp_path / "out"), "batch_size": 2, "num_actors": 1,
                                        "table": table_section(tmp_path, str(tmp_path / "warehouse"), "segray.infer")})
    first = run_inference(cfg)
    assert first["num_inputs"] == first["num_ok"] == 5 and first["table"] == "segray.infer"
    second = run_inference(cfg)  # the same images again: upserted, not appended
    assert second["num_ok"] == 5 and second["parent_snapshot_id"] == first["snapshot_id"]
    table = open_table(cfg.table)
    rows = table.scan(selected_fields=("source_path", "status", "mask_png")).to_arrow()
    assert sorted(rows["source_path"].to_pylist()) == sorted(paths), "one row per image"
    assert set(rows["status"].to_pylist()) == {"ok"} and all(m for m in rows["mask_png"].to_pylist())
    assert [props_of(s)["attempt"] for s in lineage(table)] == [first["attempt"], second["attempt"]]
