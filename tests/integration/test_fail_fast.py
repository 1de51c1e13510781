"""Every mistake that needs no cluster fails before Ray starts: the `segray` command (and a
jobs/*.py entrypoint) in a subprocess, against real files and a real S3-compatible server
(SeaweedFS). Each case: exit code 2, one line of output naming the config field or the path, no
traceback, no Ray session directory created (RAY_TMPDIR and TMPDIR point at an empty folder),
and a wall time that is printed and bounded loosely (a behaviour bound, not a benchmark);
``--debug`` shows the traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from segray.config import ModelConfig
from segray.core.checkpoint import FILENAME, make_payload
from segray.core.models import build_model
from segray.demo.scenes import DEMO_CLASSES, write_demo_dataset

REPO = Path(__file__).resolve().parents[2]
SEGRAY = str(Path(sys.executable).parent / "segray")
BOUND_S = 10.0  # loose on purpose: the point is "before Ray starts", which takes far longer here


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Demo scenes (RGB), 1-band images, a checkpoint that loads and one that does not."""
    root = tmp_path_factory.mktemp("inputs")
    data = write_demo_dataset(root / "scenes", 2, 32)
    gray = root / "gray"
    gray.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(gray / "g.png")
    cfg = ModelConfig(num_classes=len(DEMO_CLASSES), depth=2, base_width=8)
    ckpt = root / "ckpt"
    ckpt.mkdir()
    torch.save(make_payload(build_model(cfg), cfg.model_dump(mode="json"), DEMO_CLASSES, None), ckpt / FILENAME)
    bad = root / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    a_file = root / "a_file"
    a_file.write_text("x")
    return {"images": data["images"], "masks": data["masks"], "gray": str(gray), "ckpt": str(ckpt),
            "bad": str(bad), "file": str(a_file), "root": root}


