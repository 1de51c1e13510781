"""A real STAC API (stac-fastapi-geoparquet, uvicorn) on 127.0.0.1 for tests.

Items live in one stac-geoparquet file, which the server reads on every search: ``publish``
rewrites it, so a test changes the archive between two runs without restarting the server.
DuckDB's extensions come packaged (rustac-duckdb-extensions): nothing is downloaded.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import rustac

_SERVE = """
import sys
import rustac, rustac_duckdb_extensions, uvicorn
from fastapi import FastAPI
from stac_fastapi.api.app import StacApi
from stac_fastapi.geoparquet import api, models
from stac_fastapi.geoparquet.client import Client
from stac_fastapi.geoparquet.settings import Settings

client = rustac.DuckdbClient(extension_directory=str(rustac_duckdb_extensions.extension_directory()),
                             install_extensions=False)
settings = Settings(stac_fastapi_geoparquet_href=sys.argv[1], stac_fastapi_landing_id="segray-test",
                    stac_fastapi_title="segray test archive", stac_fastapi_description="segray tests")
# api.create() passes its state as FastAPI(**extra), which newer FastAPI refuses: the same app, state set after
app = FastAPI(lifespan=api.lifespan, openapi_url=settings.openapi_url, docs_url=settings.docs_url)
app.extra = dict(settings=settings, duckdb_client=client,
                 collections=api.collections_from_geoparquet_href(sys.argv[1], client))
stac = StacApi(settings=settings, client=Client(), app=app, extensions=models.EXTENSIONS,
               search_get_request_model=models.GetSearchRequestModel,
               search_post_request_model=models.PostSearchRequestModel,
               items_get_request_model=models.ItemsGetRequestModel)
uvicorn.run(stac.app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StacServer:
    def __init__(self, folder: Path, items: list):
        self.parquet = folder / "items.parquet"
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.log = folder / "server.log"
        self.publish(items)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def publish(self, items: list) -> None:
        """The archive the server serves from now on (one file, replaced whole)."""
        tmp = self.parquet.with_suffix(".tmp.parquet")
        rustac.write_sync(str(tmp), [i.to_dict(include_self_link=False) for i in items])
        tmp.replace(self.parquet)

    def start(self, timeout: float = 60.0) -> "StacServer":
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(self.parquet), str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"STAC server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"STAC server did not answer within {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
