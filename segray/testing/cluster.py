"""A real multi-node Ray cluster on one machine, for tests and benchmarks.

Thin wrapper around ``cluster/local/start.sh`` and ``stop.sh`` (one implementation for
people, tests and benchmarks): a head node plus ``num_workers`` worker nodes on
127.0.0.2, 127.0.0.3, ... , each its own ``ray start`` with its own temp dir, CPUs and a
custom resource for placement (``segray_head`` on the head, ``segray_worker`` and
``segray_worker<i>`` on worker ``i``; each 1 unit, so ask for a fraction, e.g.
``resources={"segray_worker1": 0.01}``).

    with LocalCluster(num_workers=1, cpus_per_node=1) as cluster:
        ray.init(address=cluster.address)
        ...
        JobSubmissionClient(cluster.dashboard_url).list_jobs()

The cluster is always torn down in ``__exit__`` (and at interpreter exit as a last
resort). Never imports ray: the scripts do the Ray work in their own processes.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["LocalCluster", "scripts_dir"]

_REPO_SCRIPTS = Path(__file__).resolve().parents[2] / "cluster" / "local"


def scripts_dir() -> Path:
    """Directory holding start.sh/stop.sh (env SEGRAY_CLUSTER_SCRIPTS overrides)."""
    d = Path(os.environ.get("SEGRAY_CLUSTER_SCRIPTS", _REPO_SCRIPTS))
    if not (d / "start.sh").is_file():
        raise FileNotFoundError(
            f"{d}/start.sh not found: LocalCluster needs a source checkout of segray "
            "(cluster/local/) or SEGRAY_CLUSTER_SCRIPTS pointing at it"
        )
    return d


def _ray_cli() -> str:
    """The ray CLI of this interpreter's environment (so nodes run the same Ray)."""
    cand = Path(sys.executable).parent / "ray"
    if cand.is_file():
        return str(cand)
    found = shutil.which("ray")
    if not found:
        raise FileNotFoundError("ray CLI not found next to sys.executable nor on PATH")
    return found