def run_cli(tmp_path: Path, *args: str, env: dict | None = None, script: str | None = None):
    """(exit code, output lines, seconds); asserts that no Ray session was created."""
    ray_tmp = tmp_path / "raytmp"
    ray_tmp.mkdir(exist_ok=True)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)  # no ~/.aws: credentials only from what the test gives
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    full_env = {**base, "RAY_TMPDIR": str(ray_tmp), "TMPDIR": str(ray_tmp), "HOME": str(home), "COLUMNS": "80",
                **(env or {})}
    cmd = [sys.executable, script, *args] if script else [SEGRAY, *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    print(f"\n{took:5.2f}s rc={proc.returncode} {' '.join(args[:1])}: {lines[-1] if lines else ''}")
    sessions = [str(p) for p in ray_tmp.rglob("session_*")]
    assert not sessions, f"Ray started: {sessions}"
    assert not (ray_tmp / "ray").exists(), "Ray created its temp folder"
    return proc.returncode, lines, took


def config(tmp_path: Path, data: dict, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def expect_one_line(result, *needles: str) -> str:
    rc, lines, took = result
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert not any("Traceback" in ln for ln in lines)
    line = lines[0]
    assert line.startswith("error: "), line
    for n in needles:
        assert n in line, (n, line)
    assert took < BOUND_S, f"took {took:.1f}s"
    return line


def infer_cfg(inputs, **over) -> dict:
    cfg = {"source": {"images": inputs["images"], "masks": inputs["masks"]}, "checkpoint": inputs["ckpt"],
           "output": str(inputs["root"] / "never-written"), "num_actors": 1}
    cfg.update(over)
    return cfg


# --------------------------------------------------------------------------- local files


def test_missing_source_folder(tmp_path, inputs):
    cfg = config(tmp_path, infer_cfg(inputs, source={"images": "/nope/imgs"}))
    expect_one_line(run_cli(tmp_path, "infer", cfg), "source.images", "/nope/imgs", "does not exist")


def test_source_with_no_images(tmp_path, inputs):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    cfg = config(tmp_path, infer_cfg(inputs, source={"images": str(empty)}))
    expect_one_line(run_cli(tmp_path, "infer", cfg), "source.images", "no images", str(empty))


def test_missing_masks_folder(tmp_path, inputs):
    cfg = config(tmp_path, infer_cfg(inputs, source={"images": inputs["images"], "masks": "/nope/masks"}))
    expect_one_line(run_cli(tmp_path, "infer", cfg), "source.masks", "/nope/masks")


def test_missing_checkpoint(tmp_path, inputs):
    cfg = config(tmp_path, infer_cfg(inputs, checkpoint="/x/best.pt"))
    assert expect_one_line(run_cli(tmp_path, "infer", cfg)) == "error: checkpoint: /x/best.pt not found"


def test_checkpoint_that_does_not_load(tmp_path, inputs):
    cfg = config(tmp_path, infer_cfg(inputs, checkpoint=inputs["bad"]))
    expect_one_line(run_cli(tmp_path, "infer", cfg), "checkpoint", inputs["bad"], "does not load")


def test_band_count_that_does_not_fit_the_checkpoint(tmp_path, inputs):
    cfg = config(tmp_path, infer_cfg(inputs, source={"images": inputs["gray"]}))
    line = expect_one_line(run_cli(tmp_path, "infer", cfg), "source.images", "g.png", "has 1 bands", "takes 3")
    print(line)


def test_output_already_there(tmp_path, inputs):
    out = tmp_path / "out"
    (out / "predictions").mkdir(parents=True)
    cfg = config(tmp_path, infer_cfg(inputs, output=str(out)))
    expect_one_line(run_cli(tmp_path, "infer", cfg), "output", str(out), "already exists", "overwrite")


def test_output_committed(tmp_path, inputs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_SUCCESS").write_text("{}")
    cfg = config(tmp_path, infer_cfg(inputs, output=str(out)))
    expect_one_line(run_cli(tmp_path, "infer", cfg), "output", str(out), "committed")


def test_output_not_writable(tmp_path, inputs):
    cfg = config(tmp_path, infer_cfg(inputs, output=inputs["file"] + "/out", overwrite=True))
    expect_one_line(run_cli(tmp_path, "infer", cfg), "output", inputs["file"], "not writable")


def test_segment_scenes_missing_source(tmp_path, inputs):
    cfg = config(tmp_path, {"source": {"glob": "/nope/scenes/*.tif"}, "checkpoint": inputs["ckpt"],
                            "output": str(tmp_path / "out")})
    expect_one_line(run_cli(tmp_path, "segment-scenes", cfg), "source.glob", "/nope/scenes/*.tif")


def test_nightly_missing_checkpoint(tmp_path, inputs):
    cfg = config(tmp_path, {"source": {"images": inputs["images"]}, "checkpoint": "/x/night.pt",
                            "output": str(tmp_path / "nights")})
    assert expect_one_line(run_cli(tmp_path, "nightly", cfg)) == "error: checkpoint: /x/night.pt not found"


def train_cfg(inputs, tmp_path, **data_over) -> dict:
    data = {"source": {"images": inputs["images"], "masks": inputs["masks"]}, "class_names": DEMO_CLASSES,
            **data_over}
    return {"data": data, "model": {"num_classes": len(DEMO_CLASSES)},
            "train": {"epochs": 1, "storage_path": str(tmp_path / "runs")}}


def test_train_missing_val_source(tmp_path, inputs):
    cfg = config(tmp_path, train_cfg(inputs, tmp_path, val_source={"images": "/nope/val", "masks": "/nope/vm"}))
    expect_one_line(run_cli(tmp_path, "train", cfg), "data.val_source.images", "/nope/val")


def test_train_storage_path_not_writable(tmp_path, inputs):
    cfg = train_cfg(inputs, tmp_path)
    cfg["train"]["storage_path"] = inputs["file"] + "/runs"
    expect_one_line(run_cli(tmp_path, "train", config(tmp_path, cfg)), "train.storage_path", "not writable")


def test_train_band_count(tmp_path, inputs):
    cfg = train_cfg(inputs, tmp_path)
    cfg["model"]["in_channels"] = 4
    cfg["data"]["bands"] = [0, 1, 2, 3]
    expect_one_line(run_cli(tmp_path, "train", config(tmp_path, cfg)), "data.bands", "band 3", "3 bands")


def test_train_missing_weights(tmp_path, inputs):
    cfg = train_cfg(inputs, tmp_path)
    cfg["model"]["weights"] = "/nope/start.pt"
    expect_one_line(run_cli(tmp_path, "train", config(tmp_path, cfg)), "model.weights", "/nope/start.pt")


def test_train_missing_encoder_weights(tmp_path, inputs):
    cfg = train_cfg(inputs, tmp_path)
    cfg["model"] = {**cfg.get("model", {}), "name": "smp", "arch": "Unet", "encoder": "resnet18",
                    "encoder_weights": "/nope/resnet18.pth"}
    expect_one_line(run_cli(tmp_path, "train", config(tmp_path, cfg)), "model.encoder_weights", "/nope/resnet18.pth")


def test_demo_workdir_not_writable(tmp_path, inputs):
    expect_one_line(run_cli(tmp_path, "demo", "--set", f"workdir={inputs['file']}/demo"), "workdir", "not writable")


def test_job_entrypoint_fails_the_same_way(tmp_path, inputs):
    cfg = config(tmp_path, infer_cfg(inputs, checkpoint="/x/best.pt"))
    line = expect_one_line(run_cli(tmp_path, cfg, script="jobs/infer.py"))
    assert line == "error: checkpoint: /x/best.pt not found"


def test_debug_shows_the_traceback(tmp_path, inputs):
    cfg = config(tmp_path, infer_cfg(inputs, checkpoint="/x/best.pt"))
    rc, lines, took = run_cli(tmp_path, "--debug", "infer", cfg)
    assert rc == 2
    assert any("Traceback" in ln for ln in lines), lines
    assert lines[-1] == "error: checkpoint: /x/best.pt not found"
    rc, lines, _ = run_cli(tmp_path, cfg, "--debug", script="jobs/infer.py")
    assert rc == 2 and any("Traceback" in ln for ln in lines), lines


def test_a_bad_field_still_names_it(tmp_path, inputs):
    cfg = config(tmp_path, infer_cfg(inputs))
    rc, lines, took = run_cli(tmp_path, "infer", cfg, "--set", "batch_size=0")
    assert rc == 2 and "batch_size" in " ".join(lines) and not any("Traceback" in ln for ln in lines)


# --------------------------------------------------------------------------- object storage



def put(s3, bucket: str, key: str, data: bytes) -> None:
    s3.client().put_object(Bucket=bucket, Key=key, Body=data)


@pytest.fixture(scope="module")
def s3_inputs(s3, inputs) -> dict:
    import uuid

    bucket = s3.make_bucket(f"ff-{uuid.uuid4().hex[:12]}")
    for name in sorted(os.listdir(inputs["images"])):
        put(s3, bucket, f"imgs/{name}", Path(inputs["images"], name).read_bytes())
    put(s3, bucket, f"ckpt/{FILENAME}", Path(inputs["ckpt"], FILENAME).read_bytes())
    return {"bucket": bucket}


def s3_cfg(s3, s3_inputs, inputs, **over) -> dict:
    b = s3_inputs["bucket"]
    cfg = {"source": {"images": f"s3://{b}/imgs"}, "checkpoint": f"s3://{b}/ckpt", "output": f"s3://{b}/out",
           "num_actors": 1, "storage": {"endpoint_url": s3.endpoint_url, "key": s3.key, "secret": s3.secret,
                                        "region": s3.region}}
    cfg.update(over)
    return cfg


@pytest.mark.s3
def test_s3_without_credentials(tmp_path, s3, s3_inputs, inputs):
    cfg = s3_cfg(s3, s3_inputs, inputs, storage={"endpoint_url": s3.endpoint_url})
    expect_one_line(run_cli(tmp_path, "infer", config(tmp_path, cfg)), "storage.key", "no credentials",
                    f"s3://{s3_inputs['bucket']}/imgs")


@pytest.mark.s3
def test_s3_dead_endpoint(tmp_path, s3, s3_inputs, inputs):
    cfg = s3_cfg(s3, s3_inputs, inputs)
    cfg["storage"]["endpoint_url"] = "http://127.0.0.1:9"
    line = expect_one_line(run_cli(tmp_path, "infer", config(tmp_path, cfg)))
    assert line == "error: storage.endpoint_url: http://127.0.0.1:9 does not answer (connection refused)"


@pytest.mark.s3
def test_s3_dead_endpoint_from_the_environment(tmp_path, s3, s3_inputs, inputs):
    cfg = s3_cfg(s3, s3_inputs, inputs, storage={})
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": s3.key, "AWS_SECRET_ACCESS_KEY": s3.secret}
    line = expect_one_line(run_cli(tmp_path, "infer", config(tmp_path, cfg), env=env))
    assert line == "error: AWS_ENDPOINT_URL: http://127.0.0.1:9 does not answer (connection refused)"


@pytest.mark.s3
def test_s3_wrong_secret(tmp_path, s3, s3_inputs, inputs):
    cfg = s3_cfg(s3, s3_inputs, inputs)
    cfg["storage"]["secret"] = "wrong-secret"
    expect_one_line(run_cli(tmp_path, "infer", config(tmp_path, cfg)), "storage.key", "denied")


@pytest.mark.s3
def test_s3_missing_bucket(tmp_path, s3, s3_inputs, inputs):
    cfg = s3_cfg(s3, s3_inputs, inputs, source={"images": "s3://no-such-bucket-x/imgs"})
    expect_one_line(run_cli(tmp_path, "infer", config(tmp_path, cfg)), "source.images",
                    "s3://no-such-bucket-x/imgs does not exist")


@pytest.mark.s3
def test_s3_missing_prefix(tmp_path, s3, s3_inputs, inputs):
    b = s3_inputs["bucket"]
    cfg = s3_cfg(s3, s3_inputs, inputs, source={"images": f"s3://{b}/nope"})
    assert expect_one_line(run_cli(tmp_path, "infer", config(tmp_path, cfg))) == \
        f"error: source.images: s3://{b}/nope does not exist"


@pytest.mark.s3
def test_s3_missing_checkpoint(tmp_path, s3, s3_inputs, inputs):
    b = s3_inputs["bucket"]
    cfg = s3_cfg(s3, s3_inputs, inputs, checkpoint=f"s3://{b}/nope/best.pt")
    assert expect_one_line(run_cli(tmp_path, "infer", config(tmp_path, cfg))) == \
        f"error: checkpoint: s3://{b}/nope/best.pt not found"


@pytest.mark.s3
def test_s3_output_already_there(tmp_path, s3, s3_inputs, inputs):
    b = s3_inputs["bucket"]
    put(s3, b, "done/_SUCCESS", b"{}")
    cfg = s3_cfg(s3, s3_inputs, inputs, output=f"s3://{b}/done")
    expect_one_line(run_cli(tmp_path, "infer", config(tmp_path, cfg)), "output", f"s3://{b}/done", "committed")


@pytest.mark.s3
def test_s3_train_data_storage_field(tmp_path, s3, s3_inputs, inputs):
    b = s3_inputs["bucket"]
    cfg = {"data": {"source": {"images": f"s3://{b}/imgs", "masks": f"s3://{b}/imgs"}, "class_names": DEMO_CLASSES,
                    "storage": {"endpoint_url": "http://127.0.0.1:9", "key": s3.key, "secret": s3.secret}},
           "model": {"num_classes": len(DEMO_CLASSES)}, "train": {"storage_path": str(tmp_path / "runs")}}
    line = expect_one_line(run_cli(tmp_path, "train", config(tmp_path, cfg)))
    assert line == "error: data.storage.endpoint_url: http://127.0.0.1:9 does not answer (connection refused)"
