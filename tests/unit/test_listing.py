"""The listing in Arrow columns: the same ids, URLs and masks as the per-row rules, for manifests
of every shape (URLs, bucket + key, absolute and relative paths) and folders with masks."""

from __future__ import annotations

import os
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segray.config import SourceConfig
from segray.infer.sinks import verify_rows
from segray.io.listing import samples_of, stems, table_of, unique_ids
from segray.io.manifests import _resolve
from segray.io.sources import list_samples, listing

NAMES = ["a.png", "a.tif", "b.tar.gz", ".hidden", "..b", "dir.v2/c", "dir/.d.png", "e.", "f", "x/y/z.JPG",
         "g..h", "./i.png", "caf\u00e9.png"]


def test_stems_are_splitext():
    assert stems(pa.array(NAMES)).to_pylist() == [posixpath.splitext(n)[0] for n in NAMES]


def test_ids_keep_the_extension_only_where_stems_collide():
    assert unique_ids(pa.array(["a.png", "a.tif", "b.png", "s/a.png"])).to_pylist() == ["a.png", "a.tif", "b", "s/a"]


def _row_rule_ids(urls: list[str], base: str) -> list[str]:
    """Ids by the rules row by row: relative to the manifest's folder, or the path without the
    scheme; the stem unless two stems collide."""
    rels = []
    for u in urls:
        p = u.split("://", 1)[1] if "://" in u else u
        rels.append(p[len(base) + 1:] if p.startswith(base + "/") else p.lstrip("/"))
    stem = [posixpath.splitext(r)[0] for r in rels]
    return [r if stem.count(s) > 1 else s for r, s in zip(rels, stem)]


@pytest.mark.parametrize("shape", ["urls", "bucket_key", "absolute", "relative", "mixed"])
def test_parquet_manifest_columns_match_the_row_rules(tmp_path, shape):
    (tmp_path / "m").mkdir()
    url = str(tmp_path / "m" / "list.parquet")
    keys = [f"tiles/{i:03d}.png" for i in range(20)] + ["tiles/007.tif"]
    entries = {"urls": [f"s3://bkt/{k}" for k in keys],
               "absolute": [f"{tmp_path}/m/{k}" for k in keys],
               "relative": keys,
               "mixed": [f"s3://bkt/{k}" if i % 2 else f"../m/{k}" for i, k in enumerate(keys)]}
    if shape == "bucket_key":
        pq.write_table(pa.table({"bucket": ["bkt"] * len(keys), "key": keys, "size": list(range(len(keys)))}), url)
        entries["bucket_key"] = [f"s3://bkt/{k}" for k in keys]
    else:
        pq.write_table(pa.table({"image": entries[shape], "mask": [None, "masks/0.png"] * 10 + [None]}), url)
    got = list_samples(SourceConfig(manifest=url))
    want_urls = [_resolve(e, url, str(tmp_path / "m")) for e in entries[shape]]
    assert [s.image for s in got] == want_urls
    ids = [s.image_id for s in got]
    assert ids == _row_rule_ids(want_urls, str(tmp_path / "m")) and len(set(ids)) == len(ids)
    if shape != "bucket_key":
        assert got[1].mask == _resolve("masks/0.png", url, str(tmp_path / "m")) and got[0].mask is None
    if shape in ("absolute", "relative"):
        assert ids[:2] == ["tiles/000", "tiles/001"], "ids relative to the manifest's folder"


def test_folder_masks_pair_by_stem_and_odd_names_round_trip(tmp_path):
    img, msk = tmp_path / "img", tmp_path / "msk"
    img.mkdir(), msk.mkdir()
    odd = os.fsdecode(b"scene_\xff.png")
    for name in ("a.png", "b.png", odd):
        (img / name).write_bytes(b"x")
    for name in ("a_mask.png", os.fsdecode(b"scene_\xff_mask.png")):
        (msk / name).write_bytes(b"x")
    source = SourceConfig(images=str(img), masks=str(msk), mask_suffix="_mask")
    got = {s.image_id: s for s in list_samples(source)}
    assert set(got) == {"a", "b", "scene_\\xff"}
    assert got["a"].mask == str(msk / "a_mask.png") and got["b"].mask is None
    assert got["scene_\\xff"].image == str(img / odd) and os.path.exists(got["scene_\\xff"].mask)
    table = listing(source)
    assert samples_of(table_of(samples_of(table))) == samples_of(table), "Samples and listing round-trip"
    assert listing(source.model_copy(update={"limit": 2}))["image_id"].to_pylist() == ["a", "b"]


def test_rows_are_verified_in_columns():
    want = pa.array([f"s3://b/{i}.png" for i in range(1000)])
    verify_rows(pa.table({"source_path": want[::-1]}), want)
    for got, kind in ((want[:-1], "1 missing"), (pa.concat_arrays([want, want[:1]]), "1 duplicated"),
                      (pa.concat_arrays([want[:-1], pa.array(["s3://b/x.png"])]), "1 unexpected")):
        with pytest.raises(RuntimeError, match=kind):
            verify_rows(pa.table({"source_path": got}), want)


@pytest.mark.parametrize("n,batch,actors", [(5, 16, 2), (40, 2, 1), (1000, 16, 2), (10_000, 16, 2), (1_000_000, 8, 1)])
def test_listing_blocks_start_small_and_grow_to_a_cap(n, batch, actors):
    from segray.infer.pipeline import MAX_BLOCK_ROWS, listing_blocks

    sizes = listing_blocks(n, batch, actors)
    assert sum(sizes) == n and all(s > 0 for s in sizes)
    assert sizes[0] <= 2 * batch, "the first predictions come after two batches"
    assert len(sizes) >= min(n, 4 * actors), "every actor has blocks to take"
    assert max(sizes) <= max(2 * batch, MAX_BLOCK_ROWS) and sizes == sorted(sizes[:-1]) + sizes[-1:]
    if n >= 1_000_000:
        assert len(sizes) < 200, "a million rows are a few hundred objects, not thousands"
