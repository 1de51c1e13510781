"""Windowed GeoTIFF/COG reading and COG writing with rasterio (GDAL).

Windows are ``(row_off, col_off, height, width)`` in scene pixels (as in
``segray.core.tiling``); bands are 1-based as in GDAL. URLs are local paths or
``s3://bucket/key``, read and written through GDAL's /vsis3/. S3 settings are GDAL config
options passed as ``env``, e.g. ``{"AWS_S3_ENDPOINT": "localhost:8333", "AWS_HTTPS": "NO",
"AWS_VIRTUAL_HOSTING": "FALSE", "AWS_ACCESS_KEY_ID": ..., "AWS_SECRET_ACCESS_KEY": ...}``;
``gdal_env(storage)`` builds them from the project's ``StorageOptions``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.crs import CRS
from rasterio.enums import MaskFlags
from rasterio.io import MemoryFile
from rasterio.session import AWSSession
from rasterio.transform import Affine
from rasterio.windows import Window as RioWindow

from segray.config import StorageOptions
from segray.core.tiling import Window

CACHE_SIZE = 16  # open datasets kept per thread
_local = threading.local()  # rasterio handles are not thread-safe: one cache per thread


@dataclass(frozen=True)
class RasterInfo:
    path: str  # the URL as given
    height: int
    width: int
    count: int
    dtype: str  # of band 1
    crs: str | None  # "EPSG:xxxx" when GDAL finds an authority code, else WKT
    transform: tuple[float, float, float, float, float, float]  # affine a, b, c, d, e, f
    nodata: float | None
    bounds: tuple[float, float, float, float]  # left, bottom, right, top
    block_shapes: tuple[tuple[int, int], ...]  # (rows, cols) per band
    overviews: tuple[int, ...]  # decimation factors of band 1
    dtypes: tuple[str, ...] = ()  # per band


def gdal_path(url: str) -> str:
    """``s3://bucket/key`` -> ``/vsis3/bucket/key``; other paths unchanged."""
    return "/vsis3/" + url[len("s3://"):] if url.startswith("s3://") else url


def is_inline_vrt(url: str) -> bool:
    """A VRT given as XML text (a STAC item's stacked assets), not a file name."""
    return url.startswith("<VRTDataset")


def gdal_env(storage: StorageOptions | None = None) -> dict[str, str]:
    """GDAL /vsis3/ options from ``StorageOptions``, with the endpoint fallbacks of
    ``segray.io.fs`` (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``). A custom endpoint
    (SeaweedFS, MinIO) gets path-style requests."""
    env: dict[str, str] = {}
    endpoint = (storage.endpoint_url if storage else None) or os.environ.get("AWS_ENDPOINT_URL_S3")
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        env["AWS_S3_ENDPOINT"] = parsed.netloc + parsed.path.rstrip("/")
        env["AWS_HTTPS"] = "NO" if parsed.scheme == "http" else "YES"
        env["AWS_VIRTUAL_HOSTING"] = "FALSE"
    if storage and storage.key and storage.secret:
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = storage.key, storage.secret
    if storage and storage.region:
        env["AWS_REGION"] = storage.region
    return env


_AWS_KEYS = {
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AWS_SESSION_TOKEN": "aws_session_token",
}


def _env(url: str, env: dict[str, Any] | None) -> rasterio.Env:
    options = dict(env or {})
    # rasterio refuses GDAL's AWS key options and takes keys through an AWSSession instead
    keys = {arg: options.pop(name) for name, arg in _AWS_KEYS.items() if name in options}
    session = AWSSession(**keys, region_name=options.get("AWS_REGION")) if keys else None
    if gdal_path(url).startswith("/vsi") or is_inline_vrt(url):  # a VRT's sources may be on /vsis3/
        options.setdefault("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")  # no LIST per open
    return rasterio.Env(session=session, **options)


def _dataset(url: str, env: dict[str, Any] | None):
    """Open (or reuse) a dataset from this thread's LRU, keyed by URL and GDAL options."""
    cache: OrderedDict = _local.__dict__.setdefault("datasets", OrderedDict())
    key = (url, tuple(sorted((env or {}).items())))
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    with _env(url, env):
        ds = rasterio.open(gdal_path(url))
    cache[key] = ds
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)[1].close()
    return ds


