"""Complete or absent, with a killed driver: ``segray infer`` and ``segment-scenes`` on a real local
Ray, on local disk and on the S3-compatible server (SeaweedFS).

The driver runs in its own process (the job entrypoint, joined to the test's Ray) and is
SIGKILLed mid-run: nothing is committed and a reader finds nothing; ``resume: true`` then
finishes with exactly one row per input, reusing what the killed run finished. An
``overwrite: true`` rerun killed over a complete output leaves the old result or nothing,
never a mix.
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
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segray.config import ConfigError, InferJobConfig, SceneInferJobConfig, StorageOptions, build_config
from segray.demo.scenes import make_scene
from segray.infer.pipeline import run_inference
from segray.infer.scenes import run_scenes
from segray.infer.sinks import PREDICTIONS, committed_rows
from segray.io.commit import SUCCESS, committed_files, folder_files, read_manifest
from segray.io.fs import get_fs, join, pyarrow_fs, read_bytes, write_bytes
from segray.testing.raster import make_test_cog

from scenes_util import make_checkpoint, write_unet_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
# Each killed-run test on one kind of storage, the two kinds between them (CI time: each run is
# a minute); the commit protocol's own rules are unit-tested in tests/unit/test_commit.py.
S3_ONLY = [pytest.param("s3", marks=pytest.mark.s3)]
LOCAL_ONLY = ["local"]


@pytest.fixture
def place(request, tmp_path):
    """(root URL, storage options, extra env for a driver) on local disk or on SeaweedFS."""
    if request.param == "local":
        return str(tmp_path / "store"), StorageOptions(), {}
    s3 = request.getfixturevalue("s3")
    return f"s3://{request.getfixturevalue('s3_bucket')}", s3.storage_options(), s3.env()


def _png(i: int, size: int) -> bytes:
    img, _ = make_scene(size, np.random.default_rng([11, i]))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _finished_parts(rows_url: str, storage) -> list[str]:
    """Part files a reader could open (a Parquet file has its footer only once complete)."""
    done = []
    for name in folder_files(rows_url, storage):
        fs, path = pyarrow_fs(join(rows_url, name), storage)
        try:
            pq.read_metadata(path, filesystem=fs)
            done.append(name)
        except Exception:
            pass
    return done


def _run_killed(script: str, cfg, tmp_path: Path, env: dict, ray, ready: Callable[[], bool]) -> str:
    """Runs the job entrypoint in its own process group, SIGKILLs it once ``ready()``; returns its log."""
    config = tmp_path / f"job-{time.monotonic_ns()}.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    env = {**os.environ, **env, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / f"{config.stem}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, script, str(config)], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and proc.poll() is None and not ready():
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    out = log_path.read_text(errors="replace")[-3000:]
    assert proc.returncode == -signal.SIGKILL, f"the driver ended by itself (rc={proc.returncode}):\n{out}"
    return out


@pytest.mark.parametrize("place", S3_ONLY, indirect=True)
def test_killed_infer_commits_nothing_then_resume_and_overwrite_stay_whole(place, tmp_path, ray_up):
    root, storage, env = place
    images = [join(root, "images", f"img_{i:03d}.png") for i in range(40)]
    for i, url in enumerate(images):
        write_bytes(url, _png(i, 96), storage)
    out = join(root, "out")
    rows_url = join(out, PREDICTIONS)
    cfg = build_config(InferJobConfig, {"source": {"images": join(root, "images")},
                                        "checkpoint": write_unet_checkpoint(join(root, "ckpt"), storage), "output": out,
                                        "batch_size": 2, "num_actors": 1, "storage": storage.model_dump()})

    _run_killed("jobs/infer.py", cfg, tmp_path, env, ray_up, lambda: bool(_finished_parts(rows_url, storage)))
    assert read_manifest(out, storage) is None, "killed before the end, yet committed"
    with pytest.raises(ConfigError, match="no committed result"):
        committed_rows(out, storage)
    kept = _finished_parts(rows_url, storage)

    summary = run_inference(cfg.model_copy(update={"resume": True}))
    assert summary["num_resumed"] >= 1, "resume redid rows the killed run had finished"
    assert (summary["num_inputs"], summary["num_rows"]) == (40, 40)
    paths = committed_rows(out, storage, ["source_path"])["source_path"].to_pylist()
    assert len(paths) == len(set(paths)) == 40 and set(paths) == set(images)
    manifest = read_manifest(out, storage)
    assert set(kept) & {f.removeprefix(PREDICTIONS + "/") for f in manifest["files"]}, "finished files reused"
    assert set(folder_files(out, storage)) == set(manifest["files"]) | {SUCCESS}, "leftovers were cleared"

    # An overwrite rerun, killed once it has written rows: at every look, the old result or nothing.
    old_files = set(committed_files(out, storage))
    looks = []

    def old_or_nothing() -> bool:
        m = read_manifest(out, storage)
        looks.append(m is not None)
        if m is not None:
            # From the manifest just read: a second read could race the overwrite's withdrawal.
            assert m["attempt"] == manifest["attempt"] and {join(out, f) for f in m["files"]} == old_files
        return any(join(rows_url, n) not in old_files for n in _finished_parts(rows_url, storage))

    _run_killed("jobs/infer.py", cfg.model_copy(update={"overwrite": True}), tmp_path, env, ray_up, old_or_nothing)
    old_or_nothing()
    assert looks[-1] is False, "the overwrite withdraws the old result before writing new rows"
    again = run_inference(cfg.model_copy(update={"overwrite": True}))
    assert again["num_rows"] == 40 and again["num_resumed"] == 0
    assert len(committed_rows(out, storage, ["source_path"])) == 40


MEAN, STD = [1200.0, 1500.0, 1800.0, 2100.0], [900.0, 900.0, 900.0, 900.0]


@pytest.mark.parametrize("place", LOCAL_ONLY, indirect=True)
def test_killed_segment_scenes_commits_nothing_then_resume_finishes_each_scene_once(place, tmp_path, ray_up):
    root, storage, env = place
    local = tmp_path / "scenes"
    local.mkdir()
    names = [f"scene_{i}" for i in range(4)]
    for i, name in enumerate(names):
        make_test_cog(str(local / f"{name}.tif"), 320 + 16 * i, 384, 4, "uint16", blocksize=128)
    ckpt = tmp_path / "ckpt.pt"
    make_checkpoint(str(ckpt), 4, 3, MEAN, STD, depth=2, class_names=["a", "b", "c"])
    for p in [*local.iterdir(), ckpt]:
        rel = f"scenes/{p.name}" if p.parent == local else p.name
        write_bytes(join(root, rel), p.read_bytes(), storage)
    out = join(root, "out")
    cfg = build_config(SceneInferJobConfig, {
        "source": {"images": join(root, "scenes")}, "checkpoint": join(root, "ckpt.pt"), "output": out,
        "tile_size": 128, "overlap": 32, "margin": 8, "block_size": 128, "batch_size": 2, "num_actors": 1,
        "max_stitch_tasks": 1, "storage": storage.model_dump()})
    done_url = join(out, "_work", "done")

    _run_killed("jobs/segment_scenes.py", cfg, tmp_path, env, ray_up, lambda: bool(folder_files(done_url, storage)))
    assert read_manifest(out, storage) is None, "killed before the end, yet committed"
    with pytest.raises(ConfigError, match="no committed result"):
        committed_files(out, storage)

    summary = run_scenes(cfg.model_copy(update={"resume": True}))
    assert summary["num_resumed"] >= 1, "resume redid scenes the killed run had finished"
    assert (summary["num_scenes"], summary["num_ok"]) == (4, 4)
    manifest = read_manifest(out, storage)
    assert {f"masks/{n}.tif" for n in names} <= set(manifest["files"])
    assert not any(f.startswith("_work") for f in manifest["files"]) and not folder_files(join(out, "_work"), storage)
    fs, path = pyarrow_fs(join(out, "scenes.parquet"), storage)
    rows = pq.read_table(path, filesystem=fs).to_pylist()
    assert sorted(r["scene_id"] for r in rows) == names and all(r["status"] == "ok" for r in rows)
    for f in manifest["files"]:
        assert read_bytes(join(out, f), storage), f"{f} listed but empty"
    gfs, _ = get_fs(out, storage)
    assert all(gfs.exists(gfs._strip_protocol(u)) for u in committed_files(out, storage))
