"""Submit segray jobs to a Ray cluster through the Ray Jobs API (``segray submit``, ``segray jobs``).

What ``ray job submit --working-dir . -- python jobs/<x>.py <config>`` does (the jobs, their
config classes and scripts: :data:`segray.jobs.JOBS`), plus:

- the config is validated here first, so a bad field fails before any network call;
- a stable submission id (``segray-<job>-<YYYYMMDD>-<hash of job + resolved config>``, or
  ``--id``): submitting the same thing twice on a day attaches to the job that exists instead
  of starting a duplicate (``--rerun`` starts a new attempt, ``<id>-r2``, ...);
- the runtime_env: the working dir (the repository, without virtualenvs, runs, outputs and
  data files), ``pip`` packages, environment variables passed on request (``--env KEY``,
  ``--env-from-local`` for the local ``AWS_*``), or no upload at all (``--image``: run the
  segray installed in the cluster's image);
- the logs are followed with a status line, and the exit code is the job's: 0 when it
  SUCCEEDED, 1 when it FAILED or was STOPPED (with Ray's reason).

A config file outside the uploaded working dir (or any local config with ``--image``) travels
resolved, as YAML in the job's environment (``SEGRAY_JOB_CONFIG``, read by ``env:`` config
paths): keep credentials out of configs, they would be visible in the job's runtime_env.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel

from segray.config import ENV_PREFIX, ConfigError, NightlyJobConfig, dump_config, load_config
from segray.jobs import JOBS

CONFIG_ENV = "SEGRAY_JOB_CONFIG"
# Never uploaded (gitignore-style patterns, relative to the working dir); .gitignore and
# .rayignore files are honoured by Ray as well.
DEFAULT_EXCLUDES = [
    ".git", ".venv", "venv", ".tox", ".pytest_cache", ".mypy_cache", ".ruff_cache", "__pycache__", "*.pyc",
    "*.egg-info", "build", "dist", ".whl", ".gl", "runs", "segray-demo", "*.parquet", "*.pt", "*.pth",
    "*.ckpt", "*.zip", "*.tar", "*.tar.gz", "*.tgz", "*.npy", "*.npz", "*.tif", "*.tiff", "*.log",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# Config fields holding paths that every node of a cluster must be able to open.
_PATH_FIELDS = {"images", "masks", "glob", "manifest", "checkpoint", "output", "storage_path", "weights",
                "backbone_weights", "coco_json", "class_masks", "work_dir", "vector_labels"}

# AWS_* variables that name local files or profiles: meaningless on the cluster's nodes.
_LOCAL_ONLY_AWS = {"AWS_CA_BUNDLE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                   "AWS_PROFILE", "AWS_DEFAULT_PROFILE"}


@dataclass
class Submission:
    job: str
    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    config: BaseModel
    config_arg: str
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        env = dict(self.runtime_env)
        if "env_vars" in env:  # values may be secrets
            env["env_vars"] = {k: ("<config yaml>" if k == CONFIG_ENV else "***" if _secret(k) else v)
                               for k, v in env["env_vars"].items()}
        return {"submission_id": self.submission_id, "entrypoint": self.entrypoint, "runtime_env": env}


def _secret(key: str) -> bool:
    return any(w in key.upper() for w in ("SECRET", "TOKEN", "KEY", "PASSWORD", "SESSION"))


def default_working_dir() -> Path:
    """The current directory when it holds jobs/, else segray's own source checkout."""
    cwd = Path.cwd()
    if (cwd / "jobs").is_dir():
        return cwd
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "jobs").is_dir():
        return checkout
    raise ConfigError("no jobs/ folder here: run from the segray checkout, pass --working-dir, or --image")


def _is_url(path: str) -> bool:
    return "://" in path or path.startswith(ENV_PREFIX)


def _excluded(rel: Path, excludes: list[str]) -> bool:
    import fnmatch

    parts = rel.parts
    for pat in excludes:
        pat = pat.strip("/")
        if any(fnmatch.fnmatch(p, pat) for p in parts) or fnmatch.fnmatch(rel.as_posix(), pat):
            return True
    return False