def close_datasets(url: str | None = None) -> None:
    """Close this thread's cached handles (of ``url`` only, if given), e.g. after rewriting it."""
    cache: OrderedDict = _local.__dict__.setdefault("datasets", OrderedDict())
    for key in [k for k in cache if url is None or k[0] == url]:
        cache.pop(key).close()


def open_info(url: str, env: dict[str, Any] | None = None) -> RasterInfo:
    ds = _dataset(url, env)
    with _env(url, env):  # a VRT's overviews are its sources': GDAL opens them here
        return _info(url, ds)


def _info(url: str, ds) -> RasterInfo:
    return RasterInfo(
        path=url,
        height=ds.height,
        width=ds.width,
        count=ds.count,
        dtype=ds.dtypes[0],
        crs=ds.crs.to_string() if ds.crs else None,
        transform=tuple(ds.transform)[:6],
        nodata=ds.nodata,
        bounds=tuple(ds.bounds),
        block_shapes=tuple(tuple(b) for b in ds.block_shapes),
        overviews=tuple(ds.overviews(1)),
        dtypes=tuple(ds.dtypes),
    )


def read_window(
    url: str,
    window: Window,
    bands: list[int] | None = None,
    boundless: bool = True,
    fill: float = 0.0,
    nodata: float | None = None,
    env: dict[str, Any] | None = None,
    dtype: Any = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``window`` as ``dtype [C, h, w]`` plus ``valid bool [h, w]``.

    ``dtype`` must hold the file's values (see :func:`tile_dtype`). A pixel is invalid when any
    band equals the nodata value (``nodata`` overrides the file's, for files that lack the tag),
    when the dataset mask/alpha excludes it, or when it lies outside the scene (boundless reads:
    filled with ``fill``).
    """
    row_off, col_off, h, w = window
    if h <= 0 or w <= 0:
        raise ValueError(f"window must be non-empty, got {window}")
    ds = _dataset(url, env)
    indexes = list(bands) if bands else list(range(1, ds.count + 1))
    out = np.full((len(indexes), h, w), fill, dtype)
    valid = np.zeros((h, w), bool)
    r0, c0 = max(row_off, 0), max(col_off, 0)
    r1, c1 = min(row_off + h, ds.height), min(col_off + w, ds.width)
    inside = r1 > r0 and c1 > c0
    if not boundless and (r0, c0, r1, c1) != (row_off, col_off, row_off + h, col_off + w):
        raise ValueError(f"window {window} exceeds the {ds.height}x{ds.width} scene (use boundless=True)")
    if not inside:
        return out, valid
    win = RioWindow(c0, r0, c1 - c0, r1 - r0)
    with _env(url, env):
        data = ds.read(indexes, window=win)
        ok = np.ones(data.shape[1:], bool)
        nd = ds.nodata if nodata is None else nodata
        if nd is not None:
            ok &= ~(np.isnan(data) if np.isnan(nd) else data == nd).any(axis=0)
        flags = ds.mask_flag_enums[indexes[0] - 1]
        if MaskFlags.per_dataset in flags or MaskFlags.alpha in flags:
            ok &= ds.read_masks(indexes[0], window=win) > 0
    dst = (slice(r0 - row_off, r1 - row_off), slice(c0 - col_off, c1 - col_off))
    out[(slice(None), *dst)] = data
    valid[dst] = ok
    return out, valid


def tile_dtype(infos: list[RasterInfo], bands: list[int] | None = None, fill: float = 0.0) -> str:
    """One pixel type for every tile of a job over these scenes (``bands``: 1-based, else all):
    their common type where it is an integer of 8 or 16 bits (exact in float32, a quarter or half
    of its bytes between processes; the model's process converts), else float32. One type for
    all, because Ray Data joins tiles of several scenes into one batch, and a tensor column has
    one type."""
    types = [t for info in infos for t in ([info.dtypes[b - 1] for b in bands] if bands else info.dtypes)]
    if not types:
        return "float32"
    common = np.result_type(*types)
    fits = common.kind in "ui" and common.itemsize <= 2 and fill == int(fill) \
        and np.iinfo(common).min <= fill <= np.iinfo(common).max  # the boundless fill too
    return common.name if fits else "float32"


def _check_blocksize(blocksize: int) -> None:
    if blocksize < 128 or blocksize % 16:  # the COG driver's limits
        raise ValueError(f"COG blocksize must be a multiple of 16 and >= 128, got {blocksize}")


def _copy_cog(src, url: str, blocksize: int, compress: str, overviews: bool, resampling: str, env) -> None:
    """GDAL's COG driver: tiled, overviews down to one block, IFDs first (LAYOUT=COG)."""
    options = dict(
        BLOCKSIZE=blocksize,
        COMPRESS=compress.upper(),
        OVERVIEWS="AUTO" if overviews else "NONE",
        RESAMPLING=resampling.upper(),
        BIGTIFF="IF_SAFER",
        NUM_THREADS="ALL_CPUS",
    )
    if compress.lower() in ("deflate", "lzw", "zstd"):
        options["PREDICTOR"] = "YES"  # horizontal differencing (ints) / floating-point predictor
    # TIFF writing seeks; on /vsis3/ GDAL then writes a local temporary file and uploads it
    with _env(url, {"CPL_VSIL_USE_TEMP_FILE_FOR_RANDOM_WRITE": "YES", **(env or {})}):
        rasterio.shutil.copy(src, gdal_path(url), driver="COG", **options)
    close_datasets(url)  # a cached handle would read the old file


def _as_bands(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise ValueError(f"expected [H, W] or [C, H, W], got shape {array.shape}")
    return array[None] if array.ndim == 2 else array


def write_cog(
    url: str,
    array: np.ndarray,
    crs: str | CRS | None,
    transform,
    nodata: float | None = None,
    blocksize: int = 512,
    compress: str = "deflate",
    overviews: bool = True,
    resampling: str = "nearest",
    env: dict[str, Any] | None = None,
) -> None:
    """Write an in-memory ``[C, H, W]`` or ``[H, W]`` array as a Cloud-Optimized GeoTIFF.

    ``resampling`` builds the overviews: 'nearest' for class maps, 'average' for imagery.
    """
    _check_blocksize(blocksize)
    data = _as_bands(array)
    profile = dict(
        driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0], dtype=data.dtype,
        crs=crs, transform=Affine(*tuple(transform)[:6]), nodata=nodata,
    )  # fmt: skip
    with MemoryFile() as mem:
        with mem.open(**profile) as tmp:
            tmp.write(data)
        with mem.open() as src:
            _copy_cog(src, url, blocksize, compress, overviews, resampling, env)


def is_cog(url: str, env: dict[str, Any] | None = None) -> bool:
    """True when GDAL reports the COG layout (IFDs and ghost area ahead of the tiled data)."""
    close_datasets(url)
    ds = _dataset(url, env)
    return ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"


class CogBlockWriter:
    """Stream blocks of a huge scene into a local tiled GTiff, then convert it to a COG.

    Block-aligned windows (``tiling.blocks(height, width, blocksize)``) are each compressed
    once. On a clean exit the file is copied with the COG driver to ``url`` (local or
    ``s3://``, written through /vsis3/); on an exception nothing is written. ``cog=False``
    copies the tiled GTiff as it is (a piece of a scene, assembled later by ``mosaic_cog``).
    """

    def __init__(
        self,
        url: str,
        height: int,
        width: int,
        count: int,
        dtype: str,
        crs: str | CRS | None,
        transform,
        nodata: float | None = None,
        blocksize: int = 512,
        compress: str = "deflate",
        overviews: bool = True,
        resampling: str = "nearest",
        env: dict[str, Any] | None = None,
        tmp_dir: str | None = None,
        cog: bool = True,
    ) -> None:
        _check_blocksize(blocksize)  # before hours of writing, not at the final copy
        self.url, self.count, self.dtype = url, count, np.dtype(dtype)
        self._cog = dict(blocksize=blocksize, compress=compress, overviews=overviews, resampling=resampling, env=env)
        self._profile = dict(
            driver="GTiff", height=height, width=width, count=count, dtype=self.dtype.name, crs=crs,
            transform=Affine(*tuple(transform)[:6]), nodata=nodata, tiled=True, blockxsize=blocksize,
            blockysize=blocksize, compress="deflate", zlevel=1, bigtiff="IF_SAFER",
        )  # fmt: skip
        self._tmp_dir, self._as_cog = tmp_dir, cog

    def __enter__(self) -> CogBlockWriter:
        self._tmp = tempfile.TemporaryDirectory(prefix="segray-cog-", dir=self._tmp_dir)
        self._path = os.path.join(self._tmp.name, "scene.tif")
        self._ds = rasterio.open(self._path, "w", **self._profile)
        return self

    def write(self, window: Window, block: np.ndarray) -> None:
        """Write ``block [C, h, w]`` (or ``[h, w]`` for one band), cast to the file's dtype."""
        row_off, col_off, h, w = window
        data = _as_bands(block)
        if data.shape != (self.count, h, w):
            raise ValueError(f"block {data.shape} does not match window {window} with {self.count} bands")
        self._ds.write(data.astype(self.dtype, copy=False), window=RioWindow(col_off, row_off, w, h))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._ds.close()
            if exc_type is None and self._as_cog:
                _copy_cog(self._path, self.url, **self._cog)
            elif exc_type is None:  # the file as it is: no decode, no second compression
                with _env(self.url, self._cog["env"]):
                    rasterio.shutil.copyfiles(self._path, gdal_path(self.url))
                close_datasets(self.url)
        finally:
            self._tmp.cleanup()


_GDAL_TYPES = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32",
               "float32": "Float32", "float64": "Float64"}


def mosaic_cog(url: str, pieces: list[tuple[str, int]], height: int, width: int, count: int, dtype: str,
               crs: str | None, transform, nodata: float | None = None, blocksize: int = 512,
               compress: str = "deflate", resampling: str = "nearest", env: dict[str, Any] | None = None) -> None:
    """One COG at ``url`` from row pieces ``(piece url, row offset)`` that tile a ``height x width``
    raster top to bottom (each piece full width): GDAL reads them through a VRT and writes the
    COG with its overviews, compressing on every core. No pixel passes through Python."""
    from xml.sax.saxutils import escape

    a, b, c, d, e, f = tuple(transform)[:6]
    head = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
            f"<SRS>{escape(CRS.from_user_input(crs).to_wkt())}</SRS>" if crs else "",
            f"<GeoTransform>{c!r}, {a!r}, {b!r}, {f!r}, {d!r}, {e!r}</GeoTransform>"]
    stops = [r for _, r in pieces[1:]] + [height]
    bands = []
    for i in range(1, count + 1):
        xml = [f'<VRTRasterBand dataType="{_GDAL_TYPES[np.dtype(dtype).name]}" band="{i}">']
        if nodata is not None:
            xml.append(f"<NoDataValue>{float(nodata)!r}</NoDataValue>")
        for (piece, row), stop in zip(pieces, stops):
            xml += [f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(gdal_path(piece))}</SourceFilename>',
                    f'<SourceBand>{i}</SourceBand><SrcRect xOff="0" yOff="0" xSize="{width}" ySize="{stop - row}"/>',
                    f'<DstRect xOff="0" yOff="{row}" xSize="{width}" ySize="{stop - row}"/></SimpleSource>']
        bands.append("".join(xml + ["</VRTRasterBand>"]))
    vrt = "".join(head + bands + ["</VRTDataset>"])
    _copy_cog(vrt, url, blocksize, compress, True, resampling, env)


def limit_gdal_cache(mb: int | None) -> None:
    """Cap GDAL's block cache in this process (default 5% of RAM, filled by every block read or
    written: a worker's memory would grow with the data it has seen until that cap)."""
    if mb:
        from rasterio.env import set_gdal_config

        set_gdal_config("GDAL_CACHEMAX", int(mb) * 2**20)


def read_headers(urls: list[str], env: dict, threads: int = 8) -> list[RasterInfo | Exception]:
    """Headers only (size, bands, CRS, transform, nodata), a few at a time; errors are returned."""

    def one(url: str) -> RasterInfo | Exception:
        try:
            return open_info(url, env)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(max(1, min(threads, len(urls)))) as pool:
        return list(pool.map(one, urls))


def remap_labels(label: np.ndarray, values: dict[int, int] | None) -> np.ndarray:
    """Ground-truth values (read as float32) -> int64 class ids through ``values``."""
    out = label.astype(np.int64)
    if values:
        src = out.copy()
        for k, v in values.items():
            out[src == int(k)] = int(v)
    return out