class LocalCluster:
    """Start/stop a real local multi-node Ray cluster (head + ``num_workers`` workers).

    Args:
        num_workers: worker nodes, on 127.0.0.2 ... 127.0.0.(num_workers + 1).
        cpus_per_node: ``--num-cpus`` of every node (integer: Ray's flag is an int).
        dashboard_port: dashboard / Jobs API port on 127.0.0.1; None picks a free one.
        state_dir: where node temp dirs, logs and PIDs go. None creates a fresh short
            dir under /tmp, deleted after teardown (unless SEGRAY_KEEP_CLUSTER_DIR=1).
        head_cpus: CPUs of the head; defaults to ``cpus_per_node``.
        gcs_port: GCS port; None picks a free one.
        object_store_mb: object store per node in MiB (None: start.sh default 2048).
        timeout: seconds start.sh waits for every node and the Jobs API.

    Attributes (after start): ``address`` (GCS "ip:port" for ``ray.init(address=...)``),
    ``dashboard_url`` ("http://127.0.0.1:PORT", for JobSubmissionClient / RAY_ADDRESS
    of ``ray job submit``), ``head_ip``, ``worker_ips``, ``state_dir``, ``auth_mode``.
    """

    def __init__(
        self,
        num_workers: int = 1,
        cpus_per_node: int = 1,
        dashboard_port: int | None = None,
        state_dir: str | os.PathLike | None = None,
        *,
        head_cpus: int | None = None,
        gcs_port: int | None = None,
        object_store_mb: int | None = None,
        timeout: float = 180,
    ) -> None:
        if int(cpus_per_node) != cpus_per_node or (
            head_cpus is not None and int(head_cpus) != head_cpus
        ):
            raise ValueError("ray start --num-cpus takes whole CPUs per node")
        self.num_workers = int(num_workers)
        self.cpus_per_node = int(cpus_per_node)
        self.head_cpus = int(cpus_per_node if head_cpus is None else head_cpus)
        self.dashboard_port = dashboard_port
        self.gcs_port = gcs_port
        self.object_store_mb = object_store_mb
        self.timeout = timeout
        self._own_state_dir = state_dir is None
        self._state_dir_arg = state_dir
        self.state_dir: Path | None = None
        self.address: str | None = None
        self.dashboard_url: str | None = None
        self.head_ip: str | None = None
        self.auth_mode: str | None = None
        self.start_output = ""
        self._running = False

    @property
    def worker_ips(self) -> list[str]:
        return [f"127.0.0.{i + 2}" for i in range(self.num_workers)]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("SEGRAY_RAY", _ray_cli())
        env.setdefault("SEGRAY_PYTHON", sys.executable)
        return env

    def start(self) -> "LocalCluster":
        if self._running:
            raise RuntimeError("LocalCluster already started")
        if self._own_state_dir:
            # Short: Ray's unix socket paths live under it (108-byte limit).
            self.state_dir = Path(tempfile.mkdtemp(prefix="sgc-", dir="/tmp"))
        else:
            self.state_dir = Path(self._state_dir_arg).resolve()
        cmd = [
            "bash", str(scripts_dir() / "start.sh"),
            "--state-dir", str(self.state_dir),
            "--workers", str(self.num_workers),
            "--head-cpus", str(self.head_cpus),
            "--worker-cpus", str(self.cpus_per_node),
            "--gcs-port", "auto" if self.gcs_port is None else str(self.gcs_port),
            "--dashboard-port",
            "auto" if self.dashboard_port is None else str(self.dashboard_port),
            "--timeout", str(int(self.timeout)),
        ]
        if self.object_store_mb is not None:
            cmd += ["--object-store-mb", str(self.object_store_mb)]
        self._running = True  # from here on, stop() must run whatever happens
        atexit.register(self.stop)
        try:
            proc = subprocess.run(
                cmd, env=self._env(), stdin=subprocess.DEVNULL, capture_output=True,
                text=True, timeout=self.timeout + 120,
            )
            self.start_output = proc.stdout + proc.stderr
            if proc.returncode != 0:
                raise RuntimeError(
                    f"start.sh failed (rc={proc.returncode}):\n{self.start_output[-6000:]}"
                )
            info = self._read_env()
            self.address = info["SEGRAY_GCS_ADDRESS"]
            self.dashboard_url = info["SEGRAY_DASHBOARD_URL"]
            self.head_ip = info["SEGRAY_HEAD_IP"]
            self.auth_mode = info.get("RAY_AUTH_MODE")
        except BaseException:
            self.stop()
            raise
        return self

    def _read_env(self) -> dict[str, str]:
        out = {}
        for line in (self.state_dir / "cluster.env").read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                out[k.strip()] = v.strip()
        return out

    def pids(self) -> list[int]:
        """PIDs of the cluster's live processes (every node's session), zombies excluded."""
        if self.state_dir is None:
            return []
        sids = set()
        for f in self.state_dir.glob("*.sid"):
            try:
                sids.add(int(f.read_text().strip()))
            except ValueError:
                pass
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                # fields after the ")" of comm: state ppid pgrp session ...
                state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
            except (OSError, ValueError, IndexError):
                continue
            if int(session) in sids and state != "Z":
                found.append(int(d.name))
        return found

    def stop(self) -> None:
        """Tear the cluster down (idempotent). Raises if processes survive."""
        if not self._running:
            return
        self._running = False
        try:
            atexit.unregister(self.stop)
        except Exception:  # pragma: no cover
            pass
        if self.state_dir is None or not self.state_dir.exists():
            return
        proc = subprocess.run(
            ["bash", str(scripts_dir() / "stop.sh"), "--state-dir", str(self.state_dir)],
            env=self._env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"stop.sh failed:\n{proc.stdout}{proc.stderr}")
        if self._own_state_dir and os.environ.get("SEGRAY_KEEP_CLUSTER_DIR") != "1":
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"LocalCluster(workers={self.num_workers}, address={self.address!r}, "
            f"dashboard_url={self.dashboard_url!r}, state_dir={str(self.state_dir)!r})"
        )
