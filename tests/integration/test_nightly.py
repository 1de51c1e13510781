"""Nightly incremental runs on a real local Ray and a real S3-compatible server (SeaweedFS).

Archive and output both on s3://. Night 1 over N images; M images arrive and one changes;
night 2 processes exactly those; rerunning a night never duplicates; a driver killed
(SIGKILL) in the middle of a night leaves nothing readers trust, and the rerun leaves exactly
one row per image.
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
import torch
from PIL import Image

from segray.config import ModelConfig, NightlyJobConfig, build_config
from segray.core.checkpoint import FILENAME, make_payload
from segray.core.models import build_model
from segray.demo.scenes import make_scene
from segray.infer.nightly import SUCCESS, committed_runs, partition_url, read_committed, run_nightly
from segray.io.fs import get_fs, join, write_bytes

from scenes_util import write_unet_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
COLS = ["source_path", "image_id", "status"]


def png(i: int, size: int = 64) -> bytes:
    img, _ = make_scene(size, np.random.default_rng([7, i]))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def put_images(archive: str, storage, ids: range, size: int = 64, content_of=None) -> list[str]:
    urls = []
    for i in ids:
        url = join(archive, f"site_{i % 3}", f"scene_{i:04d}.png")  # nested: listing is recursive
        write_bytes(url, png(content_of if content_of is not None else i, size), storage)
        urls.append(url)
    return urls


def nightly_config(bucket: str, storage, night: str, **kw) -> NightlyJobConfig:
    return build_config(NightlyJobConfig, {
        "source": {"images": f"s3://{bucket}/archive"},
        "checkpoint": f"s3://{bucket}/ckpt",
        "output": f"s3://{bucket}/nightly",
        "run_date": night, "batch_size": 4, "num_actors": 1, "storage": storage.model_dump(), **kw})


def success_record(cfg: NightlyJobConfig) -> dict:
    fs, path = get_fs(join(partition_url(cfg.output, cfg.run_date), SUCCESS), cfg.storage)
    return json.loads(fs.cat_file(path))


def partition_files(cfg: NightlyJobConfig) -> list[str]:
    fs, path = get_fs(partition_url(cfg.output, cfg.run_date), cfg.storage)
    return sorted(n.rsplit("/", 1)[1] for n in fs.find(path) if not n.endswith("/")) if fs.exists(path) else []


def test_nights_process_only_new_or_changed_images_exactly_once(s3, s3_bucket, ray_up):
    storage = s3.storage_options()
    archive = f"s3://{s3_bucket}/archive"
    write_unet_checkpoint(f"s3://{s3_bucket}/ckpt", storage)
    first = put_images(archive, storage, range(6))

    # Night 1: everything is new.
    n1 = nightly_config(s3_bucket, storage, "2025-01-01")
    t0 = time.monotonic()
    s1 = run_nightly(n1)
    print(f"\nnight 1: {time.monotonic() - t0:.1f}s")
    assert (s1["status"], s1["archive_size"], s1["done_before"], s1["processed"]) == ("committed", 6, 0, 6)
    rec1 = success_record(n1)
    assert rec1["num_inputs"] == rec1["num_rows"] == rec1["num_ok"] == 6 and rec1["files"]
    assert all(f.startswith(f"part-{rec1['attempt']}_") for f in rec1["files"])
    table = read_committed(n1.output, storage, columns=COLS)
    assert sorted(table["source_path"].to_pylist()) == sorted(first)
    assert set(table["run_date"].to_pylist()) == {"2025-01-01"} and set(table["status"].to_pylist()) == {"ok"}

    # Three images arrive, one changes (same path, new content): night 2 does exactly those 4.
    new = put_images(archive, storage, range(6, 9))
    changed = put_images(archive, storage, range(0, 1), content_of=99)[0]
    n2 = nightly_config(s3_bucket, storage, "2025-01-02")
    t0 = time.monotonic()
    s2 = run_nightly(n2)
    print(f"night 2: {time.monotonic() - t0:.1f}s")
    assert (s2["status"], s2["archive_size"], s2["done_before"], s2["processed"]) == ("committed", 9, 5, 4)
    assert [c.run_date for c in committed_runs(n2.output, storage)] == ["2025-01-01", "2025-01-02"]
    latest = read_committed(n2.output, storage, columns=COLS)
    paths = latest["source_path"].to_pylist()
    assert len(paths) == len(set(paths)) == 9 and set(paths) == set(first) | set(new)
    by_path = dict(zip(paths, latest["run_date"].to_pylist()))
    assert by_path[changed] == "2025-01-02" and by_path[first[1]] == "2025-01-01"
    assert {by_path[u] for u in new} == {"2025-01-02"}
    history = read_committed(n2.output, storage, columns=COLS, latest_only=False)
    assert history.num_rows == 10  # the changed image's older row stays as history

    # Rerunning a committed night is a no-op: same commit, same files, same rows.
    rec2 = success_record(n2)
    files2 = partition_files(n2)
    again = run_nightly(n2)
    assert again["status"] == "already committed" and again["processed"] == 4
    assert success_record(n2) == rec2 and partition_files(n2) == files2
    assert read_committed(n2.output, storage, columns=COLS).num_rows == 9

    # rebuild: true recomputes the night over the images no other night holds: the same 4.
    rebuilt = run_nightly(n2.model_copy(update={"rebuild": True}))
    rec2b = success_record(n2)
    assert rebuilt["status"] == "committed" and rebuilt["processed"] == 4 and rec2b["attempt"] != rec2["attempt"]
    assert not set(rec2["files"]) & set(partition_files(n2)), "the old attempt's files are gone"
    latest = read_committed(n2.output, storage, columns=COLS)
    assert latest.num_rows == 9 and len(set(latest["source_path"].to_pylist())) == 9

    # A night with nothing new commits an empty partition.
    s3n = run_nightly(nightly_config(s3_bucket, storage, "2025-01-03"))
    assert (s3n["status"], s3n["processed"], s3n["files"]) == ("committed", 0, 0)
    assert read_committed(n2.output, storage, columns=COLS).num_rows == 9


def _gcs_address(ray) -> str:
    return ray.get_runtime_context().gcs_address


def test_killed_driver_then_rerun_leaves_exactly_one_row_per_image(tmp_path, s3, s3_bucket, ray_up):
    storage = s3.storage_options()
    archive = f"s3://{s3_bucket}/archive"
    write_unet_checkpoint(f"s3://{s3_bucket}/ckpt", storage)
    first = put_images(archive, storage, range(4))
    run_nightly(nightly_config(s3_bucket, storage, "2025-02-01"))
    more = put_images(archive, storage, range(4, 44), size=96)

    # Night 2 in a separate driver process (the job entrypoint), killed once the partition
    # holds data files but before it is committed.
    n2 = nightly_config(s3_bucket, storage, "2025-02-02", batch_size=2)
    config = tmp_path / "nightly.yaml"
    config.write_text(json.dumps(n2.model_dump(mode="json")))
    # The driver joins the test's Ray (RAY_ADDRESS), so killing it leaves no Ray behind. Its
    # tasks run in that Ray's workers, which do not inherit the driver's environment: the
    # storage options travel in the config (a submitted job gets them via runtime_env).
    env = {**os.environ, **s3.env(), "RAY_ADDRESS": _gcs_address(ray_up), "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen([sys.executable, "jobs/nightly.py", str(config)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    fs, part = get_fs(partition_url(n2.output, n2.run_date), storage)
    data_files: list[str] = []
    committed_before_kill = False
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            names = [n for n in fs.find(part)] if fs.exists(part) else []
            data_files = [n for n in names if n.rsplit("/", 1)[-1].startswith("part-")]
            committed_before_kill = any(n.endswith("/" + SUCCESS) for n in names)
            if data_files or committed_before_kill:
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
    out = (tmp_path / "driver.log").read_text(errors="replace")[-3000:]
    assert proc.returncode == -signal.SIGKILL, f"the driver ended by itself (rc={proc.returncode}):\n{out}"
    assert data_files, f"the driver wrote no data file before it ended (rc={proc.returncode}):\n{out}"
    assert not committed_before_kill and not fs.exists(f"{part}/{SUCCESS}"), "killed too late: already committed"
    print(f"\nkilled with {len(data_files)} data file(s) of night 2 written, no {SUCCESS}")

    # Readers trust committed nights only: the killed night's files are invisible.
    table = read_committed(n2.output, storage, columns=COLS)
    assert sorted(table["source_path"].to_pylist()) == sorted(first)
    assert [c.run_date for c in committed_runs(n2.output, storage)] == ["2025-02-01"]

    # The rerun discards the leftovers and does the night: exactly one row per image.
    s2 = run_nightly(n2)
    assert (s2["status"], s2["done_before"], s2["processed"]) == ("committed", 4, 40)
    rec = success_record(n2)
    killed_files = {n.rsplit("/", 1)[-1] for n in data_files}
    assert not killed_files & set(rec["files"]) and all(f.startswith(f"part-{rec['attempt']}_") for f in rec["files"])
    table = read_committed(n2.output, storage, columns=COLS)
    paths = table["source_path"].to_pylist()
    assert len(paths) == len(set(paths)) == 44 and set(paths) == set(first) | set(more)
    assert table["run_date"].to_pylist().count("2025-02-02") == 40
    history = read_committed(n2.output, storage, columns=COLS, latest_only=False)
    assert history.num_rows == 44, "no image in two committed nights"


def test_nights_of_an_instance_checkpoint_commit_instance_rows(tmp_path, ray_up):
    """Nightly runs take any family: a Mask R-CNN checkpoint commits rows of its own schema, the
    next night processes only what is new, and another family's checkpoint cannot join the output."""
    from segray.config import ConfigError
    from segray.infer.instance import INSTANCE_SCHEMA

    archive, out = tmp_path / "archive", tmp_path / "nightly"
    for i in range(3):
        write_bytes(str(archive / f"img_{i}.png"), png(i))
    cfg = ModelConfig(name="maskrcnn_resnet50_fpn", num_classes=2, trainable_backbone_layers=0, min_size=64,
                      max_size=64, rpn_proposals_test=20, anchor_sizes=[8, 16, 32, 64, 128])
    torch.manual_seed(0)
    payload = make_payload(build_model(cfg).eval(), cfg.model_dump(mode="json"), ["background", "object"], None,
                           task="instance")
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes(str(tmp_path / "mrcnn" / FILENAME), buf.getvalue())

    def night(date: str, checkpoint: str) -> NightlyJobConfig:
        return build_config(NightlyJobConfig, {"source": {"images": str(archive)}, "checkpoint": checkpoint,
                                               "output": str(out), "run_date": date, "batch_size": 2,
                                               "num_actors": 1, "cpus_per_actor": 0.5, "score_threshold": 0.0,
                                               "max_detections": 5})

    s1 = run_nightly(night("2025-03-01", str(tmp_path / "mrcnn")))
    assert (s1["status"], s1["processed"], s1["num_ok"]) == ("committed", 3, 3)
    rec = json.loads((out / "run_date=2025-03-01" / SUCCESS).read_text())
    assert rec["task"] == "instance" and rec["model_name"] == "maskrcnn_resnet50_fpn"
    rows = read_committed(str(out))
    assert rows.schema.names == INSTANCE_SCHEMA.names + ["run_date"]
    assert rows.num_rows == 3 and set(rows["status"].to_pylist()) == {"ok"}
    limits = night("2025-03-01", "c").infer_config("o")
    assert (limits.score_threshold, limits.max_detections) == (0.0, 5), "a night's instance limits reach its run"

    write_bytes(str(archive / "img_3.png"), png(3))
    s2 = run_nightly(night("2025-03-02", str(tmp_path / "mrcnn")))
    assert (s2["processed"], s2["done_before"]) == (1, 3)
    assert read_committed(str(out), columns=["image_id", "num_instances"]).num_rows == 4

    semantic = write_unet_checkpoint(str(tmp_path / "unet"), None)
    with pytest.raises(ConfigError, match="holds 'instance' rows"):
        run_nightly(night("2025-03-03", semantic))
    assert not (out / "run_date=2025-03-03").exists(), "refused before anything was written"
