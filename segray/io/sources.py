"""Listing what a source names: folders, globs and manifests, each one lister behind one seam.

``listing(source)`` gives every input as a row of an Arrow table (image URL, mask URL, id; see
``segray.io.listing``), in a stable order (by relative path; a manifest keeps its own order),
computed in columns: a million-row S3 Inventory is listed in seconds, ~120 bytes per object.
``list_samples`` gives the same as ``Sample`` objects, for consumers that go row by row;
``list_archive`` adds each image's size and version (S3 ETag, else mtime) for the nightly runs.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from typing import Callable, Optional

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from segray.config import SourceConfig, StorageOptions
from segray.io.fs import Sample, get_fs, join, readable_path, real_path, scheme_of, to_url
from segray.io.listing import (Archive, ArchiveEntry, listing_table, masks_by_stem, plain_urls, samples_of, stems,
                               table_of, unique_ids, url_columns)

# Extensions a mask may have, beyond source.extensions (masks are often PNG/TIFF next to JPEGs).
_MASK_EXTENSIONS = {".png", ".tif", ".tiff", ".bmp", ".gif", ".jpg", ".jpeg", ".webp", ".jp2"}



def _ext(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def _stem(rel: str) -> str:
    return posixpath.splitext(rel)[0]


def image_extensions(source: SourceConfig) -> set[str]:
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
    allowed = _MASK_EXTENSIONS | image_extensions(source)
    index: dict[str, str] = {}
    for rel, full in sorted(_files(fs, root).items()):
        if _ext(rel) in allowed:
            index.setdefault(_stem(rel), to_url(source.masks, full))  # sorted: '.png' before '.tif'
    return index


def _folder(source: SourceConfig, storage: StorageOptions | None) -> list[tuple[str, str]]:
    assert source.images is not None
    fs, root = get_fs(source.images, storage)
    exts = image_extensions(source)
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
    return [(to_url(source.images, full), rel) for rel, full in picked]


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
    return [(to_url(source.glob, n), r) for n, r in zip(names, rel)]


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


def _manifest_table(url: str, storage: StorageOptions | None, versions: bool = False) -> pa.Table:
    """The manifest's rows as written: ``image``, ``mask``, and with ``versions`` a Parquet
    manifest's ``size`` and ``version`` (else null; unread columns cost no memory)."""
    fs, path = get_fs(url, storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"manifest not found: {url}")
    data = fs.cat_file(path)
    if _ext(path) == ".parquet" or data[:4] == b"PAR1":
        file = pq.ParquetFile(io.BytesIO(data))
        wanted = {"image", "key", "bucket", "mask"} | (set(_SIZE_COLUMNS + _VERSION_COLUMNS) if versions else set())
        return _parquet_manifest(file.read([c for c in file.schema_arrow.names if c in wanted]), url)
    rows = []
    for n, row in enumerate(csv.reader(io.StringIO(data.decode("utf-8-sig")))):
        row = [c.strip() for c in row]
        if not row or not row[0] or row[0].startswith("#"):
            continue
        if n == 0 and row[0].lower() == "image":
            continue  # header
        rows.append((row[0], row[1] if len(row) > 1 and row[1] else None))
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


def _lister_table(image: tuple, rel, mask: tuple) -> pa.Table:
    return pa.table({"image": image[0], "image_path_bytes": image[1], "rel": rel,
                     "mask": mask[0], "mask_path_bytes": mask[1]})


def _python_rows(items: list[tuple[str, str]]) -> pa.Table:
    """A lister's table from (URL, relative path) pairs (a folder's or a glob's listing)."""
    return _lister_table(url_columns(u for u, _ in items), pa.array([readable_path(r) for _, r in items], pa.string()),
                         url_columns(None for _ in items))


def _manifest(source: SourceConfig, storage: StorageOptions | None, versions: bool = False) -> pa.Table:
    assert source.manifest is not None
    url = source.manifest
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    rows = _manifest_table(url, storage, versions)
    if not rows.num_rows:
        raise FileNotFoundError(f"manifest lists no images: {url}")
    images = _resolved(rows["image"], url, base)
    table = _lister_table(plain_urls(images), _manifest_rels(images, base), plain_urls(_resolved(rows["mask"], url, base)))
    return table.append_column("size", rows["size"]).append_column("version", rows["version"]) if versions else table


# The one seam of inputs: a lister per kind of source, each giving a table of (image URL, its
# relative path, its mask URL or "") in a stable order (see ``segray.io.listing`` for the URL
# columns). A STAC catalog lists Samples itself (items made of several assets, see
# ``segray.io.stac``); everything downstream reads the listing or Samples made from it.
# With ``versions``, a lister adds the ``size`` and ``version`` it knows without asking storage
# (a manifest's inventory columns); the others leave them to ``list_archive``.
LISTERS: dict[str, Callable[..., pa.Table]] = {
    "images": lambda source, storage, versions=False: _python_rows(_folder(source, storage)),
    "glob": lambda source, storage, versions=False: _python_rows(_glob(source, storage)),
    "manifest": _manifest,
}


