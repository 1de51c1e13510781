"""Training chips: windows cut from GeoTIFF/COG scenes of any size (``data.chips``).

The driver reads scene headers only and draws the chip windows (random or grid); Ray tasks
read each window with rasterio and build its mask, from a label raster read over the same
window or from polygons (GeoJSON/GeoParquet) rasterised into it. A scene is never read whole.

Every pixel that must not teach the model gets ``data.ignore_index``: nodata in the image
(file tag or ``chips.nodata``), nodata in the label (``chips.label_nodata`` or the label
file's tag), label values outside the classes, and pixels outside the scene (chips larger
than the scene). Image pixels that are nodata become NaN until band statistics are known
(computed from a sample of chips, NaN skipped, or fixed by ``data.band_stats``) and are then
set to the band mean, i.e. 0 after normalisation.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from functools import lru_cache
from typing import Any

import numpy as np

from segray.config import ChipsConfig, DataConfig, StorageOptions
from segray.core.tiling import Window, tile_grid
from segray.core.transforms import BandStats, compute_band_stats
from segray.io.fs import Sample, read_bytes
from segray.io.sources import list_samples

log = logging.getLogger(__name__)
STATS_SAMPLE = 256


# --------------------------------------------------------------------------- windows


def chip_windows(height: int, width: int, chips: ChipsConfig, rng: np.random.Generator) -> list[Window]:
    """``chips.size``-square windows in a scene (they extend past a scene smaller than a chip)."""
    size = chips.size
    if chips.mode == "grid":
        offsets = [(t.row_off, t.col_off) for t in tile_grid(height, width, size, chips.overlap)]
        if chips.per_scene is not None and len(offsets) > chips.per_scene:
            keep = np.sort(rng.choice(len(offsets), chips.per_scene, replace=False))
            offsets = [offsets[i] for i in keep]
    else:
        n = int(chips.per_scene or 1)
        rows = rng.integers(0, max(height - size, 0) + 1, n)
        cols = rng.integers(0, max(width - size, 0) + 1, n)
        offsets = list(zip(rows.tolist(), cols.tolist()))
    return [(int(r), int(c), size, size) for r, c in offsets]


# --------------------------------------------------------------------------- vector labels


def vector_url(pattern: str, scene_url: str) -> str:
    stem = posixpath.splitext(posixpath.basename(scene_url))[0]
    return pattern.replace("{stem}", stem)


def read_vector_labels(url: str, attribute: str | None = None, class_map: dict[str, int] | None = None,
                       storage: StorageOptions | None = None) -> tuple[list, list[int], str]:
    """(shapely geometries, class ids, CRS) from GeoJSON or GeoParquet.

    GeoJSON without a ``crs`` member and GeoParquet without one are OGC:CRS84 (both specs).
    Without ``attribute`` every polygon is class 1; with it, ``class_map[str(value)]`` or the
    value as an integer.
    """
    import shapely
    from shapely.geometry import shape

    data = read_bytes(url, storage)
    if data[:4] == b"PAR1":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        geo = json.loads((table.schema.metadata or {}).get(b"geo", b"{}"))
        column = geo.get("primary_column", "geometry")
        if column not in table.column_names:
            raise ValueError(f"{url}: no geometry column {column!r} (is it GeoParquet?)")
        crs_meta = geo.get("columns", {}).get(column, {}).get("crs", "absent")
        crs = "OGC:CRS84" if crs_meta == "absent" else (json.dumps(crs_meta) if crs_meta else None)
        geoms = list(shapely.from_wkb(table.column(column).to_numpy(zero_copy_only=False)))
        values = table.column(attribute).to_pylist() if attribute else [None] * len(geoms)
    else:
        fc = json.loads(data)
        features = fc["features"] if fc.get("type") == "FeatureCollection" else [fc]
        crs = (fc.get("crs") or {}).get("properties", {}).get("name") or "OGC:CRS84"
        geoms = [shape(f["geometry"]) if f.get("geometry") else None for f in features]
        values = [(f.get("properties") or {}).get(attribute) if attribute else None for f in features]
    out_geoms, classes = [], []
    for g, v in zip(geoms, values):
        if g is None or g.is_empty:
            continue
        if attribute is None:
            cls = 1
        elif class_map is not None:
            if str(v) not in class_map:
                continue  # a value without a class is not a label
            cls = class_map[str(v)]
        else:
            try:
                cls = int(v)
            except (TypeError, ValueError):
                raise ValueError(f"{url}: {attribute}={v!r} is not a class id (give chips.class_map)") from None
        out_geoms.append(g)
        classes.append(int(cls))
    if crs is None:
        raise ValueError(f"{url}: the polygons' CRS is unknown")
    return out_geoms, classes, crs


@lru_cache(maxsize=8)  # per worker process: one parse per label file and scene CRS
def _scene_vectors(url: str, scene_crs: str, attribute: str | None, class_map_json: str | None,
                   storage_json: str | None):
    import shapely
    from rasterio.crs import CRS

    from segray.core.scene_polygons import reproject

    storage = StorageOptions.model_validate_json(storage_json) if storage_json else None
    class_map = json.loads(class_map_json) if class_map_json else None
    geoms, classes, crs = read_vector_labels(url, attribute, class_map, storage)
    arr = np.array(geoms, dtype=object)
    if CRS.from_user_input(crs) != CRS.from_user_input(scene_crs):
        arr = reproject(arr, crs, scene_crs)
    return shapely.STRtree(arr), arr, np.asarray(classes, np.int64)


def rasterize_window(url: str, scene_crs: str, transform, window: Window, chips: ChipsConfig,
                     storage: StorageOptions | None = None) -> np.ndarray:
    """Class map ``int64 [h, w]`` of the polygons over ``window`` (0 where none)."""
    import rasterio.features
    import shapely
    from rasterio.transform import Affine
    from rasterio.windows import Window as RioWindow
    from rasterio.windows import bounds as window_bounds
    from rasterio.windows import transform as window_transform

    tree, geoms, classes = _scene_vectors(
        url, scene_crs, chips.label_attribute, json.dumps(chips.class_map) if chips.class_map else None,
        storage.model_dump_json() if storage else None,
    )
    r, c, h, w = window
    win = RioWindow(c, r, w, h)
    aff = Affine(*tuple(transform)[:6])
    hits = tree.query(shapely.box(*window_bounds(win, aff)))
    if not len(hits):
        return np.zeros((h, w), np.int64)
    hits = np.sort(hits)  # file order: later polygons win where they overlap
    out = rasterio.features.rasterize(
        zip(geoms[hits], classes[hits].tolist()), out_shape=(h, w), transform=window_transform(win, aff),
        fill=0, dtype="int32",
    )  # fmt: skip
    return out.astype(np.int64)


# --------------------------------------------------------------------------- reading


def read_chips(batch: dict[str, Any], data: dict) -> dict[str, Any]:
    """Rows (scene, label, window) -> ``image float32 [C, s, s]`` (NaN = nodata), ``mask int64``, ``image_id``.

    Chips with fewer labelled pixels than ``chips.min_valid_fraction`` are dropped.
    """
    from segray.io.raster import limit_gdal_cache, remap_labels
    from segray.io.raster import gdal_env, read_window

    limit_gdal_cache(64)  # GDAL's default cache (5% of RAM) would grow with every window read

    cfg = DataConfig.model_validate(data)
    chips = cfg.chips
    assert chips is not None
    env = gdal_env(cfg.storage)
    bands = [b + 1 for b in cfg.bands] if cfg.bands else None
    ignore = cfg.ignore_index
    k = max(len(cfg.class_names), 2)
    images, masks, ids = [], [], []
    for i in range(len(batch["image"])):
        window = tuple(int(v) for v in batch["window"][i])
        image, valid = read_window(str(batch["image"][i]), window, bands=bands, nodata=chips.nodata, env=env)
        if batch["label_kind"][i] == "vector":
            label = rasterize_window(str(batch["label"][i]), str(batch["crs"][i]), batch["transform"][i], window,
                                     chips, cfg.storage)
            ok = valid
        else:
            raw, lab_ok = read_window(str(batch["label"][i]), window, bands=[1], nodata=chips.label_nodata, env=env)
            label = remap_labels(raw[0], chips.label_values)
            ok = valid & lab_ok
        ok &= (label >= 0) & (label < k)
        if not ok.all():
            if ignore is None:
                raise ValueError(f"{batch['image'][i]} {window}: nodata or unknown label values, but data.ignore_index "
                                 "is not set")
            label = np.where(ok, label, ignore)
        if ok.mean() < chips.min_valid_fraction or not ok.any():
            continue
        image[:, ~valid] = np.nan
        images.append(image)
        masks.append(label.astype(np.int64))
        stem = posixpath.splitext(posixpath.basename(str(batch["image"][i])))[0]
        ids.append(f"{stem}@{window[0]},{window[1]}")  # scene and window offset (row, col)
    return {"image": images, "mask": masks, "image_id": np.array(ids, dtype=object)}



def fill_nodata(batch: dict[str, Any], mean: list[float]) -> dict[str, Any]:
    """NaN (nodata) pixels -> the band mean, i.e. 0 after normalisation."""
    m = np.asarray(mean, np.float32)[:, None, None]
    images = [np.where(np.isnan(im), m, im).astype(np.float32) for im in batch["image"]]
    return {"image": images, "mask": list(batch["mask"]), "image_id": batch["image_id"]}


# --------------------------------------------------------------------------- datasets


def _labels(cfg: DataConfig, samples: list[Sample]) -> list[tuple[str, str]]:
    chips = cfg.chips
    assert chips is not None
    if chips.vector_labels:
        if cfg.source.masks:
            raise ValueError("data.chips.vector_labels: give vector labels or source.masks, not both")
        return [("vector", vector_url(chips.vector_labels, s.source_path)) for s in samples]
    missing = [s.source_path for s in samples if not s.mask]
    if missing:
        raise ValueError(f"data.source: no label raster for {len(missing)} scenes, e.g. {missing[0]} "
                         "(pair them with source.masks or a manifest, or give chips.vector_labels)")
    return [("raster", s.mask or "") for s in samples]


def _scenes(cfg: DataConfig) -> list[Sample]:
    samples = []
    for s in list_samples(cfg.source, cfg.storage):
        if s.error:  # a STAC item that is no scene (a missing asset, ...): it has no chips
            log.warning("skipping scene %s: %s", s.source_path, s.error)
        else:
            samples.append(s)
    if not samples:
        raise ValueError("data.source: no readable scene for training")
    return samples


def chip_rows(cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Driver side: headers -> (train rows, val rows) of chip windows; validates bands and nodata."""
    from segray.io.raster import read_headers
    from segray.io.raster import gdal_env

    chips = cfg.chips
    assert chips is not None
    samples = _scenes(cfg)
    labels = _labels(cfg, samples)
    env = gdal_env(cfg.storage)
    headers = read_headers([s.image for s in samples], env)
    label_headers = read_headers([u for kind, u in labels if kind == "raster"], env) if labels[0][0] == "raster" else []
    label_nodata = {u: h.nodata for (_, u), h in zip(labels, label_headers) if not isinstance(h, Exception)}
    rng = np.random.default_rng(seed)
    per_scene: list[list[dict]] = []
    reasons: list[str] = []
    for s, (kind, label), info in zip(samples, labels, headers):
        if isinstance(info, Exception):
            log.warning("skipping scene %s: %s", s.source_path, info)
            continue
        count = info.count
        if cfg.bands and max(cfg.bands) >= count:
            raise ValueError(f"data.bands: {s.source_path} has {count} bands, band {max(cfg.bands)} requested (0-based)")
        if kind == "vector" and info.crs is None:
            raise ValueError(f"data.chips.vector_labels: scene {s.source_path} has no CRS to place the polygons")
        if info.nodata is not None or chips.nodata is not None:
            reasons.append(f"{s.source_path} has nodata")
        if chips.label_nodata is not None or label_nodata.get(label) is not None:
            reasons.append(f"{label} has nodata")
        if min(info.height, info.width) < chips.size:
            reasons.append(f"{s.source_path} is smaller than a chip")
        windows = chip_windows(info.height, info.width, chips, rng)
        per_scene.append([dict(image=s.image, label=label, label_kind=kind, window=list(w), crs=info.crs or "",
                               transform=list(info.transform)) for w in windows])
    if not per_scene:
        raise ValueError("data.source: no readable scene for training")
    if reasons and cfg.ignore_index is None:
        raise ValueError(f"data.ignore_index: needed to leave nodata out of loss and metrics ({reasons[0]})")
    if len(per_scene) >= 2 and cfg.val_fraction > 0:  # whole scenes apart: no overlap between splits
        order = rng.permutation(len(per_scene))
        n_val = min(max(int(round(len(per_scene) * cfg.val_fraction)), 1), len(per_scene) - 1)
        val = [r for i in order[:n_val] for r in per_scene[i]]
        train = [r for i in order[n_val:] for r in per_scene[i]]
    else:  # one scene: split its chips (neighbouring chips may overlap across the split)
        rows = [r for scene in per_scene for r in scene]
        order = rng.permutation(len(rows))
        n_val = int(round(len(rows) * cfg.val_fraction)) if len(rows) > 1 else 0
        val = [rows[i] for i in sorted(order[:n_val])]
        train = [rows[i] for i in sorted(order[n_val:])]
    return train, val


