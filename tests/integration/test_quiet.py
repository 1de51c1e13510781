"""Quiet terminals: without a TTY (CI, `ray job submit`, cron) a `segray infer` run prints its
progress line(s), where Ray's logs went, and the summary table; Ray's own output (Ray Data's
INFO blocks and progress, worker output) is in that log file. ``--verbose`` brings it back.
Real Ray (a local one per run, in a subprocess whose stdout is a pipe, not a TTY)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from segray.config import ModelConfig
from segray.core.checkpoint import FILENAME, make_payload
from segray.core.models import build_model
from segray.demo.scenes import DEMO_CLASSES, write_demo_dataset

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
SEGRAY = str(Path(sys.executable).parent / "segray")
RAY_DATA_MARKERS = ("Starting execution of Dataset", "Total Progress", "streaming_executor", "logging_progress")


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quiet")
    data = write_demo_dataset(root / "scenes", 6, 48)
    cfg = ModelConfig(num_classes=len(DEMO_CLASSES), depth=2, base_width=8)
    (root / "ckpt").mkdir()
    torch.save(make_payload(build_model(cfg), cfg.model_dump(mode="json"), DEMO_CLASSES, None),
               root / "ckpt" / FILENAME)
    path = root / "infer.yaml"
    path.write_text(yaml.safe_dump({
        "source": {"images": data["images"], "masks": data["masks"]}, "checkpoint": str(root / "ckpt"),
        "output": str(root / "out"), "overwrite": True, "num_actors": 1, "batch_size": 2}))
    return path


def run(tmp_path: Path, *args: str) -> tuple[int, list[str], Path]:
    log = tmp_path / "segray.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SEGRAY_RAY_LOGS")}
    env.update(SEGRAY_LOG_FILE=str(log), SEGRAY_PROGRESS_EVERY="2", COLUMNS="120", RAY_AUTH_MODE="disabled")
    t0 = time.monotonic()
    proc = subprocess.run([SEGRAY, *args], cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=600)
    lines = (proc.stdout + proc.stderr).splitlines()
    print(f"\n$ segray {' '.join(args[:2])} -> rc={proc.returncode}, {len(lines)} lines, "
          f"{time.monotonic() - t0:.0f}s\n" + "\n".join(lines))
    return proc.returncode, lines, log


def test_infer_without_a_tty_is_quiet(tmp_path, job):
    rc, lines, log = run(tmp_path, "infer", str(job))
    assert rc == 0
    assert len(lines) < 40, len(lines)
    text = "\n".join(lines)
    assert "inference summary" in text and "num_ok" in text
    assert f"Ray logs: {log}" in text
    assert sum("Ray logs:" in ln for ln in lines) == 1
    assert not any(m in text for m in RAY_DATA_MARKERS), "Ray Data's output reached the terminal"
    assert "Traceback" not in text
    assert any(ln.startswith("infer: done") for ln in lines), "no closing progress line"
    assert log.exists()
    logged = log.read_text()
    assert any(m in logged for m in RAY_DATA_MARKERS), "Ray Data's output is not in the log file"


def test_verbose_brings_ray_output_back(tmp_path, job):
    rc, lines, log = run(tmp_path, "--verbose", "infer", str(job))
    assert rc == 0
    text = "\n".join(lines)
    assert "inference summary" in text
    assert any(m in text for m in RAY_DATA_MARKERS), "--verbose: no Ray Data output on the terminal"
    assert "Ray logs:" not in text


RAYLET_ENV = """
import psutil, ray
from segray.runtime import node_env, start_ray
start_ray()
raylet = next(p for p in psutil.Process().children(recursive=True) if p.name() == "raylet")
print(raylet.environ().get("RAY_num_workers_soft_limit"), node_env()["RAY_num_workers_soft_limit"])
ray.shutdown()
"""


@pytest.mark.parametrize("own", [None, "3"])
def test_the_local_ray_keeps_the_workers_pipelines_need(tmp_path, own):
    """The local Ray that a job starts gets ``node_env``'s idle-worker limit (read by its raylet
    when it starts; with the default, fractional-CPU task workers were killed between blocks),
    unless the caller set one."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_num_workers_soft_limit")}
    env.update(SEGRAY_LOG_FILE=str(tmp_path / "segray.log"), RAY_AUTH_MODE="disabled")
    if own:
        env["RAY_num_workers_soft_limit"] = own
    proc = subprocess.run([sys.executable, "-c", RAYLET_ENV], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen, rule = proc.stdout.split()[-2:]
    assert seen == (own or rule) and int(rule) == 2 * os.cpu_count() + 4
