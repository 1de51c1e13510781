"""Checks that need no cluster, run before Ray starts (segray's fail-fast rule).

Each check raises :class:`PreflightError` (a ``ConfigError``) whose message is one line naming
the config field or the path: ``source.images: s3://bucket/imgs does not exist``,
``storage.endpoint_url: http://127.0.0.1:9 does not answer (connection refused)``,
``checkpoint: /x/best.pt not found``. The CLI prints it and exits 2.

Object storage is probed once per (endpoint, credentials, bucket) with a short connect
timeout and no retries, so a dead endpoint or missing credentials fail in about a second
instead of after botocore's retries; the job's own clients keep their usual settings.

Pure functions over fsspec/pyarrow/botocore: no Ray, nothing from ``infer`` or ``train`` (a job
passes what it knows, e.g. how its outputs are committed, as arguments).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Callable, Optional
from urllib.parse import urlparse

from segray.config import ConfigError, SourceConfig, StacSourceConfig, StorageOptions
from segray.io.fs import S3_SCHEMES, get_fs, join, scheme_of, to_url

__all__ = [
    "PreflightError", "check_bands", "check_checkpoint", "check_exists", "check_output", "check_source",
    "check_storage", "check_writable", "first_image", "image_bands", "reset_probe_cache",
]

CONNECT_TIMEOUT_S = 1.5
READ_TIMEOUT_S = 3.0


class PreflightError(ConfigError):
    """A check before any cluster work failed; the message is one line naming the field or path."""


def _local(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _prefix(field: str) -> str:
    """'data.storage' for field 'data.source.images' in a train config; 'storage' at the top."""
    return "data.storage" if field.startswith("data.") else "storage"


# --------------------------------------------------------------------------- object storage

_probed: dict[tuple, None] = {}


def reset_probe_cache() -> None:
    _probed.clear()


def _endpoint(storage: StorageOptions | None, field: str) -> tuple[Optional[str], str]:
    """(endpoint URL or None, the field or variable that named it)."""
    if storage is not None and storage.endpoint_url:
        return storage.endpoint_url, f"{_prefix(field)}.endpoint_url"
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var], var
    return None, "s3 endpoint"


def _reason(exc: BaseException) -> str:
    """A short why: 'connection refused', 'timed out', 'unknown host', else the error's first line."""
    parts, seen = [], exc
    for _ in range(4):  # botocore keeps the socket error in kwargs['error'], others chain it
        if seen is None:
            break
        parts.append(f"{type(seen).__name__}: {seen}")
        seen = (getattr(seen, "kwargs", None) or {}).get("error") or seen.__cause__ or seen.__context__
    text = " | ".join(parts)
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    if "timed out" in low or "timeout" in low:
        return "timed out"
    if "name or service not known" in low or "nodename nor servname" in low or "getaddrinfo" in low:
        return "unknown host"
    return parts[0].splitlines()[0][:200]


def check_storage(url: str, storage: StorageOptions | None = None, field: str = "storage") -> None:
    """For an s3:// URL: the endpoint answers, credentials are found and accepted, the bucket
    exists. One HEAD request (cached per endpoint, key and bucket); other URLs pass."""
    if scheme_of(url) not in S3_SCHEMES:
        return
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    bucket = url.split("://", 1)[1].split("/", 1)[0]
    endpoint, named_by = _endpoint(storage, field)
    key = storage.key if storage is not None else None
    secret = storage.secret if storage is not None else None
    region = (storage.region if storage is not None else None) or os.environ.get("AWS_REGION") \
        or os.environ.get("AWS_DEFAULT_REGION") or ("us-east-1" if endpoint else None)
    cache_key = (endpoint, key, region, bucket)
    if cache_key in _probed:
        return
    if not bucket:
        raise PreflightError(f"{field}: {url} names no bucket")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if not parsed.hostname:
            raise PreflightError(f"{named_by}: {endpoint} is not a URL")
    session = botocore.session.get_session()
    client = session.create_client(
        "s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=key, aws_secret_access_key=secret,
        config=Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                      retries={"max_attempts": 0, "mode": "standard"}, s3={"addressing_style": "path"}
                      if endpoint else None))
    where = f"{url} (endpoint {endpoint})" if endpoint else url
    try:
        client.head_bucket(Bucket=bucket)
    except (NoCredentialsError, PartialCredentialsError):
        raise PreflightError(f"{_prefix(field)}.key: no credentials for {where} (set {_prefix(field)}.key and "
                             "secret, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)") from None
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as exc:
        raise PreflightError(f"{named_by}: {endpoint or 'AWS S3'} does not answer ({_reason(exc)})") from None
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "")) or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise PreflightError(f"{field}: {url} does not exist (no bucket {bucket!r} at "
                                 f"{endpoint or 'AWS S3'})") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"):
            raise PreflightError(f"{_prefix(field)}.key: access to {where} denied ({code}: check the key "
                                 "and secret)") from None
        raise PreflightError(f"{field}: {where}: {code or _reason(exc)}") from None
    except Exception as exc:  # urllib3/socket errors botocore does not wrap
        raise PreflightError(f"{named_by}: {endpoint or 'AWS S3'} does not answer ({_reason(exc)})") from None
    _probed[cache_key] = None


