"""segray.io.fs on local folders and on a real S3 server (SeaweedFS): listing, bytes, Parquet, GDAL."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import rasterio
from PIL import Image
from rasterio.io import MemoryFile

from segray.config import SourceConfig, StorageOptions
from segray.io import fs as sfs
from segray.io.preflight import first_image
from segray.io.sources import list_samples
from segray.io.images import decode_image, decode_mask


def _png(value: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (6, 4), value if mode != "RGB" else (value,) * 3).save(buf, format="PNG")
    return buf.getvalue()


def _tif(bands: int = 3, value: int = 1000) -> bytes:
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=5, height=7, count=bands, dtype="uint16", crs="EPSG:4326",
                      transform=rasterio.Affine(1e-4, 0, 10, 0, -1e-4, 50)) as ds:  # fmt: skip
            ds.write(np.full((bands, 7, 5), value, np.uint16))
        return mem.read()


# images/: a.png, c.JPG (no mask), sub/b.tif, notes.txt (not an image)
# masks/:  a_m.png, sub/b_m.tif, README.md
TREE = {
    "images/a.png": _png(10),
    "images/c.JPG": _png(30),  # PNG bytes behind a .JPG name: decoding sniffs, listing trusts the name
    "images/sub/b.tif": _tif(),
    "images/notes.txt": b"not an image",
    "masks/a_m.png": _png(1, "L"),
    "masks/sub/b_m.tif": _tif(1, 2),
    "masks/README.md": b"# masks",
}


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def root(request, tmp_path):
    """(base URL holding TREE, storage options) on a local folder or an S3 bucket."""
    if request.param == "local":
        base, storage = str(tmp_path / "ds"), None
    else:
        server = request.getfixturevalue("s3")
        base, storage = f"s3://{request.getfixturevalue('s3_bucket')}/ds", server.storage_options()
    for rel, data in TREE.items():
        sfs.write_bytes(sfs.join(base, rel), data, storage)
    return base, storage


def _ids(samples):
    return [s.image_id for s in samples]


# --------------------------------------------------------------------------- listing


def test_folder_pairs_masks_by_stem(root):
    base, storage = root
    src = SourceConfig(images=f"{base}/images", masks=f"{base}/masks/", mask_suffix="_m")
    samples = list_samples(src, storage)
    assert _ids(samples) == ["a", "c", "sub/b"]  # .txt skipped, .JPG matched case-insensitively
    by_id = {s.image_id: s for s in samples}
    assert by_id["a"].image == f"{base}/images/a.png" and by_id["a"].mask == f"{base}/masks/a_m.png"
    assert by_id["sub/b"].mask == f"{base}/masks/sub/b_m.tif"
    assert by_id["c"].mask is None
    # What was listed reads and decodes.
    s = by_id["sub/b"]
    assert decode_image(sfs.read_bytes(s.image, storage)).shape == (3, 7, 5)
    assert decode_mask(sfs.read_bytes(s.mask, storage)).max() == 2
    assert _ids(list_samples(src.model_copy(update={"limit": 2}), storage)) == ["a", "c"]


def test_images_and_masks_in_one_folder(root):
    base, storage = root
    sfs.write_bytes(f"{base}/mixed/p1.png", _png(5), storage)
    sfs.write_bytes(f"{base}/mixed/p1_mask.png", _png(1, "L"), storage)
    src = SourceConfig(images=f"{base}/mixed", masks=f"{base}/mixed", mask_suffix="_mask")
    (s,) = list_samples(src, storage)
    assert (s.image_id, s.mask) == ("p1", f"{base}/mixed/p1_mask.png")


def test_glob(root):
    base, storage = root
    samples = list_samples(SourceConfig(glob=f"{base}/images/**/*.tif"), storage)
    assert [(s.image, s.image_id, s.mask) for s in samples] == [(f"{base}/images/sub/b.tif", "sub/b", None)]
    src = SourceConfig(glob=f"{base}/images/*.png", masks=f"{base}/masks", mask_suffix="_m")
    assert [(s.image_id, s.mask) for s in list_samples(src, storage)] == [("a", f"{base}/masks/a_m.png")]


def test_csv_manifest(root):
    base, storage = root
    lines = ["image,mask", "images/sub/b.tif,masks/sub/b_m.tif", "", f"{base}/images/a.png", "images/c.JPG,"]
    sfs.write_bytes(f"{base}/list.csv", "\n".join(lines).encode(), storage)
    samples = list_samples(SourceConfig(manifest=f"{base}/list.csv"), storage)
    assert [(s.image, s.mask, s.image_id) for s in samples] == [
        (f"{base}/images/sub/b.tif", f"{base}/masks/sub/b_m.tif", "images/sub/b"),  # manifest order kept
        (f"{base}/images/a.png", None, "images/a"),
        (f"{base}/images/c.JPG", None, "images/c"),
    ]
    # A plain one-path-per-line TXT works too.
    sfs.write_bytes(f"{base}/list.txt", b"images/a.png\nimages/c.JPG\n", storage)
    assert _ids(list_samples(SourceConfig(manifest=f"{base}/list.txt", limit=1), storage)) == ["images/a"]
    # The preflight reads the first rows only (ranged reads of the object), and resolves them the same way.
    assert first_image(SourceConfig(manifest=f"{base}/list.csv"), storage) == f"{base}/images/sub/b.tif"


def test_parquet_manifest(root):
    base, storage = root
    table = pa.table({"image": ["images/a.png", "images/sub/b.tif"], "mask": ["masks/a_m.png", None]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    sfs.write_bytes(f"{base}/list.parquet", buf.getvalue(), storage)
    samples = list_samples(SourceConfig(manifest=f"{base}/list.parquet"), storage)
    assert [(s.image, s.mask) for s in samples] == [
        (f"{base}/images/a.png", f"{base}/masks/a_m.png"),
        (f"{base}/images/sub/b.tif", None),
    ]
    assert first_image(SourceConfig(manifest=f"{base}/list.parquet"), storage) == f"{base}/images/a.png"


def test_missing_or_empty_sources_name_the_path(root):
    base, storage = root
    with pytest.raises(FileNotFoundError, match="images folder not found: .*nowhere"):
        list_samples(SourceConfig(images=f"{base}/nowhere"), storage)
    with pytest.raises(FileNotFoundError, match="no images with extensions .* under .*masks"):
        list_samples(SourceConfig(images=f"{base}/masks", extensions=[".jp2"]), storage)
    with pytest.raises(FileNotFoundError, match="manifest not found: .*none.csv"):
        list_samples(SourceConfig(manifest=f"{base}/none.csv"), storage)
    with pytest.raises(FileNotFoundError, match="no files match"):
        list_samples(SourceConfig(glob=f"{base}/images/*.webp"), storage)
    with pytest.raises(FileNotFoundError, match="masks folder not found"):
        list_samples(SourceConfig(images=f"{base}/images", masks=f"{base}/nomasks"), storage)


# --------------------------------------------------------------------------- bytes, trees, parquet


def test_bytes_exists_remove_tree(root):
    base, storage = root
    url = sfs.join(base, "out", "deep/x.bin")
    assert url == f"{base}/out/deep/x.bin"
    sfs.write_bytes(url, b"\x00payload", storage)
    assert sfs.read_bytes(url, storage) == b"\x00payload"
    assert sfs.exists(url, storage) and sfs.exists(f"{base}/out", storage)
    sfs.remove_tree(f"{base}/out", storage)
    assert not sfs.exists(url, storage) and not sfs.exists(f"{base}/out", storage)
    sfs.remove_tree(f"{base}/out", storage)  # absent: no error
    with pytest.raises(FileNotFoundError):
        sfs.read_bytes(url, storage)


def test_pyarrow_fs_parquet_roundtrip_and_overwrite(root):
    base, storage = root
    fs, path = sfs.pyarrow_fs(f"{base}/preds", storage)
    table = pa.table({"image_id": ["a", "b", "c"], "score": [0.1, 0.5, 0.9]})
    opts = dict(max_rows_per_file=2, max_rows_per_group=2)
    pads.write_dataset(table, path, format="parquet", filesystem=fs, **opts)
    fs.create_dir(f"{path}/extra")  # Arrow's local writer does not create parents
    pq.write_table(table, f"{path}/extra/one.parquet", filesystem=fs)
    back = pads.dataset(f"{path}/extra/one.parquet", filesystem=fs).to_table()
    assert back.equals(table)
    assert pads.dataset(path, filesystem=fs, format="parquet").count_rows() == 6
    # Overwrite: the whole tree, Arrow's folder markers included, is gone.
    sfs.remove_tree(f"{base}/preds", storage)
    assert not sfs.exists(f"{base}/preds", storage)


# --------------------------------------------------------------------------- S3 specifics


@pytest.mark.s3
def test_options_and_env_endpoint(s3, s3_bucket, monkeypatch):
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    assert sfs.fsspec_options("/local/path", s3.storage_options()) == {}
    assert sfs.fsspec_options("s3://b/k", StorageOptions(key="k", secret="s")) == {"key": "k", "secret": "s"}
    assert sfs.fsspec_options("s3://b/k", s3.storage_options()) == {
        "key": s3.key,
        "secret": s3.secret,
        "client_kwargs": {"endpoint_url": s3.endpoint_url, "region_name": s3.region},
    }
    # No endpoint configured: the environment points the job at the server.
    for var, value in s3.env().items():
        monkeypatch.setenv(var, value)
    assert sfs.fsspec_options("s3://b/k", None) == {"client_kwargs": {"endpoint_url": s3.endpoint_url}}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # the S3-specific one wins
    sfs.write_bytes(f"s3://{s3_bucket}/env/a.png", _png(3), None)
    assert _ids(list_samples(SourceConfig(images=f"s3://{s3_bucket}/env"), StorageOptions())) == ["a"]
    fs, path = sfs.pyarrow_fs(f"s3://{s3_bucket}/env", None)
    assert fs.get_file_info(f"{path}/a.png").size > 0


@pytest.mark.s3
def test_rasterio_reads_geotiff_over_vsis3(s3, s3_bucket, monkeypatch):
    data = _tif(bands=4, value=777)
    sfs.write_bytes(f"s3://{s3_bucket}/cog/scene.tif", data, s3.storage_options())
    # rasterio.Env refuses AWS credentials as options (boto3 owns them), so the variables go in
    # the process environment, as on a cluster node; GDAL reads the endpoint ones from there too.
    for var, value in s3.env().items():
        monkeypatch.setenv(var, value)
    with rasterio.Env():
        with rasterio.open(f"/vsis3/{s3_bucket}/cog/scene.tif") as ds:
            assert (ds.count, ds.height, ds.width, ds.crs.to_epsg()) == (4, 7, 5, 4326)
            assert int(ds.read(3).max()) == 777
