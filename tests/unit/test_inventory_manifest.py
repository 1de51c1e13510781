"""Parquet manifests as S3 Inventory writes them: key (+ bucket), size, e_tag, last_modified.

The nightly diff of a million-object archive must not send a request per object, so the
listing takes size and version from the inventory's own columns (real files, real Parquet).
"""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq

from segray.config import SourceConfig
from segray.io.sources import list_archive, list_samples


def _inventory(tmp_path, **cols):
    (tmp_path / "img").mkdir()
    for k in cols["key"]:
        (tmp_path / k).write_bytes(b"x" * 7)  # real files of 7 bytes; the inventory says otherwise
    pq.write_table(pa.table(cols), tmp_path / "inventory.parquet")
    return SourceConfig(manifest=str(tmp_path / "inventory.parquet"))


def test_inventory_columns_give_size_and_version_without_asking_storage(tmp_path):
    src = _inventory(tmp_path, key=["img/b.tif", "img/a.tif"], size=pa.array([111, 222], pa.int64()),
                     e_tag=['"etag-b"', '"etag-a"'])
    entries = list_archive(src)
    assert [e.image_id for e in entries] == ["img/b", "img/a"], "a manifest keeps its own order"
    # The inventory's figures, not the files' (7 bytes, an mtime): nothing was asked per object.
    assert [(e.size, e.version) for e in entries] == [(111, "etag-b"), (222, "etag-a")]


def test_inventory_last_modified_is_the_version_when_there_is_no_etag(tmp_path):
    when = dt.datetime(2026, 11, 30, 22, 15, tzinfo=dt.timezone.utc)
    src = _inventory(tmp_path, key=["img/a.tif"], size=pa.array([5], pa.int64()),
                     last_modified_date=pa.array([when], pa.timestamp("ms", tz="UTC")))
    (entry,) = list_archive(src)
    assert entry.version == when.isoformat() and entry.size == 5


def test_inventory_without_versions_falls_back_to_the_objects(tmp_path):
    src = _inventory(tmp_path, key=["img/a.tif"])
    (entry,) = list_archive(src)
    assert entry.size == 7 and entry.version, "no inventory columns: the object's own size and mtime"


def test_bucket_column_names_s3_objects(tmp_path):
    pq.write_table(pa.table({"bucket": ["archive", "archive"], "key": ["2026/x.tif", "2026/y.tif"]}),
                   tmp_path / "inv.parquet")
    samples = list_samples(SourceConfig(manifest=str(tmp_path / "inv.parquet")))
    assert [s.image for s in samples] == ["s3://archive/2026/x.tif", "s3://archive/2026/y.tif"]
    assert [s.image_id for s in samples] == ["archive/2026/x", "archive/2026/y"]


def test_a_large_listing_is_linear_and_exact(tmp_path):
    # 50,000 rows (the benchmark does a million): ids unique, order kept, one Sample per row.
    n = 50_000
    keys = [f"d{i // 1000:02d}/s{i:06d}.tif" for i in range(n)]
    pq.write_table(pa.table({"image": keys}), tmp_path / "m.parquet")
    samples = list_samples(SourceConfig(manifest=str(tmp_path / "m.parquet")))
    assert len(samples) == n and len({s.image_id for s in samples}) == n
    assert samples[0].image == str(tmp_path / keys[0]) and samples[-1].image_id == keys[-1][:-4]


def test_the_preflight_reads_a_manifests_first_rows_not_all_of_it(tmp_path):
    """The check before Ray starts looks at a manifest's first image only: a million-row inventory
    is read once, by the listing. Shown on real files whose tail is unreadable: the head read
    gives the first image, and the whole read fails on the tail."""
    import pytest

    from segray.io.preflight import first_image
    from segray.io.sources import listing

    keys = [f"img/{i:05d}.tif" for i in range(5000)]
    pq.write_table(pa.table({"key": keys}), tmp_path / "inv.parquet", row_group_size=1000, compression="none")
    last = pq.ParquetFile(tmp_path / "inv.parquet").metadata.row_group(4).column(0)
    data = bytearray((tmp_path / "inv.parquet").read_bytes())
    start = last.dictionary_page_offset or last.data_page_offset
    data[start:start + last.total_compressed_size] = b"\xff" * last.total_compressed_size  # the last row group only
    (tmp_path / "inv.parquet").write_bytes(bytes(data))
    src = SourceConfig(manifest=str(tmp_path / "inv.parquet"))
    assert first_image(src) == str(tmp_path / "img/00000.tif")
    with pytest.raises(OSError):
        listing(src)

    head = "image\n" + "".join(f"img/{i:05d}.png\n" for i in range(20000))  # ~300 KB of good rows
    (tmp_path / "m.csv").write_bytes(head.encode() + b"img/\xff\xfe.png\n")  # then bytes no UTF-8 decodes
    src = SourceConfig(manifest=str(tmp_path / "m.csv"))
    assert first_image(src) == str(tmp_path / "img/00000.png")
    with pytest.raises(UnicodeDecodeError):
        listing(src)
