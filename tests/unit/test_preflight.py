"""The checks that run before Ray starts (segray.io.preflight), on local files and endpoints that
do not answer (no server needed; tests/integration/test_fail_fast.py runs them through the CLI,
with a real S3 server), and the CLI's one-line error messages and progress lines."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from segray.config import ConfigError, ModelConfig, SourceConfig, StorageOptions
from segray.core.checkpoint import FILENAME, make_payload
from segray.core.models import build_model
from segray.io import preflight as pf


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "sub" / "b.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "a.png")
    (root / "notes.txt").write_text("x")
    return root


@pytest.fixture
def ckpt(tmp_path):
    cfg = ModelConfig(num_classes=2, depth=2, base_width=8)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(make_payload(build_model(cfg), cfg.model_dump(mode="json"), ["bg", "fg"], None), folder / FILENAME)
    return folder


def test_errors_are_config_errors():
    assert issubclass(pf.PreflightError, ConfigError)


def test_source_folder(images, tmp_path):
    first = pf.check_source(SourceConfig(images=str(images)), None)
    assert first.endswith("a.png")  # the first image by name, without listing the whole tree
    with pytest.raises(pf.PreflightError, match=r"^source.images: /nope does not exist$"):
        pf.check_source(SourceConfig(images="/nope"), None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(pf.PreflightError, match="^source.images: no images with extensions"):
        pf.check_source(SourceConfig(images=str(empty)), None)
    with pytest.raises(pf.PreflightError, match="is a file, not a folder"):
        pf.check_source(SourceConfig(images=str(images / "a.png")), None)
    with pytest.raises(pf.PreflightError, match="^data.val_source.masks: /nope/m does not exist$"):
        pf.check_source(SourceConfig(images=str(images), masks="/nope/m"), None, "data.val_source")


def test_source_in_a_subfolder_only(tmp_path):
    root = tmp_path / "deep"
    (root / "x" / "y").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "x" / "y" / "c.png")
    assert pf.first_image(SourceConfig(images=str(root)), None).endswith("c.png")


def test_source_glob_and_manifest(images, tmp_path):
    assert pf.check_source(SourceConfig(glob=f"{images}/**/*.png"), None).endswith(".png")
    with pytest.raises(pf.PreflightError, match=r"^source.glob: no files match /nope/\*.png$"):
        pf.check_source(SourceConfig(glob="/nope/*.png"), None)
    with pytest.raises(pf.PreflightError, match="^source.manifest: /nope/m.csv not found$"):
        pf.check_source(SourceConfig(manifest="/nope/m.csv"), None)
    manifest = tmp_path / "m.csv"
    manifest.write_text("image\nimgs/a.png\n")
    assert pf.check_source(SourceConfig(manifest=str(manifest)), None).endswith("imgs/a.png")


def test_checkpoint(ckpt, tmp_path):
    assert pf.check_checkpoint(str(ckpt)).num_classes == 2
    assert pf.check_checkpoint(str(ckpt / FILENAME)).in_channels == 3
    with pytest.raises(pf.PreflightError, match=r"^checkpoint: /x/best.pt not found$"):
        pf.check_checkpoint("/x/best.pt")
    with pytest.raises(pf.PreflightError, match=rf"^checkpoint: {tmp_path}/nope/{FILENAME} not found$"):
        pf.check_checkpoint(str(tmp_path / "nope"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(pf.PreflightError, match="does not load") as err:
        pf.check_checkpoint(str(bad))
    assert "\n" not in str(err.value)
    other = tmp_path / "other.pt"
    buf = io.BytesIO()
    torch.save({"weights": torch.zeros(2)}, buf)
    other.write_bytes(buf.getvalue())
    with pytest.raises(pf.PreflightError, match="not a segray checkpoint"):
        pf.check_checkpoint(str(other))


def test_bands(images):
    assert pf.image_bands(str(images / "a.png")) == 1
    assert pf.image_bands(str(images / "sub" / "b.png")) == 3
    pf.check_bands(3, "x.png", 3, None)
    pf.check_bands(4, "x.tif", 3, [0, 1, 2])
    with pytest.raises(pf.PreflightError, match="^source.images: x.png has 1 bands, the model takes 3$"):
        pf.check_bands(1, "x.png", 3, None, field="source.images")
    with pytest.raises(pf.PreflightError, match=r"select 3 with bands\)$"):
        pf.check_bands(4, "x.tif", 3, None)
    with pytest.raises(pf.PreflightError, match="^data.bands: band 3 selected"):
        pf.check_bands(3, "x.png", 4, [0, 1, 2, 3], bands_field="data.bands")
    with pytest.raises(pf.PreflightError, match="^checkpoint: band 5 selected"):
        pf.check_bands(3, "x.png", 3, [0, 1, 5], bands_field=None)
    with pytest.raises(pf.PreflightError, match="is not a readable image"):
        pf.image_bands(str(images / "notes.txt"))


def test_output(tmp_path):
    out = tmp_path / "out"
    pf.check_output(str(out))  # need not exist
    (out / "predictions").mkdir(parents=True)
    with pytest.raises(pf.PreflightError, match=rf"^output: {out}/predictions already exists"):
        pf.check_output(str(out))
    pf.check_output(str(out), overwrite=True)
    pf.check_output(str(out), resume=True)  # an uncommitted output is carried on
    (out / "_SUCCESS").write_text("{}")
    with pytest.raises(pf.PreflightError, match="already holds a committed result"):
        pf.check_output(str(out))
    pf.check_output(str(out), overwrite=True)
    pf.check_output(str(out), committed=lambda url, storage: False, in_the_way=())  # the job says how
    with pytest.raises(pf.PreflightError, match="^work_dir: .* committed"):
        pf.check_output(str(tmp_path / "x"), field="work_dir", committed=lambda url, storage: True)


def test_writable(tmp_path):
    pf.check_writable(str(tmp_path / "a" / "b"))
    assert not (tmp_path / "a").exists()  # the probe leaves nothing behind
    assert not list(tmp_path.glob(".segray-probe-*"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(pf.PreflightError, match=rf"^train.storage_path: {blocker}/runs is not writable"):
        pf.check_writable(str(blocker / "runs"), field="train.storage_path")


def test_dead_endpoint_fails_fast(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    pf.reset_probe_cache()
    t0 = time.monotonic()
    with pytest.raises(pf.PreflightError) as err:
        pf.check_source(SourceConfig(images="s3://b/imgs"), StorageOptions(endpoint_url="http://127.0.0.1:9"))
    took = time.monotonic() - t0
    print(f"dead endpoint: {took:.2f}s")
    assert str(err.value) == "storage.endpoint_url: http://127.0.0.1:9 does not answer (connection refused)"
    assert took < 10  # loose: a behaviour bound (no retries), not a benchmark
    with pytest.raises(pf.PreflightError, match="^data.storage.endpoint_url: "):
        pf.check_storage("s3://b/x", StorageOptions(endpoint_url="http://127.0.0.1:9"), "data.source.images")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(pf.PreflightError, match="^AWS_ENDPOINT_URL: http://127.0.0.1:9 does not answer"):
        pf.check_storage("s3://b/x", None, "output")


def test_no_credentials(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    pf.reset_probe_cache()
    with pytest.raises(pf.PreflightError, match=r"^storage.key: no credentials for s3://b/x"):
        pf.check_storage("s3://b/x", StorageOptions(endpoint_url="http://127.0.0.1:9"))
    pf.check_storage("/local/path", None)  # nothing to probe
    pf.check_storage("gs://b/x", None)


def test_cli_error_lines():
    from segray.cli import error_line

    assert error_line(ConfigError("checkpoint: /x not found")) == "checkpoint: /x not found"
    assert error_line(FileNotFoundError(2, "No such file or directory", "/x/y")) == "/x/y: not found"
    assert error_line(PermissionError(13, "Permission denied", "/root/x")) == "/root/x: permission denied"
    assert error_line(ValueError("data.source: no images found")) == "data.source: no images found"


def test_stage_lines(capsys):
    from segray.report import stage

    with stage("infer", unit="images", every=0.05) as s:
        s.update(total=10)
        s.advance(4)
        time.sleep(0.3)
    out = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("infer: 4/10 images") for ln in out), out
    assert out[-1].startswith("infer: done in ") and "4/10 images" in out[-1]
    with pytest.raises(RuntimeError):
        with stage("train", every=60):
            raise RuntimeError("boom")
    assert capsys.readouterr().out.splitlines()[-1].startswith("train: failed after ")


def test_a_committed_training_run_checks_its_best_checkpoint(ckpt, tmp_path):
    from segray.io.commit import Publication

    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    Publication(str(run), None, "train").commit({"best_checkpoint": str(ckpt)})
    assert pf.check_checkpoint(str(run)).num_classes == 2, "the run folder names its best checkpoint"
    Publication(str(run), None, "train").uncommit()  # a killed rerun: no commit, nothing to read
    with pytest.raises(pf.PreflightError, match=rf"^checkpoint: {run}/{FILENAME} not found$"):
        pf.check_checkpoint(str(run))
