"""Filesystems for any fsspec URL (local path, file://, s3://, gs://) and driver-side listing.

S3-compatible endpoints (SeaweedFS, MinIO, Ceph) come from ``StorageOptions`` or, when no
endpoint is configured, from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` so a cluster job
can be pointed at storage through its environment alone.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from segray.config import SourceConfig, StorageOptions

_S3 = ("s3", "s3a")
# Extensions a mask may have, beyond source.extensions (masks are often PNG/TIFF next to JPEGs).
_MASK_EXTENSIONS = {".png", ".tif", ".tiff", ".bmp", ".gif", ".jpg", ".jpeg", ".webp", ".jp2"}


@dataclass(frozen=True)
class Sample:
    image: str  # the URL to open (surrogate-escaped where a local name is not UTF-8)
    mask: Optional[str]
    image_id: str  # readable (see readable_path)

    @property
    def source_path(self) -> str:
        """The row key: the output rows' ``source_path``, valid UTF-8 (see readable_path)."""
        return readable_path(self.image)


# --------------------------------------------------------------------------- filesystems


def _scheme(url: str) -> str:
    """'s3' for s3://b/k, 'file' for local paths and file:// URLs."""
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def _endpoint(storage: StorageOptions | None) -> Optional[str]:
    if storage is not None and storage.endpoint_url:
        return storage.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def fsspec_options(url: str, storage: StorageOptions | None) -> dict:
    """Keyword options for ``fsspec.filesystem``/``fsspec.open`` on ``url``; {} if none apply."""
    if _scheme(url) not in _S3:
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
    if _scheme(url) != "file":
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
    scheme = _scheme(url)
    if scheme == "file":
        fs, path = get_fs(url, storage)
        return pafs.LocalFileSystem(), path
    if scheme in _S3:
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
    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    return None


def readable_path(path: str | bytes) -> str:
    """``path`` as valid UTF-8 text: bytes that are not UTF-8 written as ``\\xff`` escapes."""
    if isinstance(path, str):
        try:
            return os.fsencode(path).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
            return path.encode("utf-8", "backslashreplace").decode("utf-8")
    return path.decode("utf-8", "backslashreplace")


def real_path(readable: str, raw: bytes | None) -> str:
    """The path to open again from a row's readable form and raw bytes (surrogate-escaped str)."""
    return os.fsdecode(raw) if isinstance(raw, bytes) and raw else readable


def _to_url(url: str, path: str) -> str:
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
    if _scheme(url) in _S3:
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


# --------------------------------------------------------------------------- listing


