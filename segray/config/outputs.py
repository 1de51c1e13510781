"""Table outputs: an Apache Iceberg table (``table:`` of ``segray infer`` and ``segray nightly``).

The rows of a run go to the table instead of a Parquet folder; its commits are the table's own
snapshots (segray/infer/iceberg.py). The catalog is PyIceberg's: ``sql`` (SQLAlchemy: a SQLite
file for one machine and tests, PostgreSQL for a team) or ``rest`` (an Iceberg REST catalog:
Polaris, Nessie, Lakekeeper, Gravitino, AWS Glue / S3 Tables, Unity Catalog; what Spark, Trino
and DuckDB share in production). Object-storage credentials come from the job's ``storage``
section, else the usual ``AWS_*`` variables; ``catalog.properties`` passes anything else.
"""

from __future__ import annotations

import os
import re
from typing import Literal, Mapping, Optional

from pydantic import Field, field_validator, model_validator

from segray.config.base import _Strict
from segray.config.data import StorageOptions

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# PyIceberg's FileIO properties for S3 (pyarrow's S3FileSystem or s3fs read them alike).
S3_PROPS = {"endpoint_url": "s3.endpoint", "key": "s3.access-key-id", "secret": "s3.secret-access-key",
            "region": "s3.region"}
# ... and the AWS_* variables that stand in for each when the storage section leaves it out.
AWS_ENV = {"endpoint_url": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"), "key": ("AWS_ACCESS_KEY_ID",),
           "secret": ("AWS_SECRET_ACCESS_KEY",), "region": ("AWS_REGION", "AWS_DEFAULT_REGION")}


class IcebergCatalogConfig(_Strict):
    """The PyIceberg catalog the table lives in (``pyiceberg.catalog.load_catalog``)."""

    name: str = Field(default="segray", description="the catalog's name (a SQL catalog's rows are keyed by it)")
    type: Literal["sql", "rest"] = Field(default="sql", description="sql (SQLite/PostgreSQL) or rest")
    uri: str = Field(description="sql: a SQLAlchemy URL (sqlite:////abs/path/catalog.db, postgresql+psycopg2://...); "
                     "rest: the catalog's http(s):// endpoint")
    warehouse: Optional[str] = Field(
        default=None, description="where new tables' files go: a local folder or s3://bucket/prefix (sql: required; "
        "rest: the warehouse name or location the server expects, if any)")
    properties: dict[str, str] = Field(
        default_factory=dict, description="more catalog/FileIO properties, passed as they are (rest: credential, "
        "token, scope, oauth2-server-uri, header.*; s3.*: see PyIceberg's FileIO docs); they win over storage")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r}: letters, digits and _ only")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "IcebergCatalogConfig":
        uri = self.uri.strip()
        if self.type == "sql":
            if uri.startswith(("http://", "https://")) or "://" not in uri and not uri.startswith("sqlite:"):
                raise ValueError(f"uri: a sql catalog takes a SQLAlchemy URL (sqlite:///..., postgresql+psycopg2://...),"
                                 f" got {uri!r} (type: rest for an http endpoint)")
            if not self.warehouse:
                raise ValueError("warehouse: a sql catalog needs one (a local folder or s3://bucket/prefix)")
        elif not uri.startswith(("http://", "https://")):
            raise ValueError(f"uri: a rest catalog takes an http(s):// endpoint, got {uri!r}")
        return self

    def sqlite_path(self) -> Optional[str]:
        """The SQLite file of a ``sqlite:///`` catalog (its folder must exist before PyIceberg opens it)."""
        if self.type != "sql" or not self.uri.startswith("sqlite:///"):
            return None
        path = self.uri[len("sqlite:///"):]
        return None if path in ("", ":memory:") else path


class IcebergTableConfig(_Strict):
    """An Iceberg table for a run's rows, upserted by ``source_path``: one row per image."""

    identifier: str = Field(description="namespace.table (nested namespaces: a.b.table); created when missing")
    catalog: IcebergCatalogConfig
    properties: dict[str, str] = Field(
        default_factory=dict, description="table properties set when segray creates the table "
        "(e.g. write.parquet.compression-codec: zstd)")

    @field_validator("identifier")
    @classmethod
    def _identifier(cls, v: str) -> str:
        parts = v.split(".")
        if len(parts) < 2 or not all(_NAME.match(p) for p in parts):
            raise ValueError(f"{v!r}: give namespace.table (names of letters, digits and _)")
        return v

    @property
    def namespace(self) -> tuple[str, ...]:
        return tuple(self.identifier.split(".")[:-1])

    def catalog_kwargs(self, storage: StorageOptions | None = None,
                       env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The ``load_catalog`` properties (``name`` included, as Ray's ``write_iceberg`` takes them):
        type, uri, warehouse (a local folder becomes a ``file://`` URI), the S3 FileIO properties
        from ``storage`` or the ``AWS_*`` variables of ``env`` (default: this process's), then
        ``catalog.properties``. They travel with the table's FileIO to Ray's write tasks, whose
        processes do not see the driver's environment."""
        env = os.environ if env is None else env
        c = self.catalog
        out: dict[str, str] = {"name": c.name, "type": c.type, "uri": c.uri}
        if c.warehouse:
            w = c.warehouse
            out["warehouse"] = w if "://" in w else "file://" + os.path.abspath(os.path.expanduser(w))
        for field, prop in S3_PROPS.items():
            value = getattr(storage, field, None) if storage is not None else None
            if not value:
                value = next((env[v] for v in AWS_ENV[field] if env.get(v)), None)
            if value:
                out[prop] = str(value)
        if "s3.endpoint" in out and "s3.region" not in out:
            out["s3.region"] = "us-east-1"  # S3-compatible servers: spare the client a region lookup
        out.update(c.properties)
        return out
