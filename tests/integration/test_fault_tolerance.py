"""A Ray Train worker process killed mid-run: training resumes from the latest checkpoint."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from segray.config import TrainJobConfig, build_config
from segray.core.checkpoint import FILENAME
from segray.core.demo import DEMO_CLASSES, write_demo_dataset
from segray.train.trainer import run_training

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def _train_workers() -> list[psutil.Process]:
    """This session's Ray Train workers: the local Ray (raylet and workers) runs under this process."""
    procs = []
    for p in psutil.Process().children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::RayTrainWorker"):
                procs.append(p)
        except psutil.NoSuchProcess:
            continue
    return procs


def test_lost_worker_resumes_from_latest_checkpoint(tmp_path, ray_local):
    import conftest

    conftest._start_local_ray()  # an earlier cluster test may have shut the session's Ray down
    data = write_demo_dataset(tmp_path / "data", num_images=12, size=48, seed=5)
    job = build_config(TrainJobConfig, {
        "data": {"source": {"images": data["images"], "masks": data["masks"]},
                 "class_names": DEMO_CLASSES, "val_fraction": 0.25},
        "model": {"num_classes": 5, "depth": 2, "base_width": 8},
        "train": {"epochs": 6, "batch_size": 2, "num_workers": 2, "patience": None, "max_failures": 2,
                  "storage_path": str(tmp_path / "runs"), "name": "ft"},
    })
    box: dict = {}
    runner = threading.Thread(target=lambda: box.update(result=run_training(job)), daemon=True)
    runner.start()

    # Wait for the first checkpoint to be persisted, then kill one worker process outright.
    run_dir = tmp_path / "runs" / "ft"
    deadline = time.time() + 600
    # Two persisted checkpoints: the first is then surely registered with Ray Train's controller.
    while time.time() < deadline and len(list(run_dir.glob(f"checkpoint_*/{FILENAME}"))) < 2:
        time.sleep(0.2)
    assert len(list(run_dir.glob(f"checkpoint_*/{FILENAME}"))) >= 2, "no checkpoints were written"
    victims = _train_workers()
    assert victims, "no RayTrainWorker process found"
    os.kill(victims[0].pid, signal.SIGKILL)

    runner.join(timeout=600)
    assert "result" in box, "training did not finish after the worker was killed"
    history = box["result"].history
    assert [h["epoch"] for h in history] == list(range(1, 7))  # no epoch lost or repeated
    resumed = [h["resumed_from_epoch"] for h in history if "resumed_from_epoch" in h]
    assert resumed and resumed[0] >= 1  # restarted from a checkpoint, not from scratch