def source_kind(source: SourceConfig) -> str:
    return "stac" if source.stac is not None else next(kind for kind in LISTERS if getattr(source, kind, None))


def first_url(rows: pa.Table) -> str:
    """The URL to open of a lister's first row."""
    return real_path(rows["image"][0].as_py(), rows["image_path_bytes"][0].as_py())


def listing(source: SourceConfig, storage: StorageOptions | None = None, versions: bool = False) -> pa.Table:
    """What ``source`` names, as an Arrow table (``segray.io.listing.LISTING``), in listing order.
    Masks pair by the lister's own column (a manifest's) or else by file stem under ``masks``;
    masks not found are "". Ids are computed over the whole listing, then ``limit`` applies.
    With ``versions``, ``size`` and ``version`` columns follow (null where the lister knows none)."""
    if source.stac is not None:
        return table_of(list_samples(source, storage))
    rows = LISTERS[source_kind(source)](source, storage, versions=versions)
    ids = unique_ids(rows["rel"])
    mask = (rows["mask"], rows["mask_path_bytes"])
    if source.masks:
        found = masks_by_stem(stems(rows["rel"]), _mask_index(source, storage), source.mask_suffix)
        own = pc.not_equal(rows["mask"], "")
        mask = (pc.if_else(own, mask[0], found[0]), pc.if_else(own, mask[1], found[1]))
    table = listing_table((rows["image"], rows["image_path_bytes"]), mask, ids)
    if versions:
        n = rows.num_rows
        for name, kind in (("size", pa.int64()), ("version", pa.string())):
            table = table.append_column(name, rows[name] if name in rows.column_names else pa.nulls(n, kind))
    return table.slice(0, source.limit) if source.limit else table


def list_samples(source: SourceConfig, storage: StorageOptions | None = None) -> list[Sample]:
    """``listing`` as ``Sample``s. A STAC source lists scenes made of several files
    (``segray.io.stac``): Samples of their own."""
    if source.stac is not None:
        from segray.io.stac import stac_samples

        samples = stac_samples(source.stac, storage)
        return samples[: source.limit] if source.limit else samples
    return samples_of(listing(source, storage))


# --------------------------------------------------------------------------- archives (nightly)


def _version(info: dict) -> str:
    for k in ("ETag", "etag", "e_tag"):
        if info.get(k):
            return str(info[k]).strip('"')
    for k in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        v = info.get(k)
        if v is not None and v != "":
            return v.isoformat() if hasattr(v, "isoformat") else repr(v)
    return ""


def _listing_root(source: SourceConfig) -> Optional[str]:
    if source.images:
        return source.images
    if source.glob:
        scheme = source.glob.split("://", 1)[0] + "://" if "://" in source.glob else ""
        base = _glob_base(source.glob.split("://", 1)[1] if scheme else source.glob)
        return scheme + base if base else None
    return None  # manifest: entries can be anywhere


def _stat_missing(archive: pa.Table, source: SourceConfig, storage: StorageOptions | None) -> pa.Table:
    """Size and version for the rows the listing gave none (no inventory columns): one
    recursive listing under the folder / glob base, and ``info`` for the rest."""
    need = pc.or_(pc.is_null(archive["size"]), pc.is_null(archive["version"]))
    rows = pc.indices_nonzero(need).to_pylist()
    if not rows:
        return archive
    images, raws = archive["image"].to_pylist(), archive["image_path_bytes"].to_pylist()
    urls = [real_path(images[i], raws[i]) for i in rows]
    fs, _ = get_fs(urls[0], storage)
    details: dict[str, dict] = {}
    root = _listing_root(source)
    if root:
        rfs, rpath = get_fs(root, storage)
        details = dict(rfs.find(rpath, detail=True, withdirs=False))
    sizes, versions = archive["size"].to_pylist(), archive["version"].to_pylist()
    for i, url in zip(rows, urls):
        path = fs._strip_protocol(url)
        info = details.get(path) or fs.info(path)
        sizes[i], versions[i] = int(info.get("size") or 0), _version(info)
    return archive.set_column(archive.schema.get_field_index("size"), "size", pa.array(sizes, pa.int64())) \
        .set_column(archive.schema.get_field_index("version"), "version", pa.array(versions, pa.string()))


def list_archive(source: SourceConfig, storage: StorageOptions | None = None) -> Archive:
    """The images ``source`` names (the selection rules of ``listing``), each with its size and
    version, in columns: a Parquet manifest's own columns where it has them (an S3 Inventory: no
    request per object), else the objects' (``_stat_missing``)."""
    if source.stac is not None:  # items are versioned by their own metadata: no object listing
        return Archive.of([ArchiveEntry(s, 0, s.version or "") for s in list_samples(source, storage)])
    archive = listing(source, storage, versions=True)
    archive = archive.append_column("source_path", archive["image"])  # the row key: the readable URL
    return Archive(_stat_missing(archive, source, storage) if archive.num_rows else archive)
