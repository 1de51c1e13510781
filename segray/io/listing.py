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

from typing import Iterable, Optional

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


def listing_table(image: tuple[pa.Array, pa.Array], mask: tuple[pa.Array, pa.Array], ids: pa.Array) -> pa.Table:
    return pa.Table.from_arrays([image[0], image[1], mask[0], mask[1], pc.cast(ids, pa.string())], schema=LISTING)


def samples_of(table: pa.Table) -> list[Sample]:
    """The listing as ``Sample``s, for the consumers that go row by row (scenes, nightly)."""
    cols = [table[c].to_pylist() for c in LISTING.names]
    return [Sample(image=real_path(img, raw), mask=real_path(m, mraw) or None, image_id=i)
            for img, raw, m, mraw, i in zip(*cols)]


def table_of(samples: list[Sample]) -> pa.Table:
    """``samples`` as a listing (the images pipeline's rows)."""
    return listing_table(url_columns(s.image for s in samples), url_columns(s.mask for s in samples),
                         pa.array([s.image_id for s in samples], pa.string()))