def build_chip_datasets(cfg: DataConfig, seed: int, parallelism: int = 8):
    """:class:`segray.data.plans.TrainingData` of chips, shuffled and augmented as images are."""
    from segray.data.plans import TrainingData, ordered_items, train_plan, val_plan

    train_rows, val_rows = chip_rows(cfg, seed)
    data = cfg.model_dump(mode="json")

    def load(rows: list[dict]):
        ds = ordered_items(rows, parallelism)
        return ds.map_batches(read_chips, fn_kwargs={"data": data}, batch_size=8, num_cpus=0.5).materialize()

    train_ds = load(train_rows)
    val_ds = load(val_rows) if val_rows else None
    num_train = train_ds.count()
    if num_train == 0:
        raise ValueError("data.chips: no training chip has enough labelled pixels (min_valid_fraction)")
    if cfg.band_stats is not None:
        stats = BandStats(mean=list(cfg.band_stats.mean), std=list(cfg.band_stats.std))
    else:  # from a sample of chips; NaN (nodata) pixels are skipped
        stats = compute_band_stats(row["image"] for row in train_ds.limit(STATS_SAMPLE).iter_rows())
    fill = {"fn_kwargs": {"mean": stats.mean}, "batch_size": 8, "num_cpus": 0.5}
    decoded = train_ds.map_batches(fill_nodata, **fill)
    if val_ds is not None:
        val_ds = val_ds.map_batches(fill_nodata, **fill)
    return TrainingData(train=train_plan(decoded, cfg, seed), val=val_plan(val_ds, cfg), band_stats=stats,
                        decoded=decoded, num_train=num_train)
