"""Listing what a source names: folders, globs and manifests, each one lister behind one seam.

``listing(source)`` gives every input as a row of an Arrow table (image URL, mask URL, id; see
``segray.io.listing``), in a stable order (by relative path; a manifest keeps its own order),
computed in columns: a million-row S3 Inventory is listed in seconds, ~120 bytes per object.
``list_samples`` gives the same as ``Sample`` objects, for consumers that go row by row;
``list_archive`` adds each image's size and version (S3 ETag, else mtime) for the nightly runs.
"""

from __future__ import annotations

import os
import posixpath
from typing import Callable, Optional

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from segray.config import SourceConfig, StorageOptions
from segray.io.fs import Sample, get_fs, readable_path, real_path, to_url
from segray.io.listing import (Archive, ArchiveEntry, lister_table, listing_table, masks_by_stem, samples_of, stems,
                               table_of, unique_ids, url_columns)
from segray.io.manifests import manifest_rows

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


def _python_rows(items: list[tuple[str, str]]) -> pa.Table:
    """A lister's table from (URL, relative path) pairs (a folder's or a glob's listing)."""
    return lister_table(url_columns(u for u, _ in items), pa.array([readable_path(r) for _, r in items], pa.string()),
                         url_columns(None for _ in items))


# The one seam of inputs: a lister per kind of source, each giving a table of (image URL, its
# relative path, its mask URL or "") in a stable order (see ``segray.io.listing`` for the URL
# columns). A STAC catalog lists Samples itself (items made of several assets, see
# ``segray.io.stac``); everything downstream reads the listing or Samples made from it.
# With ``versions``, a lister adds the ``size`` and ``version`` it knows without asking storage
# (a manifest's inventory columns); the others leave them to ``list_archive``. ``head`` asks for
# at least the first ``head`` rows, where fewer can be read (a manifest's; a listing is a listing).
LISTERS: dict[str, Callable[..., pa.Table]] = {
    "images": lambda source, storage, versions=False, head=None: _python_rows(_folder(source, storage)),
    "glob": lambda source, storage, versions=False, head=None: _python_rows(_glob(source, storage)),
    "manifest": manifest_rows,
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
