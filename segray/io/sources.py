"""Listing what a source names: folders, globs and manifests, each one lister behind one seam.

``list_samples(source)`` gives the ``Sample`` (image URL, mask URL, id) of every input, in a
stable order (by relative path; a manifest keeps its own order). ``list_archive`` adds each
image's size and version (S3 ETag, else mtime) for the nightly runs.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import fsspec

from segray.config import SourceConfig, StorageOptions
from segray.io.fs import Sample, get_fs, join, readable_path, scheme_of, to_url

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


def _unique_ids(items: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(url, relative path) -> (url, id, stem); ids keep the extension only where they would
    collide (a.png and a.tif in one folder), so outputs keyed by id never overwrite each other."""
    stems = [_stem(rel) for _, rel in items]
    counts = Counter(stems)
    return [(url, rel if counts[stem] > 1 else stem, stem) for (url, rel), stem in zip(items, stems)]


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
# (so a million-object archive is diffed without a HEAD per object).
_SIZE_COLUMNS = ("size",)
_VERSION_COLUMNS = ("etag", "e_tag", "version", "last_modified", "last_modified_date")


def _parquet_rows(table, url: str) -> list[tuple[str, Optional[str], Optional[int], Optional[str]]]:
    names = table.column_names
    if "image" in names:
        images = table.column("image").to_pylist()
    elif "key" in names:  # S3 Inventory: keys under the bucket column's bucket, else under the manifest
        keys = table.column("key").to_pylist()
        buckets = table.column("bucket").to_pylist() if "bucket" in names else [None] * len(keys)
        images = [f"s3://{b}/{k}" if b and k else k for b, k in zip(buckets, keys)]
    else:
        raise ValueError(f"{url}: parquet manifest needs an 'image' (or S3 Inventory 'key') column (has {names})")
    n = len(images)
    masks = table.column("mask").to_pylist() if "mask" in names else [None] * n
    size_col = next((c for c in _SIZE_COLUMNS if c in names), None)
    sizes = table.column(size_col).to_pylist() if size_col else [None] * n
    ver_col = next((c for c in _VERSION_COLUMNS if c in names), None)
    versions = [_listed_version(v) for v in table.column(ver_col).to_pylist()] if ver_col else [None] * n
    return [(str(i), str(m) if m else None, z, v) for i, m, z, v in zip(images, masks, sizes, versions) if i]


def _listed_version(v) -> Optional[str]:
    """An inventory's ETag (quotes dropped) or last-modified time, as ``_version`` writes them."""
    if v is None or v == "":
        return None
    return v.isoformat() if hasattr(v, "isoformat") else str(v).strip('"')


def _manifest_rows(url: str, storage: StorageOptions | None) -> list[tuple[str, Optional[str], Optional[int],
                                                                           Optional[str]]]:
    """(image, mask, size, version) per manifest row; size and version only from Parquet columns."""
    fs, path = get_fs(url, storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"manifest not found: {url}")
    data = fs.cat_file(path)
    if _ext(path) == ".parquet" or data[:4] == b"PAR1":
        import pyarrow.parquet as pq

        return _parquet_rows(pq.read_table(io.BytesIO(data)), url)
    rows = []
    for n, row in enumerate(csv.reader(io.StringIO(data.decode("utf-8-sig")))):
        row = [c.strip() for c in row]
        if not row or not row[0] or row[0].startswith("#"):
            continue
        if n == 0 and row[0].lower() == "image":
            continue  # header
        rows.append((row[0], row[1] if len(row) > 1 and row[1] else None, None, None))
    return rows


def _manifest(source: SourceConfig, storage: StorageOptions | None) -> list[tuple[str, str, Optional[str]]]:
    assert source.manifest is not None
    url = source.manifest
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    base_path = _strip(base).rstrip("/")
    prefix = base.rstrip("/") + "/" if (base.startswith("/") or "://" in base) else None
    out = []
    for image, mask, _, _ in _manifest_rows(url, storage):
        image_url = _resolve(image, url, base)
        # Id relative to the manifest's folder when the image lies under it.
        if prefix and image_url.startswith(prefix):  # by string alone: a million rows, no path calls
            rel = image_url[len(prefix):]
        else:
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
# URL or None) in a stable order. A STAC catalog lists Samples itself (items made of several
# assets, see ``segray.io.stac``); everything downstream reads Samples.
LISTERS: dict[str, Callable[[SourceConfig, Optional[StorageOptions]], list[tuple[str, str, Optional[str]]]]] = {
    "images": _folder_rows, "glob": _glob_rows, "manifest": _manifest,
}


def source_kind(source: SourceConfig) -> str:
    return "stac" if source.stac is not None else next(kind for kind in LISTERS if getattr(source, kind, None))


def list_samples(source: SourceConfig, storage: StorageOptions | None = None) -> list[Sample]:
    """Image (and mask) URLs named by ``source``; masks not found are None (the caller decides).
    Masks pair by the lister's own column (a manifest's) or else by file stem under ``masks``.
    A STAC source lists scenes made of several files (``segray.io.stac``): Samples of their own."""
    if source.stac is not None:
        from segray.io.stac import stac_samples

        samples = stac_samples(source.stac, storage)
        return samples[: source.limit] if source.limit else samples
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


# --------------------------------------------------------------------------- archives (nightly)


@dataclass(frozen=True, slots=True)
class ArchiveEntry:
    """One image (or STAC item) of the archive as listed tonight."""

    sample: Sample
    size: int
    version: str  # S3 ETag, else modification time; a STAC item's hash of updated + asset hrefs

    @property
    def url(self) -> str:
        return self.sample.source_path

    @property
    def image_id(self) -> str:
        return self.sample.image_id

    @property
    def mask(self) -> Optional[str]:
        return self.sample.mask

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.url, self.size, self.version)


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


def _manifest_versions(source: SourceConfig, storage: StorageOptions | None) -> dict[str, tuple[int, str]]:
    """{image URL: (size, version)} of the manifest rows that list both (S3 Inventory style)."""
    url = source.manifest
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    return {_resolve(image, url, base): (int(size), version)
            for image, _, size, version in _manifest_rows(url, storage) if size is not None and version}


def list_archive(source: SourceConfig, storage: StorageOptions | None = None) -> list[ArchiveEntry]:
    """The images ``source`` names (the selection rules of ``list_samples``), each with its
    size and version: a Parquet manifest's own columns where it has them (an S3 Inventory: no
    request per object), else one recursive listing under the folder / glob base, and ``info``
    for the rest (manifest entries without them)."""
    samples = list_samples(source, storage)
    if not samples:
        return []
    if source.stac is not None:  # items are versioned by their own metadata: no object listing
        return [ArchiveEntry(s, 0, s.version or "") for s in samples]
    fs, _ = get_fs(samples[0].image, storage)
    listed = _manifest_versions(source, storage) if source.manifest else {}
    details: dict[str, dict] = {}
    root = _listing_root(source)
    if root:
        rfs, rpath = get_fs(root, storage)
        details = dict(rfs.find(rpath, detail=True, withdirs=False))
    out = []
    for s in samples:
        if s.image in listed:
            size, version = listed[s.image]
        else:
            path = fs._strip_protocol(s.image)
            info = details.get(path) or fs.info(path)
            size, version = int(info.get("size") or 0), _version(info)
        out.append(ArchiveEntry(s, size, version))
    return out
