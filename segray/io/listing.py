"""A listing as an Arrow table: one row per input, in listing order, a few tens of bytes each.

An archive of a million objects is listed, paired with masks, given ids and diffed in Arrow
columns, never as a million Python objects (~600 B each as ``Sample``s, more as dicts): the
images pipeline hands the table to Ray Data as it is (``ray.data.from_arrow``).

Columns (``LISTING``): ``image`` and ``mask`` are the readable forms of the URLs (valid UTF-8,
see :func:`segray.io.fs.readable_path`), ``image_path_bytes`` / ``mask_path_bytes`` the exact
bytes where a local name is not UTF-8 (else empty), ``image_id`` the row's id. This is the
shape of the images pipeline's rows (:func:`segray.io.reads.path_item`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from segray.io.fs import Sample, path_bytes, readable_path, real_path

LISTING = pa.schema([("image", pa.string()), ("image_path_bytes", pa.binary()), ("mask", pa.string()),
                     ("mask_path_bytes", pa.binary()), ("image_id", pa.string())])

# posixpath.splitext in RE2: the last '.' of the base name, if a character other than '.' comes
# before it ('.hidden' and '..b' have no extension).
_SPLITEXT = r"^(.*/)?(\.*[^./][^/]*)(\.[^./]*)$"


def url_columns(urls: Iterable[Optional[str]]) -> tuple[pa.Array, pa.Array]:
    """(readable form, exact bytes or b"") of URLs that may hold surrogate-escaped local names."""
    urls = [u or "" for u in urls]
    return (pa.array([readable_path(u) for u in urls], pa.string()),
            pa.array([path_bytes(u) or b"" for u in urls], pa.binary()))


def plain_urls(urls: pa.Array) -> tuple[pa.Array, pa.Array]:
    """``url_columns`` of URLs read from a table (valid UTF-8 already): no per-row work."""
    urls = pc.fill_null(urls.cast(pa.string()), "")
    return urls, pc.fill_null(pa.nulls(len(urls), pa.binary()), b"")


def stems(paths: pa.Array) -> pa.Array:
    """Each path without its extension (``posixpath.splitext(p)[0]``)."""
    return pc.replace_substring_regex(paths, _SPLITEXT, r"\1\2")


def unique_ids(rels: pa.Array) -> pa.Array:
    """Ids from relative paths: the stem, or the whole relative path where two inputs share a
    stem (a.png and a.tif in one folder), so outputs keyed by id never overwrite each other."""
    stem = stems(rels)
    counts = pc.value_counts(stem)
    shared = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    return pc.if_else(pc.is_in(stem, value_set=shared), rels, stem)


def masks_by_stem(stem: pa.Array, index: dict[str, str], suffix: str) -> tuple[pa.Array, pa.Array]:
    """Mask columns for each stem from ``{mask stem: mask URL}`` (looked up as stem + suffix)."""
    keys = pa.array([readable_path(k) for k in index], pa.string())
    readable, raw = url_columns(index.values())
    at = pc.index_in(pc.binary_join_element_wise(stem, pa.scalar(suffix), ""), value_set=keys)
    return pc.fill_null(readable.take(at), ""), pc.fill_null(raw.take(at), b"")


def lister_table(image: tuple, rel, mask: tuple) -> pa.Table:
    """What a lister gives: the image's URL columns, its path relative to the source, its mask's."""
    return pa.table({"image": image[0], "image_path_bytes": image[1], "rel": rel,
                     "mask": mask[0], "mask_path_bytes": mask[1]})


def listing_table(image: tuple[pa.Array, pa.Array], mask: tuple[pa.Array, pa.Array], ids: pa.Array) -> pa.Table:
    return pa.Table.from_arrays([image[0], image[1], mask[0], mask[1], pc.cast(ids, pa.string())], schema=LISTING)


# Columns only a STAC listing has, by ``Sample`` field: kept through the listing when any sample
# carries them, absent otherwise (an archive's own ``version`` column is the nightly key).
EXTRAS = {"source": "source", "error": "error", "version": "item_version"}


def samples_of(table: pa.Table) -> list[Sample]:
    """The listing as ``Sample``s, for the consumers that go row by row (scenes, nightly)."""
    cols = [table[c].to_pylist() for c in LISTING.names]
    extras = [table[c].to_pylist() if c in table.column_names else [None] * table.num_rows for c in EXTRAS.values()]
    return [Sample(image=real_path(img, raw), mask=real_path(m, mraw) or None, image_id=i, source=src, error=err,
                   version=ver)
            for img, raw, m, mraw, i, src, err, ver in zip(*cols, *extras)]


def table_of(samples: list[Sample]) -> pa.Table:
    """``samples`` as a listing (the images pipeline's rows), with ``EXTRAS`` where they have any."""
    table = listing_table(url_columns(s.image for s in samples), url_columns(s.mask for s in samples),
                          pa.array([s.image_id for s in samples], pa.string()))
    for field, column in EXTRAS.items():
        values = [getattr(s, field) for s in samples]
        if any(v is not None for v in values):
            table = table.append_column(column, pa.array(values, pa.string()))
    return table


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


_KEY = pa.schema([("source_path", pa.string()), ("size", pa.int64()), ("version", pa.string())])


def _key_columns(table: pa.Table) -> pa.Table:
    key = table.select(_KEY.names).cast(_KEY)
    return key.set_column(2, "version", pc.fill_null(key["version"], ""))


class Archive:
    """An archive as listed tonight (:func:`segray.io.sources.list_archive`): the listing's
    columns plus ``source_path`` (the row key), ``size`` and ``version``, in listing order. The
    nightly diff and the runs read the columns; ``ArchiveEntry`` rows are made only on demand."""

    def __init__(self, table: pa.Table):
        self.table = table

    @classmethod
    def of(cls, entries: list[ArchiveEntry]) -> "Archive":
        table = table_of([e.sample for e in entries])
        return cls(table.append_column("source_path", pa.array([e.url for e in entries], pa.string()))
                   .append_column("size", pa.array([e.size for e in entries], pa.int64()))
                   .append_column("version", pa.array([e.version for e in entries], pa.string())))

    def __len__(self) -> int:
        return self.table.num_rows

    def __iter__(self) -> Iterator[ArchiveEntry]:
        sizes, versions = self.table["size"].to_pylist(), self.table["version"].to_pylist()
        return (ArchiveEntry(s, z, v) for s, z, v in zip(samples_of(self.table), sizes, versions))

    def __getitem__(self, i: int) -> ArchiveEntry:
        return next(iter(Archive(self.table.slice(i % len(self), 1))))

    def take(self, rows) -> "Archive":
        return Archive(self.table.take(rows))

    def not_in(self, done: list[pa.Table]) -> "Archive":
        """The entries whose (source_path, size, version) none of the ``done`` tables holds (the
        committed nights' inputs), in listing order: an Arrow anti-join, so neither side is ever
        a Python object per image. A missing version matches the empty one."""
        if not len(self) or not done:
            return self
        listed = _key_columns(self.table).append_column("row", pa.array(range(len(self)), pa.int64()))
        committed = pa.concat_tables([_key_columns(t) for t in done])
        rows = listed.join(committed, keys=list(_KEY.names), join_type="left anti", use_threads=True)["row"]
        return self.take(pc.take(rows, pc.sort_indices(rows)))  # the join's order is its own

    def listing(self) -> pa.Table:
        """The images pipeline's rows of these entries."""
        return self.table.select(LISTING.names)

    def samples(self) -> list[Sample]:
        return samples_of(self.table)
