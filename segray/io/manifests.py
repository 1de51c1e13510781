"""Manifests: a CSV of image (and mask) paths, or a Parquet table such as an S3 Inventory's.

Entries resolve relative to the manifest (``_resolve``), in columns where they allow it: a
million-row inventory lists in seconds. With ``head``, only the first rows are read (the
preflight's look at the source before Ray starts).
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from segray.config import SourceConfig, StorageOptions
from segray.io.fs import get_fs, join, scheme_of
from segray.io.listing import lister_table, plain_urls


def _strip(url: str) -> str:
    """Filesystem path of a URL by string rules alone (no filesystem instance per row)."""
    return url.split("://", 1)[1] if "://" in url else os.path.abspath(url)


def _resolve(entry: str, manifest_url: str, manifest_dir: str) -> str:
    """Manifest entries: URLs and absolute local paths as is, others relative to the manifest."""
    if "://" in entry:
        return entry
    if entry.startswith("/"):
        if scheme_of(manifest_url) == "file":
            return entry
        bucket = manifest_url.split("://", 1)[1].split("/", 1)[0]
        return f"{manifest_url.split('://', 1)[0]}://{bucket}{posixpath.normpath(entry)}"
    if (manifest_dir.startswith("/") or "://" in manifest_dir) and "/." not in entry and not entry.startswith(".") \
            and "//" not in entry:  # a clean path under a clean base: nothing to fold
        return f"{manifest_dir.rstrip('/')}/{entry}"
    joined = join(manifest_dir, entry)
    if "://" in joined:  # fold 'a/../b' so object keys never contain '..'
        scheme, rest = joined.split("://", 1)
        lead = "/" if rest.startswith("/") else ""
        return f"{scheme}://{lead}{posixpath.normpath(rest).lstrip('/')}"
    return os.path.normpath(joined)


# Columns of a Parquet manifest: ``image`` (or S3 Inventory's ``key``, with ``bucket``), an optional
# ``mask``, and, for the nightly runs, the object's size and version as the inventory lists them
# (so a million-object archive is diffed without a HEAD per object). Read as columns throughout.
_SIZE_COLUMNS = ("size",)
_VERSION_COLUMNS = ("etag", "e_tag", "version", "last_modified", "last_modified_date")
_SCHEME = r"^[A-Za-z][A-Za-z0-9+.-]*://"


def _listed_version(v) -> Optional[str]:
    """An inventory's ETag (quotes dropped) or last-modified time, as ``_version`` writes them."""
    if v is None or v == "":
        return None
    return v.isoformat() if hasattr(v, "isoformat") else str(v).strip('"')


def _versions(col: pa.ChunkedArray) -> pa.Array:
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):  # ETags: no per-row work
        trimmed = pc.utf8_trim(col, '"')
        return pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)
    return pa.array([_listed_version(v) for v in col.to_pylist()], pa.string())


def _parquet_manifest(table: pa.Table, url: str) -> pa.Table:
    names = table.column_names
    if "image" in names:
        images = table["image"].cast(pa.string())
    elif "key" in names:  # S3 Inventory: keys under the bucket column's bucket, else under the manifest
        keys = table["key"].cast(pa.string())
        images = keys
        if "bucket" in names:
            buckets = table["bucket"].cast(pa.string())
            both = pc.fill_null(pc.and_(pc.not_equal(buckets, ""), pc.not_equal(keys, "")), False)
            images = pc.if_else(both, pc.binary_join_element_wise("s3://", buckets, "/", keys, ""), keys)
    else:
        raise ValueError(f"{url}: parquet manifest needs an 'image' (or S3 Inventory 'key') column (has {names})")
    n = len(images)
    size_col = next((c for c in _SIZE_COLUMNS if c in names), None)
    ver_col = next((c for c in _VERSION_COLUMNS if c in names), None)
    out = pa.table({
        "image": images,
        "mask": table["mask"].cast(pa.string()) if "mask" in names else pa.nulls(n, pa.string()),
        "size": table[size_col].cast(pa.int64()) if size_col else pa.nulls(n, pa.int64()),
        "version": _versions(table[ver_col]) if ver_col else pa.nulls(n, pa.string()),
    })
    return out.filter(pc.fill_null(pc.not_equal(out["image"], ""), False))