def _ext(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def _stem(rel: str) -> str:
    return posixpath.splitext(rel)[0]


def _exts(source: SourceConfig) -> set[str]:
    return {e.lower() if e.startswith(".") else "." + e.lower() for e in source.extensions}


def _is_file(name: str, info: dict) -> bool:
    """A file, or a local symlink that is not a folder's: fsspec types every local symlink
    'other', and a dangling one must still be listed so that it becomes an error row."""
    if name.endswith("/"):  # S3 folder markers
        return False
    if info.get("islink"):
        return not os.path.isdir(name)
    return info.get("type") == "file"


def _files(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, str]:
    """{relative path: full path} of every file under ``root``: one recursive listing."""
    root = root.rstrip("/")
    found = fs.find(root, detail=True, withdirs=False)
    out = {}
    for name, info in found.items():
        if not _is_file(name, info):
            continue
        rel = name[len(root) :].lstrip("/") if name.startswith(root) else name
        out[rel or posixpath.basename(name)] = name
    return out


def _require_dir(fs: fsspec.AbstractFileSystem, path: str, url: str, what: str) -> None:
    if not fs.exists(path):
        raise FileNotFoundError(f"{what} not found: {url}")


def _mask_index(source: SourceConfig, storage: StorageOptions | None) -> dict[str, str]:
    """{relative stem: mask URL} for every candidate mask under ``source.masks``."""
    assert source.masks is not None
    fs, root = get_fs(source.masks, storage)
    _require_dir(fs, root, source.masks, "masks folder")
    allowed = _MASK_EXTENSIONS | _exts(source)
    index: dict[str, str] = {}
    for rel, full in sorted(_files(fs, root).items()):
        if _ext(rel) in allowed:
            index.setdefault(_stem(rel), _to_url(source.masks, full))  # sorted: '.png' before '.tif'
    return index


def _unique_ids(items: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(url, relative path) -> (url, id, stem); ids keep the extension only where they would
    collide (a.png and a.tif in one folder), so outputs keyed by id never overwrite each other."""
    counts = Counter(_stem(rel) for _, rel in items)
    return [(url, rel if counts[_stem(rel)] > 1 else _stem(rel), _stem(rel)) for url, rel in items]


def _folder(source: SourceConfig, storage: StorageOptions | None) -> list[tuple[str, str]]:
    assert source.images is not None
    fs, root = get_fs(source.images, storage)
    exts = _exts(source)
    files = _files(fs, root)
    if not files:
        _require_dir(fs, root, source.images, "images folder")
    picked = sorted((rel, full) for rel, full in files.items() if _ext(rel) in exts)
    if source.masks and source.mask_suffix:
        # Images and masks in one folder (a.png + a_mask.png): the masks are not images.
        mask_root = get_fs(source.masks, storage)[1].rstrip("/")
        picked = [
            (rel, full)
            for rel, full in picked
            if not (full.startswith(mask_root + "/") and _stem(rel).endswith(source.mask_suffix))
        ]
    if not picked:
        raise FileNotFoundError(f"no images with extensions {sorted(exts)} under {source.images}")
    return [(_to_url(source.images, full), rel) for rel, full in picked]


def _glob_base(pattern: str) -> str:
    parts = pattern.split("/")
    for i, p in enumerate(parts):
        if any(c in p for c in "*?["):
            return "/".join(parts[:i])
    return posixpath.dirname(pattern)


def _glob(source: SourceConfig, storage: StorageOptions | None) -> list[tuple[str, str]]:
    assert source.glob is not None
    fs, pattern = get_fs(source.glob, storage)
    found = fs.glob(pattern, detail=True)
    names = sorted(n for n, info in found.items() if _is_file(n, info))
    if not names:
        raise FileNotFoundError(f"no files match {source.glob}")
    base = _glob_base(pattern).rstrip("/")
    rel = [n[len(base) :].lstrip("/") if base and n.startswith(base) else n for n in names]
    return [(_to_url(source.glob, n), r) for n, r in zip(names, rel)]


def _strip(url: str) -> str:
    """Filesystem path of a URL by string rules alone (no filesystem instance per row)."""
    return url.split("://", 1)[1] if "://" in url else os.path.abspath(url)


def _resolve(entry: str, manifest_url: str, manifest_dir: str) -> str:
    """Manifest entries: URLs and absolute local paths as is, others relative to the manifest."""
    if "://" in entry:
        return entry
    if entry.startswith("/"):
        if _scheme(manifest_url) == "file":
            return entry
        bucket = manifest_url.split("://", 1)[1].split("/", 1)[0]
        return f"{manifest_url.split('://', 1)[0]}://{bucket}{posixpath.normpath(entry)}"
    joined = join(manifest_dir, entry)
    if "://" in joined:  # fold 'a/../b' so object keys never contain '..'
        scheme, rest = joined.split("://", 1)
        lead = "/" if rest.startswith("/") else ""
        return f"{scheme}://{lead}{posixpath.normpath(rest).lstrip('/')}"
    return os.path.normpath(joined)


def _manifest_rows(url: str, storage: StorageOptions | None) -> list[tuple[str, Optional[str]]]:
    fs, path = get_fs(url, storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"manifest not found: {url}")
    data = fs.cat_file(path)
    if _ext(path) == ".parquet" or data[:4] == b"PAR1":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        if "image" not in table.column_names:
            raise ValueError(f"{url}: parquet manifest needs an 'image' column (has {table.column_names})")
        images = table.column("image").to_pylist()
        masks = table.column("mask").to_pylist() if "mask" in table.column_names else [None] * len(images)
        return [(str(i), str(m) if m else None) for i, m in zip(images, masks) if i]
    rows = []
    for n, row in enumerate(csv.reader(io.StringIO(data.decode("utf-8-sig")))):
        row = [c.strip() for c in row]
        if not row or not row[0] or row[0].startswith("#"):
            continue
        if n == 0 and row[0].lower() == "image":
            continue  # header
        rows.append((row[0], row[1] if len(row) > 1 and row[1] else None))
    return rows


def _manifest(source: SourceConfig, storage: StorageOptions | None) -> list[tuple[str, str, Optional[str]]]:
    assert source.manifest is not None
    url = source.manifest
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    base_path = _strip(base).rstrip("/")
    out = []
    for image, mask in _manifest_rows(url, storage):
        image_url = _resolve(image, url, base)
        # Id relative to the manifest's folder when the image lies under it.
        p = _strip(image_url)
        rel = p[len(base_path) :].lstrip("/") if p.startswith(base_path + "/") else p.lstrip("/")
        out.append((image_url, rel, _resolve(mask, url, base) if mask else None))
    if not out:
        raise FileNotFoundError(f"manifest lists no images: {url}")
    return out


def _folder_rows(source: SourceConfig, storage: StorageOptions | None) -> list[tuple[str, str, Optional[str]]]:
    return [(url, rel, None) for url, rel in _folder(source, storage)]


def _glob_rows(source: SourceConfig, storage: StorageOptions | None) -> list[tuple[str, str, Optional[str]]]:
    return [(url, rel, None) for url, rel in _glob(source, storage)]


# The one seam of inputs: a lister per kind of source, each giving (image URL, id path, its mask
# URL or None) in a stable order. A catalog (STAC items and their assets) is one more entry and
# one more SourceConfig field; everything downstream reads Samples.
LISTERS: dict[str, Callable[[SourceConfig, Optional[StorageOptions]], list[tuple[str, str, Optional[str]]]]] = {
    "images": _folder_rows, "glob": _glob_rows, "manifest": _manifest,
}


def source_kind(source: SourceConfig) -> str:
    return next(kind for kind in LISTERS if getattr(source, kind, None))


def list_samples(source: SourceConfig, storage: StorageOptions | None = None) -> list[Sample]:
    """Image (and mask) URLs named by ``source``; masks not found are None (the caller decides).
    Masks pair by the lister's own column (a manifest's) or else by file stem under ``masks``."""
    rows = LISTERS[source_kind(source)](source, storage)
    explicit = {img: m for img, _, m in rows if m}
    items = _unique_ids([(img, rel) for img, rel, _ in rows])
    if source.limit:
        items = items[: source.limit]
    masks = _mask_index(source, storage) if source.masks else {}
    samples = []
    for url, image_id, stem in items:
        mask = explicit.get(url) or masks.get(stem + source.mask_suffix)
        # URLs stay openable (surrogate-escaped where a name is not UTF-8); the id is a row key
        # and an output name, so it is the readable form.
        samples.append(Sample(image=url, mask=mask, image_id=readable_path(image_id)))
    return samples
