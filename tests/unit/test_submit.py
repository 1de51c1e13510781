"""`segray submit` before any network call: validation, stable ids, runtime_env, config shipping.

Nothing here talks to a cluster: the address points at a closed port, so a test that got as
far as the network would fail with a connection error, not with the asserted message.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from segray.cli import app
from segray.config import ConfigError, InferJobConfig, NightlyJobConfig, TrainJobConfig, load_config
from segray.jobs import JOBS
from segray.submit import CONFIG_ENV, DEFAULT_EXCLUDES, prepare

REPO = Path(__file__).resolve().parents[2]
DAY = dt.date(2025, 1, 31)


@pytest.fixture
def closed_port_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _infer_yaml(path: Path, **extra) -> str:
    data = {"source": {"images": "s3://b/images"}, "checkpoint": "s3://b/ckpt", "output": "s3://b/out", **extra}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_bad_field_fails_before_any_network_call(tmp_path, closed_port_address):
    cfg = _infer_yaml(tmp_path / "infer.yaml")
    result = CliRunner().invoke(app, ["submit", "infer", cfg, "--set", "batch_size=0", "--address", closed_port_address])
    assert result.exit_code == 2, result.output
    assert "batch_size: Input should be greater than 0" in result.output
    assert "connect" not in result.output.lower()

    result = CliRunner().invoke(app, ["submit", "infer", cfg, "--set", "num_actorz=2", "--address", closed_port_address])
    assert result.exit_code == 2 and "num_actorz: Extra inputs are not permitted" in result.output


def test_unknown_job_lists_the_choices(tmp_path, closed_port_address):
    result = CliRunner().invoke(app, ["submit", "predict", _infer_yaml(tmp_path / "i.yaml"),
                                      "--address", closed_port_address])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "unknown job 'predict'" in out and all(j in out for j in JOBS)


def test_no_address_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = CliRunner().invoke(app, ["submit", "infer", _infer_yaml(tmp_path / "i.yaml")])
    assert result.exit_code == 2 and "--address" in result.output


def test_unreachable_cluster_exits_1_with_the_address(tmp_path, closed_port_address):
    result = CliRunner().invoke(app, ["submit", "infer", _infer_yaml(tmp_path / "i.yaml"), "--address",
                                      closed_port_address, "--working-dir", str(REPO)])
    assert result.exit_code == 1, result.output
    assert f"cannot reach the Ray Jobs API at {closed_port_address}" in " ".join(result.output.split())


def test_submission_id_is_stable_per_job_config_and_day(tmp_path):
    cfg = _infer_yaml(tmp_path / "infer.yaml")
    a = prepare("infer", cfg, working_dir=REPO, today=DAY)
    b = prepare("infer", cfg, working_dir=REPO, today=DAY)
    assert a.submission_id == b.submission_id and a.submission_id.startswith("segray-infer-20250131-")
    # The same content from another file gives the same id; other content, day or job do not.
    assert prepare("infer", _infer_yaml(tmp_path / "copy.yaml"), working_dir=REPO, today=DAY).submission_id == a.submission_id
    assert prepare("infer", cfg, ["batch_size=4"], working_dir=REPO, today=DAY).submission_id != a.submission_id
    assert prepare("infer", cfg, working_dir=REPO, today=DAY + dt.timedelta(days=1)).submission_id != a.submission_id
    assert prepare("infer", cfg, working_dir=REPO, submission_id="mine-1").submission_id == "mine-1"


def test_runtime_env_uploads_the_checkout_without_heavy_folders(tmp_path):
    sub = prepare("infer", _infer_yaml(tmp_path / "infer.yaml"), working_dir=REPO, today=DAY,
                  pip=["rasterio==1.4.3"], excludes=["benchmarks"])
    env = sub.runtime_env
    assert env["working_dir"] == str(REPO) and env["pip"] == ["rasterio==1.4.3"]
    for heavy in (".git", ".venv", "runs", "segray-demo", "*.parquet", "*.pt", "benchmarks"):
        assert heavy in env["excludes"]
    assert shlex.split(sub.entrypoint)[:2] == ["python", "jobs/infer.py"]
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"


def test_config_outside_the_working_dir_travels_resolved_in_the_env(tmp_path, monkeypatch):
    cfg = _infer_yaml(tmp_path / "infer.yaml")
    sub = prepare("infer", cfg, ["num_actors=3"], working_dir=REPO, today=DAY)
    assert shlex.split(sub.entrypoint) == ["python", "jobs/infer.py", f"env:{CONFIG_ENV}"]
    shipped = sub.runtime_env["env_vars"][CONFIG_ENV]
    # What the job reads back is exactly what was validated here, overrides applied.
    monkeypatch.setenv(CONFIG_ENV, shipped)
    remote = load_config(InferJobConfig, f"env:{CONFIG_ENV}")
    assert remote == sub.config and remote.num_actors == 3
    monkeypatch.delenv(CONFIG_ENV)
    with pytest.raises(ConfigError, match=CONFIG_ENV):
        load_config(InferJobConfig, f"env:{CONFIG_ENV}")


def test_config_inside_the_working_dir_or_a_url_is_passed_by_name(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "train.py").write_text("")
    (tmp_path / "configs").mkdir()
    src = (REPO / "configs" / "demo_train.yaml").read_text()
    (tmp_path / "configs" / "t.yaml").write_text(src)
    sub = prepare("train", str(tmp_path / "configs" / "t.yaml"), ["train.epochs=2"], working_dir=tmp_path, today=DAY)
    assert shlex.split(sub.entrypoint) == ["python", "jobs/train.py", "configs/t.yaml", "--set", "train.epochs=2"]
    assert CONFIG_ENV not in sub.runtime_env["env_vars"]
    assert isinstance(sub.config, TrainJobConfig) and sub.config.train.epochs == 2
    # A config under an excluded folder would not be uploaded: it travels in the env instead.
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "t.yaml").write_text(src)
    sub = prepare("train", str(tmp_path / "runs" / "t.yaml"), working_dir=tmp_path, today=DAY)
    assert CONFIG_ENV in sub.runtime_env["env_vars"]
    # Local paths in the config are flagged: every node must see them.
    assert any("data.source.images=segray-demo/data/train/images" in w for w in sub.warnings)


def test_image_mode_uploads_nothing_and_runs_the_installed_command(tmp_path):
    sub = prepare("infer", _infer_yaml(tmp_path / "i.yaml"), image=True, today=DAY)
    assert "working_dir" not in sub.runtime_env
    assert shlex.split(sub.entrypoint) == ["segray", "infer", f"env:{CONFIG_ENV}"]


def test_env_passthrough(tmp_path, monkeypatch):
    cfg = _infer_yaml(tmp_path / "i.yaml")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_CA_BUNDLE", "/local/only.pem")
    monkeypatch.setenv("MY_TOKEN", "t")
    plain = prepare("infer", cfg, working_dir=REPO, today=DAY).runtime_env["env_vars"]
    assert "AWS_ACCESS_KEY_ID" not in plain  # nothing leaves unless asked
    env = prepare("infer", cfg, working_dir=REPO, today=DAY, env_from_local=True,
                  env=["MY_TOKEN", "EXTRA=1"]).runtime_env["env_vars"]
    assert env["AWS_ACCESS_KEY_ID"] == "k" and env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "AWS_CA_BUNDLE" not in env and env["MY_TOKEN"] == "t" and env["EXTRA"] == "1"
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE"):
        prepare("infer", cfg, working_dir=REPO, today=DAY, env=["NOT_SET_ANYWHERE"])


def test_nightly_pins_the_night_at_submission(tmp_path):
    path = tmp_path / "n.yaml"
    path.write_text(yaml.safe_dump({"source": {"images": "s3://b/archive"}, "checkpoint": "s3://b/c",
                                    "output": "s3://b/nightly"}))
    sub = prepare("nightly", str(path), working_dir=REPO, today=DAY)
    assert isinstance(sub.config, NightlyJobConfig) and sub.config.run_date == DAY
    assert "2025-01-31" in sub.runtime_env["env_vars"][CONFIG_ENV]
    later = prepare("nightly", str(path), working_dir=REPO, today=DAY + dt.timedelta(days=1))
    assert later.submission_id != sub.submission_id
    explicit = prepare("nightly", str(path), ["run_date=2024-12-24"], working_dir=REPO, today=DAY)
    assert explicit.config.run_date == dt.date(2024, 12, 24)


def test_train_instance_needs_instance_data(tmp_path):
    with pytest.raises(ConfigError, match="instance"):
        prepare("train-instance", str(REPO / "configs" / "demo_train.yaml"), working_dir=REPO, today=DAY)


def test_dry_run_prints_the_submission_and_hides_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    result = CliRunner().invoke(app, ["submit", "infer", _infer_yaml(tmp_path / "i.yaml"), "--dry-run",
                                      "--env-from-local", "--working-dir", str(REPO)])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output[result.output.index("{"):])
    assert shown["submission_id"].startswith("segray-infer-")
    assert shown["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "***"
    assert "very-secret" not in result.output
    assert set(DEFAULT_EXCLUDES) <= set(shown["runtime_env"]["excludes"])


def test_every_entrypoint_is_a_registered_job_and_runs_it():
    scripts = {spec.script: name for name, spec in JOBS.items()}
    assert sorted(scripts) == sorted(p.relative_to(REPO).as_posix() for p in (REPO / "jobs").glob("*.py"))
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    for script, name in scripts.items():
        spec = JOBS[name]
        assert spec.name == name and spec.command in commands and spec.description
        calls = rf"run_job\([\"']{re.escape(name)}[\"'], sys\.argv\[1:\]\)"
        assert re.search(calls, (REPO / script).read_text()), script
        if spec.fallback_script:
            assert (REPO / spec.fallback_script).is_file()


def _entrypoint(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_entrypoints_keep_the_command_line_of_their_segray_command(tmp_path):
    cfg = _infer_yaml(tmp_path / "infer.yaml")
    proc = _entrypoint("jobs/infer.py", cfg, "--set", "batch_size=3", "--print-config")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert yaml.safe_load(proc.stdout)["batch_size"] == 3
    proc = _entrypoint("jobs/infer.py", cfg, "--set", "batch_size=0")
    assert proc.returncode == 2 and "batch_size" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert _entrypoint("jobs/nightly.py").returncode == 2  # the config argument is required


def test_train_instance_entrypoint_refuses_semantic_configs_before_any_work():
    proc = _entrypoint("jobs/train_instance.py", "configs/demo_train.yaml", "--print-config")
    assert proc.returncode == 2 and "error: data.format" in proc.stderr and "'instance_masks' or 'coco'" in proc.stderr
    proc = _entrypoint("jobs/train_instance.py", "configs/train_instance.yaml", "--set", "train.epochs=2",
                       "--print-config")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert yaml.safe_load(proc.stdout)["train"]["epochs"] == 2
