"""Jobs on a real 2-node Ray cluster (cluster/local/start.sh via LocalCluster), submitted with
`segray submit` (the console script, through the Ray Jobs API) and reading/writing a real
S3-compatible server: training -> checkpoint, inference -> Parquet, a failing job's exit code
and reason, then the nightly job twice over a growing archive (only the new images, exact row
counts) and a resubmission that attaches instead of duplicating. The cluster is torn down
even when the test fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from segray.core.checkpoint import load_payload
from segray.demo.scenes import DEMO_CLASSES, write_demo_dataset
from segray.infer.nightly import committed_runs, read_committed
from segray.io.fs import get_fs, pyarrow_fs
from segray.testing.cluster import LocalCluster

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
SEGRAY = str(Path(sys.executable).parent / "segray")


@pytest.fixture
def cluster(monkeypatch):
    # (start.sh puts this interpreter first on the nodes' PATH, so the jobs' `python` is it.)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with LocalCluster(num_workers=1, cpus_per_node=1) as c:  # stopped on any exit
        yield c


def submit(cluster, s3, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **s3.env(), "RAY_AUTH_MODE": cluster.auth_mode or "disabled", "COLUMNS": "200"}
    t0 = time.monotonic()
    proc = subprocess.run([SEGRAY, *args, "--address", cluster.dashboard_url], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    print(f"\n$ segray {' '.join(args[:3])} -> rc={proc.returncode} in {time.monotonic() - t0:.0f}s\n"
          f"  ...{proc.stdout[-400:]}")
    return proc


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_submit_train_infer_and_nightly_on_a_two_node_cluster(tmp_path, s3, s3_bucket, cluster):
    from ray.job_submission import JobSubmissionClient

    bucket = f"s3://{s3_bucket}"
    fs, _ = get_fs(bucket, s3.storage_options())
    data = write_demo_dataset(tmp_path / "data", num_images=8, size=64, seed=5)
    fs.put(data["images"], f"{s3_bucket}/scenes/images", recursive=True)
    fs.put(data["masks"], f"{s3_bucket}/scenes/masks", recursive=True)

    # ---- training: a checkpoint on S3. Credentials reach the job only via --env-from-local.
    train_cfg = write_yaml(tmp_path / "train.yaml", {
        "data": {"source": {"images": f"{bucket}/scenes/images", "masks": f"{bucket}/scenes/masks"},
                 "class_names": DEMO_CLASSES, "val_fraction": 0.25},
        "model": {"num_classes": 5, "depth": 2, "base_width": 8},
        "train": {"epochs": 1, "batch_size": 2, "num_workers": 2, "cpus_per_worker": 0.5, "patience": None,
                  "storage_path": f"{bucket}/runs", "name": "cluster-run"}})
    proc = submit(cluster, s3, "submit", "train", train_cfg, "--env-from-local")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "SUCCEEDED" in proc.stdout and "training summary" in proc.stdout  # the job's logs were tailed
    ckpts = [p for p in fs.find(f"{s3_bucket}/runs/cluster-run") if p.endswith("/checkpoint.pt")]
    assert ckpts, "no checkpoint written"
    payload = load_payload(fs.cat_file(ckpts[0]))
    assert payload["class_names"] == DEMO_CLASSES and payload["model_config"]["depth"] == 2
    checkpoint = "s3://" + ckpts[0].rsplit("/", 1)[0]

    # ---- inference: Parquet on S3, one row per image.
    infer_cfg = write_yaml(tmp_path / "infer.yaml", {
        "source": {"images": f"{bucket}/scenes/images", "masks": f"{bucket}/scenes/masks"},
        "checkpoint": checkpoint, "output": f"{bucket}/pred", "batch_size": 4, "num_actors": 1})
    proc = submit(cluster, s3, "submit", "infer", infer_cfg, "--env-from-local")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    pafs, path = pyarrow_fs(f"{bucket}/pred/predictions", s3.storage_options())
    table = pads.dataset(path, filesystem=pafs, format="parquet").to_table(columns=["source_path", "status"])
    assert table.num_rows == 8 and set(table["status"].to_pylist()) == {"ok"}
    assert len(set(table["source_path"].to_pylist())) == 8

    # ---- a job that fails exits 1 and says why.
    proc = submit(cluster, s3, "submit", "infer", infer_cfg, "--env-from-local",
                  "--set", f"checkpoint={bucket}/no-such-run", "--set", f"output={bucket}/pred2")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the job fails on one line naming the field and the path (fail fast), not with a traceback
    assert "FAILED" in proc.stderr and "error: checkpoint:" in proc.stderr and "not found" in proc.stderr, \
        proc.stderr[-3000:]

    # ---- nightly, twice, over a growing archive.
    def night(run_date: str) -> str:
        return write_yaml(tmp_path / f"nightly-{run_date}.yaml", {
            "source": {"images": f"{bucket}/archive"}, "checkpoint": checkpoint, "output": f"{bucket}/nightly",
            "run_date": run_date, "batch_size": 4, "num_actors": 1})

    images = sorted(Path(data["images"]).glob("*.png"))
    for p in images[:5]:
        fs.put_file(str(p), f"{s3_bucket}/archive/{p.name}")
    proc = submit(cluster, s3, "submit", "nightly", night("2025-03-01"), "--env-from-local")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for p in images[5:]:
        fs.put_file(str(p), f"{s3_bucket}/archive/{p.name}")
    proc = submit(cluster, s3, "submit", "nightly", night("2025-03-02"), "--env-from-local")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    commits = committed_runs(f"{bucket}/nightly", s3.storage_options())
    assert [(c.run_date, c.record["num_inputs"]) for c in commits] == [("2025-03-01", 5), ("2025-03-02", 3)]
    rows = read_committed(f"{bucket}/nightly", s3.storage_options(), columns=["source_path", "status"])
    paths = rows["source_path"].to_pylist()
    assert len(paths) == len(set(paths)) == 8 and set(rows["status"].to_pylist()) == {"ok"}

    # ---- the same submission again attaches to the job that exists: no duplicate job, no new rows.
    client = JobSubmissionClient(cluster.dashboard_url)
    before = [j.submission_id for j in client.list_jobs() if j.submission_id]
    proc = submit(cluster, s3, "submit", "nightly", night("2025-03-02"), "--env-from-local")
    assert proc.returncode == 0 and "already submitted" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = [j.submission_id for j in client.list_jobs() if j.submission_id]
    # train, infer, the failed infer, two nights: five jobs, each id once
    assert sorted(after) == sorted(before) and len(set(after)) == len(after) == 5
    assert read_committed(f"{bucket}/nightly", s3.storage_options(), columns=["source_path"]).num_rows == 8

    proc = submit(cluster, s3, "jobs", "list")
    assert proc.returncode == 0 and all(sid in proc.stdout for sid in after), proc.stdout
    assert proc.stdout.count("FAILED") == 1 and proc.stdout.count("SUCCEEDED") == 4, proc.stdout