def _manifest_table(url: str, storage: StorageOptions | None, versions: bool = False,
                    head: int | None = None) -> pa.Table:
    """The manifest's rows as written: ``image``, ``mask``, and with ``versions`` a Parquet
    manifest's ``size`` and ``version`` (else null; unread columns cost no memory). With ``head``,
    reading stops after the first ``head`` images (the preflight's look at a million-row manifest)."""
    fs, path = get_fs(url, storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"manifest not found: {url}")
    if head is None:  # the whole file in one request
        return _read_manifest(io.BytesIO(fs.cat_file(path)), path, url, versions, None)
    with fs.open(path, "rb") as f:  # ranged reads: the Parquet footer and first row group, a CSV's first lines
        return _read_manifest(f, path, url, versions, head)


def _read_manifest(f, path: str, url: str, versions: bool, head: int | None) -> pa.Table:
    parquet = posixpath.splitext(path)[1].lower() == ".parquet" or f.read(4) == b"PAR1"
    f.seek(0)
    if parquet:
        file = pq.ParquetFile(f)
        wanted = {"image", "key", "bucket", "mask"} | (set(_SIZE_COLUMNS + _VERSION_COLUMNS) if versions else set())
        columns = [c for c in file.schema_arrow.names if c in wanted]
        if head is None:
            return _parquet_manifest(file.read(columns), url)
        parts, found = [], 0
        for batch in file.iter_batches(batch_size=max(head, 1024), columns=columns):
            parts.append(_parquet_manifest(pa.Table.from_batches([batch]), url))
            found += parts[-1].num_rows
            if found >= head:
                break
        if not parts:  # a manifest without rows
            return _parquet_manifest(file.schema_arrow.empty_table(), url)
        return pa.concat_tables(parts).slice(0, head)
    rows = []
    for n, row in enumerate(csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""))):
        row = [c.strip() for c in row]
        if not row or not row[0] or row[0].startswith("#"):
            continue
        if n == 0 and row[0].lower() == "image":
            continue  # header
        rows.append((row[0], row[1] if len(row) > 1 and row[1] else None))
        if head is not None and len(rows) >= head:
            break
    return pa.table({"image": pa.array([r[0] for r in rows], pa.string()),
                     "mask": pa.array([r[1] for r in rows], pa.string()),
                     "size": pa.nulls(len(rows), pa.int64()), "version": pa.nulls(len(rows), pa.string())})


def _resolved(entries: pa.ChunkedArray, url: str, base: str) -> pa.ChunkedArray | pa.Array:
    """``_resolve`` of every entry; entries that are all URLs (an inventory's) pass as they are."""
    if pc.all(pc.match_substring_regex(entries, _SCHEME)).as_py() is not False:
        return entries
    return pa.array([_resolve(e, url, base) if e else None for e in entries.to_pylist()], pa.string())


def _manifest_rels(images, base: str):
    """Each image's path relative to the manifest's folder when it lies under it, else its path
    without the scheme: by string rules, in columns where the entries allow it."""
    prefix = base.rstrip("/") + "/" if (base.startswith("/") or "://" in base) else None
    if prefix and prefix.isascii() and pc.all(pc.starts_with(images, prefix)).as_py():
        return pc.utf8_slice_codeunits(images, len(prefix))
    base_path = _strip(base).rstrip("/")
    if base_path.isascii() and pc.all(pc.match_substring_regex(images, _SCHEME)).as_py():
        paths = pc.replace_substring_regex(images, _SCHEME, "")
        under = pc.starts_with(paths, base_path + "/")
        return pc.if_else(under, pc.utf8_slice_codeunits(paths, len(base_path) + 1), pc.utf8_ltrim(paths, "/"))
    out = []
    for u in images.to_pylist():
        if prefix and u.startswith(prefix):
            out.append(u[len(prefix):])
            continue
        p = _strip(u)
        out.append(p[len(base_path):].lstrip("/") if p.startswith(base_path + "/") else p.lstrip("/"))
    return pa.array(out, pa.string())


def manifest_rows(source: SourceConfig, storage: StorageOptions | None, versions: bool = False,
                  head: int | None = None) -> pa.Table:
    """The manifest lister (``segray.io.sources.LISTERS``): its entries resolved, as a lister table."""
    assert source.manifest is not None
    url = source.manifest
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    rows = _manifest_table(url, storage, versions, head)
    if not rows.num_rows:
        raise FileNotFoundError(f"manifest lists no images: {url}")
    images = _resolved(rows["image"], url, base)
    masks = plain_urls(_resolved(rows["mask"], url, base))
    table = lister_table(plain_urls(images), _manifest_rels(images, base), masks)
    return table.append_column("size", rows["size"]).append_column("version", rows["version"]) if versions else table
