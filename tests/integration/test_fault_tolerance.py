"""A Ray Train worker process killed mid-run: training resumes from the latest checkpoint."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest

from segray.config import TrainJobConfig, build_config
from segray.demo.scenes import DEMO_CLASSES, write_demo_dataset
from segray.train.trainer import run_training

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

EPOCHS = 6  # the kill comes after the first committed epoch: room to spare, and CI time


def _train_workers() -> list[psutil.Process]:
    """This session's Ray Train workers: the local Ray (raylet and workers) runs under this process."""
    procs = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.cmdline()[:1] == ["ray::RayTrainWorker"]:
                procs.append(p)
        except psutil.NoSuchProcess:
            continue
    return procs


def _committed_epochs(run_dir) -> list[int]:
    """Epochs of the checkpoints Ray Train's controller has committed (its persisted snapshot).

    A checkpoint folder on disk is not enough: the controller registers a report only when it next
    polls every worker (every 2 s), and only registered checkpoints are handed to a restarted group.
    """
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [r["metrics"]["epoch"] for r in snap.get("checkpoint_results", [])]


def _job(tmp_path):
    """A short semantic run. The resume path is the trainer's, the same for every model family
    (one family here: each run is over a minute of CI)."""
    train = {"epochs": EPOCHS, "batch_size": 2, "num_workers": 2, "patience": None, "max_failures": 2,
             "num_to_keep": 2, "storage_path": str(tmp_path / "runs"), "name": "ft"}
    data = write_demo_dataset(tmp_path / "data", num_images=48, size=64, seed=5)
    return build_config(TrainJobConfig, {
        "data": {"source": {"images": data["images"], "masks": data["masks"]},
                 "class_names": DEMO_CLASSES, "val_fraction": 0.25},
        "model": {"num_classes": 5, "depth": 2, "base_width": 8}, "train": train})


def test_lost_worker_resumes_from_latest_checkpoint(tmp_path, ray_local):
    import conftest

    conftest._start_local_ray()  # an earlier cluster test may have shut the session's Ray down
    job = _job(tmp_path)
    box: dict = {}

    def train():
        try:
            box["result"] = run_training(job)
        except BaseException as e:  # surfaced by the assertion below
            box["error"] = e

    runner = threading.Thread(target=train, daemon=True)
    runner.start()

    run_dir = tmp_path / "runs" / "ft"
    deadline = time.time() + 600
    while time.time() < deadline and not _committed_epochs(run_dir) and runner.is_alive():
        time.sleep(0.1)
    committed = _committed_epochs(run_dir)
    assert committed, f"no checkpoint was committed: {box.get('error')!r}"
    assert max(committed) < EPOCHS, "training ended before a worker could be killed"
    victims = _train_workers()
    assert victims, "no RayTrainWorker process found"
    os.kill(victims[0].pid, signal.SIGKILL)

    runner.join(timeout=600)
    assert "result" in box, f"training did not finish after the worker was killed: {box.get('error')!r}"
    history = box["result"].history
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))  # no epoch lost or repeated
    resumed = {h["resumed_from_epoch"] for h in history if "resumed_from_epoch" in h}
    # Restarted from a committed checkpoint, not from scratch: the restarted group reports
    # resumed_from_epoch on every epoch it ran, and it is one of the checkpoints Ray had committed.
    assert len(resumed) == 1 and resumed.pop() >= max(committed)
    assert all("resumed_from_epoch" in h for h in history if h["epoch"] > EPOCHS - 1)