# --------------------------------------------------------------------------- paths


def _fs_call(fn: Callable, url: str, field: str):
    """A filesystem call whose failure becomes one line naming the field."""
    try:
        return fn()
    except PreflightError:
        raise
    except PermissionError:
        raise PreflightError(f"{field}: {url}: permission denied") from None
    except FileNotFoundError:
        raise PreflightError(f"{field}: {url} does not exist") from None
    except OSError as exc:
        raise PreflightError(f"{field}: {url}: {_reason(exc)}") from None


def check_exists(url: str, storage: StorageOptions | None = None, field: str = "path", what: str = "") -> None:
    """``url`` exists (a file or a folder)."""
    check_storage(url, storage, field)
    fs, path = get_fs(url, storage)
    if not _fs_call(lambda: fs.exists(path), url, field):
        raise PreflightError(f"{field}: {url} {'not found' if what == 'file' else 'does not exist'}")


def _first_in_folder(fs, root: str, exts: set[str], budget: int = 50) -> Optional[str]:
    """The first file (by name) with one of ``exts`` under ``root``, walking folders depth first
    (a few listings, not the whole tree)."""
    stack = [root.rstrip("/")]
    while stack and budget > 0:
        budget -= 1
        folder = stack.pop()
        entries = sorted(fs.ls(folder, detail=True), key=lambda e: e["name"])
        for e in entries:
            name = e["name"].rstrip("/")
            if e.get("type") == "file" and posixpath.splitext(name)[1].lower() in exts:
                return name
        stack.extend(reversed([e["name"].rstrip("/") for e in entries if e.get("type") == "directory"]))
    return None


def first_image(source: SourceConfig, storage: StorageOptions | None = None, field: str = "source") -> str:
    """The URL of one image ``source`` names (checks that it exists and lists), without listing
    everything: a folder is walked until its first image, a glob's first match, a manifest's
    first row."""
    from segray.io.sources import LISTERS, first_url, image_extensions, source_kind

    kind = source_kind(source)
    if kind == "stac":
        return first_scene(source.stac, storage, f"{field}.stac")
    url = getattr(source, kind)
    fld = f"{field}.{kind}"
    check_storage(url, storage, fld)
    fs, path = get_fs(url, storage)
    if kind == "images":
        if not _fs_call(lambda: fs.exists(path), url, fld):
            raise PreflightError(f"{fld}: {url} does not exist")
        if _fs_call(lambda: fs.isfile(path), url, fld):
            raise PreflightError(f"{fld}: {url} is a file, not a folder (use glob or manifest for single files)")
        found = _fs_call(lambda: _first_in_folder(fs, path, image_extensions(source)), url, fld)
        if found is None:
            raise PreflightError(f"{fld}: no images with extensions {sorted(image_extensions(source))} under {url}")
        return to_url(url, found)
    if kind == "manifest" and not _fs_call(lambda: fs.exists(path), url, fld):
        raise PreflightError(f"{fld}: {url} not found")
    try:
        rows = LISTERS[kind](source, storage, head=1)  # a manifest's first row, not all of it
    except PreflightError:
        raise
    except FileNotFoundError as exc:
        raise PreflightError(f"{fld}: {exc}") from None
    except PermissionError:
        raise PreflightError(f"{fld}: {url}: permission denied") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise PreflightError(f"{fld}: {url}: {_reason(exc)}") from None
    if not rows.num_rows:
        raise PreflightError(f"{fld}: {url} names no images")
    return first_url(rows)


