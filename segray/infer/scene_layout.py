"""Where a scenes run writes (see ``scenes.py``): the output folder's layout, the scene row
schema (``SCENE_SCHEMA``), and the check that refuses to mix runs in one folder.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

from segray.config import SceneInferJobConfig
from segray.io.commit import Publication
from segray.io.fs import join, pyarrow_fs

MASKS, PROBABILITIES, INSTANCES, WORK = "masks", "probabilities", "instances", "_work"
SCENES, TILES, POLYGONS, SUMMARY = "scenes.parquet", "tiles.parquet", "polygons.parquet", "summary.parquet"
MIXED_CRS = "OGC:CRS84"  # polygons.parquet CRS when scenes come in several CRSs

SCENE_SCHEMA = pa.schema(
    [
        ("scene_id", pa.string()),
        ("source_path", pa.string()),
        ("label_path", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("bands", pa.int32()),
        ("dtype", pa.string()),
        ("crs", pa.string()),  # "EPSG:xxxx" when GDAL finds an authority code, else WKT; null if none
        ("transform", pa.list_(pa.float64())),  # affine a, b, c, d, e, f (pixel -> map)
        ("bounds", pa.list_(pa.float64())),  # left, bottom, right, top in the CRS
        ("nodata", pa.float64()),
        ("num_tiles", pa.int32()),
        ("tile_errors", pa.int32()),
        ("mask_path", pa.string()),
        ("probabilities_path", pa.string()),
        ("num_polygons", pa.int64()),
        ("num_instances", pa.int64()),  # instance checkpoints: objects after merging across tiles
        ("valid_fraction", pa.float64()),
        ("class_pixels", pa.list_(pa.int64())),  # valid pixels per class
        ("class_fractions", pa.list_(pa.float64())),  # of the valid pixels
        ("mean_confidence", pa.float64()),
        ("has_ground_truth", pa.bool_()),
        ("pixel_accuracy", pa.float64()),
        ("miou", pa.float64()),
        ("iou", pa.list_(pa.float64())),
        ("dice", pa.list_(pa.float64())),
        ("confusion", pa.list_(pa.int64())),  # row-major [target, prediction]
        ("model_name", pa.string()),
        ("checkpoint_id", pa.string()),
        ("tile_s", pa.float64()),  # read + predict time summed over tiles
        ("stitch_s", pa.float64()),
    ]
)


def publication(cfg: SceneInferJobConfig) -> Publication:
    """The run's output folder, published by its ``_SUCCESS`` manifest (:mod:`segray.io.commit`)."""
    return Publication(cfg.output, cfg.storage, "segment-scenes", overwrite=cfg.overwrite, resume=cfg.resume)


def work_area(cfg: SceneInferJobConfig) -> str:
    """Tile blobs, polygon parts and finished-scene records. Named after the output, not the
    attempt, so that ``resume`` finds what a killed run finished."""
    if not cfg.work_dir:
        return join(cfg.output, WORK)
    return join(cfg.work_dir, hashlib.sha1(cfg.output.encode()).hexdigest()[:12])


def finished_url(work: str, scene_id: str) -> str:
    """The record of a scene whose outputs are written (its stitch result, as JSON)."""
    return join(work, "done", f"{scene_id}.json")


def scene_raster(cfg: SceneInferJobConfig, folder: str, scene_id: str) -> str:
    """``<output>/<folder>/<scene_id>.tif`` (``MASKS``, ``PROBABILITIES`` or ``INSTANCES``)."""
    return join(cfg.output, folder, f"{scene_id}.tif")


def target(url: str, storage) -> tuple[Any, str]:
    """(pyarrow filesystem, path) for a file to write, its parent folder created (local paths)."""
    fs, path = pyarrow_fs(url, storage)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    return fs, path


def scene_row(**values: Any) -> dict[str, Any]:
    row = dict.fromkeys(SCENE_SCHEMA.names)
    row.update(values)
    return row
