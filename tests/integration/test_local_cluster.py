"""A real multi-node Ray cluster on one machine (cluster/local/start.sh via LocalCluster).

Head + 1 worker node (127.0.0.2), each its own `ray start` with its own temp dir; tasks
pinned by the per-node custom resources run on the node they name; the Jobs API answers
on the dashboard; teardown leaves no process of the cluster behind.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil
import pytest

from segray.testing.cluster import LocalCluster

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _procs_naming(state_dir: Path) -> list[int]:
    """Live processes whose command line mentions the cluster's state dir."""
    needle = str(state_dir)
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and needle in " ".join(p.info["cmdline"] or []):
                found.append(p.info["pid"])
        except psutil.Error:
            pass
    return found


@pytest.fixture
def no_local_ray():
    """Shut down the session's local Ray (tests/conftest.py) for this test, restart it after."""
    import ray

    was = ray.is_initialized()
    if was:
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()
    conftest = sys.modules.get("conftest")
    if was and hasattr(conftest, "_start_local_ray"):
        conftest._start_local_ray()


def test_two_node_cluster_places_tasks_and_tears_down(no_local_ray):
    import ray
    from ray.job_submission import JobSubmissionClient, JobType

    t0 = time.monotonic()
    cluster = LocalCluster(num_workers=1, cpus_per_node=1)
    with cluster:
        started = time.monotonic() - t0
        state_dir = cluster.state_dir
        assert cluster.address and cluster.dashboard_url == cluster.dashboard_url.rstrip("/")
        assert cluster.dashboard_url.startswith("http://127.0.0.1:")
        assert cluster.worker_ips == ["127.0.0.2"]

        raylets = [p for p in cluster.pids() if psutil.Process(p).name() == "raylet"]
        assert len(raylets) == 2, "one raylet per node"

        # The Jobs API answers at dashboard_url: no submitted job yet (start.sh's readiness
        # check shows up as a finished DRIVER job).
        jobs = JobSubmissionClient(cluster.dashboard_url).list_jobs()
        assert [j for j in jobs if j.type == JobType.SUBMISSION] == []

        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        try:
            nodes = [n for n in ray.nodes() if n["Alive"]]
            assert len(nodes) == 2
            by_ip = {n["NodeManagerAddress"]: n for n in nodes}
            assert len(by_ip) == 2, "distinct node IPs"
            # Ray maps 127.0.0.1 to the machine's own IP for the head (see README);
            # the worker keeps its loopback address.
            assert set(by_ip) == {cluster.head_ip, "127.0.0.2"}
            head, worker = by_ip[cluster.head_ip], by_ip["127.0.0.2"]
            assert head["Resources"].get("segray_head") == 1 and head["Resources"]["CPU"] == 1
            assert worker["Resources"].get("segray_worker") == 1
            assert worker["Resources"].get("segray_worker1") == 1 and worker["Resources"]["CPU"] == 1

            @ray.remote(num_cpus=0.25)
            def where():
                return ray.get_runtime_context().get_node_id()

            on_worker = [where.options(resources={"segray_worker1": 0.01}).remote() for _ in range(4)]
            on_head = [where.options(resources={"segray_head": 0.01}).remote() for _ in range(4)]
            assert set(ray.get(on_worker, timeout=120)) == {worker["NodeID"]}
            assert set(ray.get(on_head, timeout=120)) == {head["NodeID"]}
        finally:
            ray.shutdown()

        # A submitted job's driver runs on the cluster with the cluster's python and sees
        # both nodes (`python` resolves to the interpreter running Ray; cwd is the state dir).
        client = JobSubmissionClient(cluster.dashboard_url)
        job = client.submit_job(
            entrypoint="python -c 'import ray; ray.init(); "
            "print(\"NODES\", sum(n[\"Alive\"] for n in ray.nodes()))'"
        )
        deadline = time.monotonic() + 120
        while (status := client.get_job_status(job)) not in {"SUCCEEDED", "FAILED", "STOPPED"}:
            assert time.monotonic() < deadline, f"job still {status}"
            time.sleep(0.5)
        logs = client.get_job_logs(job)
        assert status == "SUCCEEDED", logs[-2000:]
        assert "NODES 2" in logs
    stopped = time.monotonic() - t0 - started
    print(f"\nLocalCluster: start {started:.1f}s, tasks+stop {stopped:.1f}s")

    assert not _alive(raylets), "raylets survived teardown"
    assert not cluster.pids()
    assert not _procs_naming(state_dir), "processes of the cluster survived teardown"
    assert not state_dir.exists(), "own state dir removed"
    cluster.stop()  # idempotent


def test_start_failure_raises_and_cleans_up():
    """A start that cannot succeed (busy dashboard port) raises and leaves nothing behind."""
    import socket

    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cluster = LocalCluster(num_workers=1, dashboard_port=port)
        with pytest.raises(RuntimeError, match="in use"):
            with cluster:
                pass
    assert not cluster.pids()
    assert not cluster.state_dir.exists()