def first_scene(stac: StacSourceConfig, storage: StorageOptions | None, field: str) -> str:
    """The catalog exists or the API answers, and the selection names items; returns the first
    readable item's scene (its VRT), or "" when every item is bad (those become error rows)."""
    from segray.io.stac import stac_samples

    if stac.catalog:
        check_storage(stac.catalog, storage, f"{field}.catalog")
        fs, path = get_fs(stac.catalog, storage)
        if not _fs_call(lambda: fs.exists(path), stac.catalog, f"{field}.catalog"):
            raise PreflightError(f"{field}.catalog: {stac.catalog} not found")
    where = f"{field}.catalog" if stac.catalog else f"{field}.api"
    probe = stac.model_copy(update={"max_items": min(stac.max_items or 20, 20)})  # a few items' headers
    try:
        samples = stac_samples(probe, storage)
    except Exception as exc:  # an API that does not answer, a catalog that is no STAC
        raise PreflightError(f"{where}: {stac.catalog or stac.api}: {_reason(exc)}") from None
    if not samples:
        raise PreflightError(f"{where}: the search names no items ({stac.catalog or stac.api})")
    return next((s.image for s in samples if not s.error), "")


def check_source(source: SourceConfig, storage: StorageOptions | None = None, field: str = "source") -> str:
    """The source exists and lists (one image found), its masks folder exists; returns that image's URL."""
    image = first_image(source, storage, field)
    if source.masks:
        check_exists(source.masks, storage, f"{field}.masks")
    return image


def image_bands(url: str, storage: StorageOptions | None = None, field: str = "source") -> int:
    """The band count in ``url``'s header (GeoTIFF/COG through GDAL, others through Pillow)."""
    from segray.io.raster import is_inline_vrt

    if posixpath.splitext(url)[1].lower() in (".tif", ".tiff") or url.lower().endswith((".vrt", ".jp2")) \
            or is_inline_vrt(url):  # a STAC item's scene
        from segray.io.raster import gdal_env, read_headers

        info = read_headers([url], gdal_env(storage), threads=1)[0]
        if isinstance(info, Exception):
            raise PreflightError(f"{field}: {url} does not open ({_reason(info)})")
        return info.count
    from segray.io.images import image_size
    from segray.io.fs import read_bytes

    try:
        data = _fs_call(lambda: read_bytes(url, storage), url, field)
        return image_size(data, url)[2]
    except PreflightError:
        raise
    except Exception as exc:  # a file that is no image: the message says what it is
        raise PreflightError(f"{field}: {url} is not a readable image ({str(exc).splitlines()[0][:200]})") from None


def _shown(image: str) -> str:
    from segray.io.raster import is_inline_vrt

    return "each item (its assets)" if is_inline_vrt(image) else image


def check_bands(count: int, image: str, in_channels: int, bands: list[int] | None, field: str = "source",
                bands_field: str | None = "bands", what: str = "the model") -> None:
    """``image`` (with ``count`` bands) gives ``in_channels`` bands, through ``bands`` (0-based) if set."""
    if bands:
        label = bands_field or "checkpoint"  # None: the selection is the checkpoint's own
        bad = [b for b in bands if b >= count or b < 0]
        if bad:
            raise PreflightError(f"{label}: band {bad[0]} selected (0-based), but {_shown(image)} has {count} bands")
        if len(bands) != in_channels:
            raise PreflightError(f"{label}: {len(bands)} bands selected, {what} takes {in_channels}")
        return
    if count != in_channels:
        hint = f" (select {in_channels} with {bands_field})" if bands_field and count > in_channels else ""
        raise PreflightError(f"{field}: {_shown(image)} has {count} bands, {what} takes {in_channels}{hint}")


# --------------------------------------------------------------------------- checkpoints


