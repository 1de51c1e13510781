"""Filesystems for any fsspec URL (local path, file://, s3://, gs://); path names; small reads and writes.

Listing what a source names is :mod:`segray.io.sources`.

S3-compatible endpoints (SeaweedFS, MinIO, Ceph) come from ``StorageOptions`` or, when no
endpoint is configured, from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` so a cluster job
can be pointed at storage through its environment alone.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from segray.config import StorageOptions

S3_SCHEMES = ("s3", "s3a")


@dataclass(frozen=True, slots=True)  # slots: archive listings hold a million of them
class Sample:
    image: str  # the URL to open (surrogate-escaped where a local name is not UTF-8)
    mask: Optional[str]
    image_id: str  # readable (see readable_path)
    # A scene made of several files (a STAC item's assets): ``image`` is what GDAL opens (a VRT),
    # ``source`` the item's href, the row key; ``error`` says why it cannot be read ("kind: msg"),
    # ``version`` what changes when it does (the nightly runs' key).
    source: Optional[str] = None
    error: Optional[str] = None
    version: Optional[str] = None

    @property
    def source_path(self) -> str:
        """The row key: the output rows' ``source_path``, valid UTF-8 (see readable_path)."""
        return readable_path(self.source or self.image)


# --------------------------------------------------------------------------- filesystems


def scheme_of(url: str) -> str:
    """'s3' for s3://b/k, 'file' for local paths and file:// URLs."""
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def _endpoint(storage: StorageOptions | None) -> Optional[str]:
    if storage is not None and storage.endpoint_url:
        return storage.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def fsspec_options(url: str, storage: StorageOptions | None) -> dict:
    """Keyword options for ``fsspec.filesystem``/``fsspec.open`` on ``url``; {} if none apply."""
    if scheme_of(url) not in S3_SCHEMES:
        return {}
    opts: dict = {}
    client: dict = {}
    if storage is not None:
        if storage.key:
            opts["key"] = storage.key
        if storage.secret:
            opts["secret"] = storage.secret
        if storage.region:
            client["region_name"] = storage.region
    endpoint = _endpoint(storage)
    if endpoint:
        client["endpoint_url"] = endpoint
    if client:
        opts["client_kwargs"] = client
    return opts


def get_fs(url: str, storage: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without scheme) for ``url``."""
    opts = fsspec_options(url, storage)
    if scheme_of(url) != "file":
        # Listings are cached per instance by default; files written by Ray workers or other
        # clients would then be invisible to later exists()/listing calls on the driver.
        opts["use_listings_cache"] = False
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs, path


def pyarrow_fs(url: str, storage: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path without scheme) for ``url``, for pyarrow.dataset and Ray Data
    (``ds.write_parquet(path, filesystem=fs)``).

    S3 uses Arrow's native S3FileSystem (C++ I/O, picklable into Ray tasks; verified against
    SeaweedFS with Ray's write_parquet/read_parquet); other remote schemes wrap their fsspec
    filesystem.
    """
    scheme = scheme_of(url)
    if scheme == "file":
        fs, path = get_fs(url, storage)
        return pafs.LocalFileSystem(), path
    if scheme in S3_SCHEMES:
        kwargs: dict = {}
        if storage is not None and storage.key and storage.secret:
            kwargs.update(access_key=storage.key, secret_key=storage.secret)
        path = url.split("://", 1)[1].rstrip("/")
        region = (storage.region if storage else None) or os.environ.get("AWS_REGION")
        region = region or os.environ.get("AWS_DEFAULT_REGION")
        endpoint = _endpoint(storage)
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs.update(endpoint_override=parsed.netloc + parsed.path.rstrip("/"), scheme=parsed.scheme)
            region = region or "us-east-1"  # custom endpoints ignore it; Arrow must not ask AWS
        elif not region:
            try:  # on AWS a wrong region fails every request; ask once where the bucket lives
                region = pafs.resolve_s3_region(path.split("/", 1)[0])
            except OSError:
                pass
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), path
    fs, path = get_fs(url, storage)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(url: str, *parts: str) -> str:
    """Join with '/', whatever the scheme: join('s3://b/out', 'x.parquet') -> 's3://b/out/x.parquet'."""
    out = url.rstrip("/") if url.rstrip("/") else url
    for p in parts:
        p = p.strip("/")
        if p:
            out = f"{out}/{p}" if not out.endswith("/") else out + p
    return out


# --------------------------------------------------------------------------- path names

# A local file name is bytes; Python lists names that are not valid UTF-8 as str with surrogate
# escapes ("scene_\udcff.png"), which open() takes but Arrow strings cannot hold. Rows therefore
# carry a readable form (the invalid bytes as backslash escapes) plus the raw bytes when, and
# only when, the name is not valid UTF-8: lossless, and the readable form is the row key.


def path_bytes(path: str | bytes) -> bytes | None:
    """The exact bytes of ``path`` when they are not valid UTF-8, else None."""
    if isinstance(path, str) and path.isascii():  # the common case, and 1M-row listings: no encode
        return None
    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    return None


def readable_path(path: str | bytes) -> str:
    """``path`` as valid UTF-8 text: bytes that are not UTF-8 written as ``\\xff`` escapes."""
    if isinstance(path, str):
        if path.isascii():  # no surrogates, nothing to escape
            return path
        try:
            return os.fsencode(path).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
            return path.encode("utf-8", "backslashreplace").decode("utf-8")
    return path.decode("utf-8", "backslashreplace")


def real_path(readable: str, raw: bytes | None) -> str:
    """The path to open again from a row's readable form and raw bytes (surrogate-escaped str)."""
    return os.fsdecode(raw) if isinstance(raw, bytes) and raw else readable


def to_url(url: str, path: str) -> str:
    """Rebuild a URL with the scheme of ``url`` around a filesystem ``path``."""
    if "://" not in url:
        return path
    return f"{url.split('://', 1)[0]}://{path}"  # file:// + /abs/path -> file:///abs/path


def read_bytes(url: str, storage: StorageOptions | None = None) -> bytes:
    fs, path = get_fs(url, storage)
    return fs.cat_file(path)


def write_bytes(url: str, data: bytes, storage: StorageOptions | None = None) -> None:
    fs, path = get_fs(url, storage)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def exists(url: str, storage: StorageOptions | None = None) -> bool:
    fs, path = get_fs(url, storage)
    return fs.exists(path)


def remove_tree(url: str, storage: StorageOptions | None = None) -> None:
    """Delete a file or folder tree (overwrite); no error if absent."""
    fs, path = get_fs(url, storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    if scheme_of(url) in S3_SCHEMES:
        _prune_s3_dirs(fs, path)


def _prune_s3_dirs(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete leftover 'dir/' objects under ``path``, deepest first.

    Arrow's S3 writer creates such markers, and SeaweedFS keeps every implicit folder as an
    empty directory after its objects are deleted, so exists(path) would stay True.
    """
    dirs: list[str] = []
    stack = [path.rstrip("/")]
    while stack:
        d = stack.pop()
        try:
            entries = fs.ls(d, detail=True)
        except FileNotFoundError:
            continue
        dirs.append(d)
        stack.extend(e["name"].rstrip("/") for e in entries if e["type"] == "directory")
    for d in sorted(dirs, key=len, reverse=True):
        bucket, _, key = d.partition("/")
        if key:
            fs.call_s3("delete_object", Bucket=bucket, Key=key + "/")