def _local_paths(cfg: BaseModel) -> list[str]:
    found = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                loc = f"{where}.{k}" if where else k
                if k in _PATH_FIELDS and isinstance(v, str) and v and "://" not in v:
                    found.append(f"{loc}={v}")
                walk(v, loc)

    walk(cfg.model_dump(mode="json"), "")
    return found


def _env_vars(env: list[str], env_from_local: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    if env_from_local:
        out.update({k: v for k, v in os.environ.items() if k.startswith("AWS_") and k not in _LOCAL_ONLY_AWS})
    for item in env:
        if "=" in item:
            k, v = item.split("=", 1)
            out[k.strip()] = v
        elif item in os.environ:
            out[item] = os.environ[item]
        else:
            raise ConfigError(f"--env {item}: not set in the local environment (or give --env {item}=VALUE)")
    return out


def stable_id(job: str, cfg: BaseModel, day: dt.date) -> str:
    content = json.dumps({"job": job, "config": cfg.model_dump(mode="json")}, sort_keys=True)
    return f"segray-{job}-{day:%Y%m%d}-{hashlib.sha256(content.encode()).hexdigest()[:10]}"


def _command(spec, image: bool, working_dir: str | Path | None,
             excludes: list[str]) -> tuple[Optional[Path], list[str], dict[str, Any]]:
    """(the uploaded working dir or None, the entrypoint command, the runtime_env so far)."""
    if image:  # the segray installed in the cluster's image; nothing uploaded
        return None, ["segray", spec.command], {}
    wd = Path(working_dir).resolve() if working_dir else default_working_dir()
    if not wd.is_dir():
        raise ConfigError(f"--working-dir {wd}: not a directory")
    script = spec.script
    if not (wd / script).is_file() and spec.fallback_script and (wd / spec.fallback_script).is_file():
        script = spec.fallback_script
    if not (wd / script).is_file():
        raise ConfigError(f"{script} not found in the working dir {wd}")
    return wd, ["python", script], {"working_dir": str(wd), "excludes": excludes}


def _config_args(config: str, overrides: list[str], cfg, wd: Optional[Path], excludes: list[str],
                 env_vars: dict[str, str]) -> list[str]:
    """How the config reaches the job: a URL as is; a file inside the uploaded working dir by
    its relative path; anything else resolved, in the job's environment (added to ``env_vars``)."""
    rel: Optional[Path] = None
    if wd is not None and not _is_url(config):
        try:
            rel = Path(config).resolve().relative_to(wd)
        except ValueError:
            rel = None
        if rel is not None and _excluded(rel, excludes):
            rel = None
    sets = [a for o in overrides for a in ("--set", o)]
    if _is_url(config) and not config.startswith(ENV_PREFIX):
        return [config] + sets
    if rel is not None:
        return [rel.as_posix()] + sets
    env_vars[CONFIG_ENV] = dump_config(cfg)
    return [f"{ENV_PREFIX}{CONFIG_ENV}"]


def prepare(
    job: str,
    config: str,
    overrides: list[str] | None = None,
    *,
    working_dir: str | Path | None = None,
    image: bool = False,
    pip: list[str] | None = None,
    env: list[str] | None = None,
    env_from_local: bool = False,
    excludes: list[str] | None = None,
    submission_id: str | None = None,
    today: dt.date | None = None,
) -> Submission:
    """Everything about a submission, computed locally (no network): raises ConfigError."""
    if job not in JOBS:
        raise ConfigError(f"unknown job {job!r}: choose one of {', '.join(JOBS)}")
    spec = JOBS[job]
    overrides = list(overrides or [])
    cfg = load_config(spec.config_cls, config, overrides)
    spec.check(cfg)
    today = today or dt.datetime.now(dt.timezone.utc).date()
    if isinstance(cfg, NightlyJobConfig) and cfg.run_date is None:
        # Pin the night at submission: a retry after midnight still completes the same night,
        # and the night is part of the submission id.
        overrides.append(f"run_date={today.isoformat()}")
        cfg = load_config(spec.config_cls, config, overrides)

    all_excludes = DEFAULT_EXCLUDES + list(excludes or [])
    env_vars = {"PYTHONUNBUFFERED": "1", **_env_vars(list(env or []), env_from_local)}
    wd, command, runtime_env = _command(spec, image, working_dir, all_excludes)
    args = _config_args(config, overrides, cfg, wd, all_excludes, env_vars)
    runtime_env["env_vars"] = env_vars
    if pip:
        runtime_env["pip"] = list(pip)

    sid = submission_id or stable_id(job, cfg, today)
    warnings = []
    local = _local_paths(cfg)
    if local:
        warnings.append("local paths in the config (every node of the cluster must see them): " + ", ".join(local))
    return Submission(job=job, submission_id=sid, entrypoint=shlex.join(command + args), runtime_env=runtime_env,
                      config=cfg, config_arg=args[0], warnings=warnings,
                      metadata={"segray_job": job, "segray_config": config if _is_url(config) else Path(config).name})


# --------------------------------------------------------------------------- the Jobs API


def client_for(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, ValueError: say where we tried
        raise ClusterError(f"cannot reach the Ray Jobs API at {address}: {exc}") from None


class ClusterError(RuntimeError):
    """The cluster is unreachable or refused a request."""


def job_info(client, submission_id: str):
    """The JobDetails of ``submission_id``, or None when the cluster has no such job."""
    try:
        return client.get_job_info(submission_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            return None
        raise


def _next_attempt(client, sid: str) -> str:
    n = 2
    while job_info(client, f"{sid}-r{n}") is not None:
        n += 1
    return f"{sid}-r{n}"


def submit(client, sub: Submission, rerun: bool = False) -> tuple[str, bool]:
    """Submit, or find the job that already has this id. Returns (submission id, attached)."""
    sid = sub.submission_id
    existing = job_info(client, sid)
    if existing is not None and rerun:
        sid, existing = _next_attempt(client, sid), None
    if existing is not None:
        return sid, True
    try:
        client.submit_job(entrypoint=sub.entrypoint, submission_id=sid, runtime_env=sub.runtime_env,
                          metadata=sub.metadata)
    except RuntimeError as exc:
        if "already exists" in str(exc):  # someone submitted the same id in between
            return sid, True
        raise ClusterError(f"submission refused: {exc}") from None
    return sid, False


def follow(client, sid: str, console, poll_s: float = 2.0, settle_s: float = 60.0):
    """Print the job's logs as they come, with a status line; returns the final JobDetails."""
    from rich.text import Text

    t0 = time.monotonic()
    state = {"status": "PENDING"}

    async def poll_status(status_line) -> None:
        while True:
            try:
                info = await asyncio.to_thread(client.get_job_info, sid)
                state["status"] = str(getattr(info.status, "value", info.status))
            except Exception:
                pass
            status_line.update(f"job [bold]{sid}[/]: {state['status']}  {time.monotonic() - t0:,.0f}s")
            await asyncio.sleep(poll_s)

    async def tail() -> None:
        with console.status(f"job [bold]{sid}[/]: submitted") as status_line:
            poller = asyncio.create_task(poll_status(status_line))
            try:
                async for chunk in client.tail_job_logs(sid):
                    console.print(Text(chunk), end="")
            finally:
                poller.cancel()

    deadline: Optional[float] = None
    try:
        asyncio.run(tail())
        # The stream ends when the driver exits; the status turns terminal moments later.
        deadline = time.monotonic() + settle_s
    except Exception as exc:  # the log stream broke: poll the status until the job ends
        console.print(f"[yellow]log stream interrupted ({type(exc).__name__}: {exc}); polling the job's status[/]")
    while True:
        info = client.get_job_info(sid)
        if status_of(info) in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return info
        time.sleep(poll_s)


def status_of(info) -> str:
    return str(getattr(info.status, "value", info.status))


def exit_code(info) -> int:
    return 0 if status_of(info) == "SUCCEEDED" else 1