def check_checkpoint(url: str, storage: StorageOptions | None = None, field: str = "checkpoint"):
    """The checkpoint (a ``.pt`` file, a folder holding ``checkpoint.pt``, a committed run) exists and loads;
    returns it (a ``segray.core.checkpoint.Checkpoint``)."""
    from segray.core.checkpoint import Checkpoint
    from segray.io.commit import resolve_checkpoint

    check_storage(url, storage, field)
    path_url = resolve_checkpoint(url, storage)  # the same file the job will open
    fs, path = get_fs(path_url, storage)
    if not _fs_call(lambda: fs.exists(path), path_url, field):
        raise PreflightError(f"{field}: {path_url} not found")
    data = _fs_call(lambda: fs.cat_file(path), path_url, field)
    try:
        return Checkpoint.load(data)
    except ValueError as exc:  # a torch file, but not a segray checkpoint
        raise PreflightError(f"{field}: {path_url} does not load ({str(exc).splitlines()[0][:200]})") from None
    except Exception as exc:  # torch's unpickling errors: not a (complete) torch.save file
        text = str(exc)
        if "Weights only load failed" in text:  # torch's long advice; what it found is further down
            found = [ln.strip() for ln in text.split("WeightsUnpickler error:", 1)[-1].splitlines() if ln.strip()]
            text = found[0] if found else type(exc).__name__
        raise PreflightError(f"{field}: {path_url} does not load (not a torch checkpoint file, or a truncated "
                             f"one: {text.splitlines()[0][:120]})") from None


# --------------------------------------------------------------------------- outputs


def _local_writable(path: str, field: str, url: str) -> None:
    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise PreflightError(f"{field}: {url} is not writable ({probe} is a file)")
    name = os.path.join(probe, f".segray-probe-{uuid.uuid4().hex[:8]}")
    try:
        with open(name, "wb"):
            pass
        os.unlink(name)
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or _reason(exc)).lower()
        raise PreflightError(f"{field}: {url} is not writable (cannot create files in {probe}: {reason})") from None


def check_writable(url: str, storage: StorageOptions | None = None, field: str = "output") -> None:
    """``url`` (a folder, existing or not) can be written: a local probe file in its nearest
    existing folder; on object storage one small object under it, deleted again."""
    check_storage(url, storage, field)
    scheme = scheme_of(url)
    if scheme == "file":
        _local_writable(_local(url), field, url)
        return
    fs, path = get_fs(url, storage)
    probe = posixpath.join(path.rstrip("/"), f".segray-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except PermissionError:
        raise PreflightError(f"{field}: {url} is not writable (access denied)") from None
    except OSError as exc:
        raise PreflightError(f"{field}: {url} is not writable ({_reason(exc)})") from None


def default_committed(output: str, storage: StorageOptions | None = None) -> bool:
    """Whether ``output`` holds a committed result: its ``_SUCCESS``."""
    fs, path = get_fs(join(output, "_SUCCESS"), storage)
    return fs.exists(path)


def check_output(url: str, storage: StorageOptions | None = None, overwrite: bool = False, field: str = "output",
                 resume: bool = False, committed: Callable[[str, Optional[StorageOptions]], bool] | None = None,
                 in_the_way: tuple[str, ...] = ("predictions",)) -> None:
    """The output can be written and holds nothing this run would clash with.

    ``overwrite``: anything there is replaced (it need not exist). Otherwise a committed output
    (``committed(url, storage)``, default: ``<url>/_SUCCESS`` exists) is refused, and so is an
    uncommitted one (any of ``in_the_way`` below it exists), unless ``resume`` (which keeps
    both: a committed result is then the answer, an uncommitted one is carried on).
    """
    check_storage(url, storage, field)
    if not overwrite:
        is_committed = _fs_call(lambda: (committed or default_committed)(url, storage), url, field)
        if is_committed and not resume:
            raise PreflightError(f"{field}: {url} already holds a committed result (set overwrite=true to "
                                 "replace it)")
        if not resume and not is_committed:
            for name in in_the_way:
                fs, path = get_fs(join(url, name), storage)
                if _fs_call(lambda: fs.exists(path), url, field):
                    raise PreflightError(f"{field}: {join(url, name)} already exists (set overwrite=true to "
                                         "replace it, or resume=true to keep what it holds)")
    check_writable(url, storage, field)
