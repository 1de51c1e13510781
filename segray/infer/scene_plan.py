"""The plan of a scenes run (see ``scenes.py``), made on the driver from the checkpoint and the
scenes' headers only: per-scene objects (``PlannedScene``), the chunk rows the tile dataset
starts from, the stitch task of each scene (``StitchTask``), and the driver's tallies of a run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from typing import Any

from segray.config import ConfigError, SceneInferJobConfig
from segray.core.checkpoint import Checkpoint
from segray.core.models import receptive_radius
from segray.infer.families import family_of
from segray.infer.scene_family import SceneFamily
from segray.infer.scene_layout import (
    INSTANCES,
    MASKS,
    MIXED_CRS,
    PROBABILITIES,
    finished_url,
    publication,
    scene_raster,
    scene_row,
    work_area,
)
from segray.infer.scene_grid import grid_tiles, virtual_size
from segray.infer.scene_steps import model_align
from segray.infer.steps import open_checkpoint
from segray.io.commit import Publication, folder_files, write_atomic
from segray.io.fs import Sample, join, read_bytes
from segray.io.sources import list_samples
from segray.io.raster import RasterInfo, gdal_env, read_headers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedScene:
    """A scene whose header fits the model: its grid over the virtual extent, its work folder."""

    sample: Sample
    info: RasterInfo
    num_tiles: int
    vheight: int
    vwidth: int
    blob_dir: str

    @property
    def scene_id(self) -> str:
        return self.sample.image_id

    def chunk_rows(self, batch_size: int) -> list[dict[str, Any]]:
        """The tile dataset's input rows: one per ``batch_size`` tiles of the scene."""
        s, info = self.sample, self.info
        return [dict(scene_id=s.image_id, url=s.image, label=s.mask or "", blob_dir=self.blob_dir, crs=info.crs or "",
                     transform=list(info.transform), height=info.height, width=info.width, bands=info.count,
                     vheight=self.vheight, vwidth=self.vwidth, tile_start=start,
                     tile_stop=min(start + batch_size, self.num_tiles))
                for start in range(0, self.num_tiles, batch_size)]


@dataclass(frozen=True)
class StitchSettings:
    """The part of every stitch task that is the same for all scenes of a run."""

    tile_size: int
    overlap: int
    blend: str
    margin: int
    block_size: int
    num_classes: int
    class_names: list[str]
    prob_dtype: str
    compress: str
    env: dict
    polygon_crs: str | None
    min_polygon_pixels: int
    polygon_max_vertices: int
    label_values: dict[int, int] | None
    label_nodata: int | None
    gdal_cache_mb: int | None
    merge_ios: float
    band_rows: int


@dataclass(frozen=True)
class StitchTask:
    """What one scene's stitch (or merge) task gets; the remote function receives ``to_dict()``."""

    scene_id: str
    url: str
    label: str  # "" without ground truth
    height: int
    width: int
    vheight: int
    vwidth: int
    crs: str  # "" without a CRS
    transform: list[float]
    blob_dir: str
    band_dir: str  # the pieces of its row bands (scene_bands)
    mask_url: str
    prob_url: str | None
    instance_url: str | None
    polygons_url: str | None
    settings: StitchSettings

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "settings"}
        out.update({f.name: getattr(self.settings, f.name) for f in fields(StitchSettings)})
        return out


@dataclass
class SceneTally:
    """Driver-side progress of one scene's tiles (a few numbers, never pixels)."""

    num_tiles: int
    done: int = 0
    errors: list[str] = field(default_factory=list)
    tile_ms: float = 0.0


@dataclass
class TileRun:
    """What streaming the tiles gave: each scene's stitch result and tally."""

    results: dict[str, dict[str, Any]]
    tallies: dict[str, SceneTally]
    num_tiles: int
    tiles_wall_s: float  # since the start, when the last tile was written


@dataclass
class ScenesPlan:
    cfg: SceneInferJobConfig
    family: SceneFamily
    ckpt: Checkpoint
    num_classes: int
    in_channels: int
    class_names: list[str]
    bands: list[int] | None  # 1-based (GDAL)
    align: int
    env: dict
    work: str
    samples: list[Sample]
    scenes: dict[str, PlannedScene] = field(default_factory=dict)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # scenes refused at planning
    chunks: list[dict[str, Any]] = field(default_factory=list)
    polygon_crs: str | None = None
    publication: Publication | None = None
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)  # resumed: {scene id: its record}

    @property
    def model_name(self) -> str:
        return self.ckpt.model_name

    def polygon_part(self, scene_id: str) -> str:
        return join(self.work, "polygons", f"{scene_id}.parquet")

    def add(self, sample: Sample, info: RasterInfo | Exception | None) -> None:
        """A scene from its header: planned, or an error row when unreadable or unfit for the model
        (``None``: no header, the sample's own ``error`` says why)."""
        base = dict(scene_id=sample.image_id, source_path=sample.source_path, label_path=sample.mask,
                    model_name=self.model_name, checkpoint_id=self.ckpt.id, has_ground_truth=False)
        if sample.error:  # known at listing (a STAC item without its assets): "kind: message"
            self.rows[sample.image_id] = scene_row(**base, status="error", error=sample.error)
            return
        if isinstance(info, Exception):
            self.rows[sample.image_id] = scene_row(**base, status="error",
                                                   error=f"unreadable: {type(info).__name__}: {info}")
            return
        why = self._band_mismatch(info)
        if why:
            geo = dict(height=info.height, width=info.width, bands=info.count, dtype=info.dtype, crs=info.crs,
                       transform=list(info.transform), bounds=list(info.bounds), nodata=info.nodata)
            self.rows[sample.image_id] = scene_row(**base, **geo, status="error", error=why)
            return
        cfg = self.cfg
        vh = virtual_size(info.height, cfg.tile_size, self.align)
        vw = virtual_size(info.width, cfg.tile_size, self.align)
        n = len(grid_tiles(vh, vw, cfg.tile_size, cfg.overlap))
        scene = PlannedScene(sample, info, n, vh, vw, join(self.work, "tiles", sample.image_id))
        self.scenes[sample.image_id] = scene
        if sample.image_id not in self.finished:  # a resumed scene's outputs are written already
            self.chunks.extend(scene.chunk_rows(cfg.batch_size))

    def _band_mismatch(self, info: RasterInfo) -> str | None:
        bands = self.bands
        wanted = len(bands) if bands else info.count
        bad = [b for b in bands or [] if b > info.count]
        if bad:
            return f"band {bad[0]} requested, scene has {info.count}"
        if wanted != self.in_channels:
            return f"scene has {info.count} bands, model expects {self.in_channels} (set bands)"
        return None

    def stitch_settings(self) -> StitchSettings:
        cfg = self.cfg
        return StitchSettings(
            tile_size=cfg.tile_size, overlap=cfg.overlap, blend=cfg.blend, margin=cfg.margin,
            block_size=cfg.block_size, num_classes=self.num_classes, class_names=self.class_names,
            prob_dtype=cfg.probabilities_dtype, compress=cfg.compress, env=self.env, polygon_crs=self.polygon_crs,
            min_polygon_pixels=cfg.min_polygon_pixels, polygon_max_vertices=cfg.polygon_max_vertices,
            label_values=cfg.label_values, label_nodata=cfg.label_nodata, gdal_cache_mb=cfg.gdal_cache_mb,
            merge_ios=cfg.merge_ios, band_rows=cfg.band_rows)

    def stitch_task(self, s: PlannedScene, settings: StitchSettings) -> StitchTask:
        cfg, sid, info = self.cfg, s.scene_id, s.info
        poly = cfg.polygons and (info.crs is not None or self.polygon_crs is None)  # no CRS: only if none has one
        return StitchTask(
            scene_id=sid, url=s.sample.image, label=s.sample.mask or "", height=info.height, width=info.width,
            vheight=s.vheight, vwidth=s.vwidth, crs=info.crs or "", transform=list(info.transform),
            blob_dir=s.blob_dir, band_dir=join(self.work, "bands", sid), mask_url=scene_raster(cfg, MASKS, sid),
            prob_url=scene_raster(cfg, PROBABILITIES, sid) if cfg.write_probabilities else None,
            instance_url=scene_raster(cfg, INSTANCES, sid) if self.family.writes_instances(cfg) else None,
            polygons_url=self.polygon_part(sid) if poly else None, settings=settings)


def plan_scenes(cfg: SceneInferJobConfig, samples: list[Sample] | None = None) -> ScenesPlan | dict[str, Any]:
    """Checkpoint and config checks, the output folder made ready, every scene's header read.
    ``samples``: the scenes, when the caller listed them (nightly); default ``cfg.source``'s.
    Returns the committed manifest instead when ``resume`` finds the run already complete."""
    ckpt = open_checkpoint(cfg.checkpoint, cfg.storage)
    cfg = cfg.model_copy(update={"blend": scene_blend(cfg, ckpt.model_config)})  # the plan's cfg: resolved
    family = family_of(ckpt).scenes
    family.check(cfg)
    num_classes, in_channels = ckpt.num_classes, ckpt.in_channels
    if num_classes > 255:
        raise ConfigError("segment-scenes writes uint8 class maps: at most 255 classes")
    names = _class_names(ckpt)
    bands0 = cfg.bands if cfg.bands is not None else ckpt.bands
    bands = [b + 1 for b in bands0] if bands0 else None  # GDAL bands are 1-based
    if bands and len(bands) != in_channels:
        raise ConfigError(f"bands: {len(bands)} bands given, the model takes {in_channels}")
    align = cfg.tile_align or model_align(ckpt.model_config)
    if (cfg.tile_size - cfg.overlap) % align or cfg.tile_size % align:
        log.warning("tile_size %d and tile_size - overlap %d are best multiples of %d (the model's pooling "
                    "factor); otherwise tiled predictions differ slightly from untiled ones",
                    cfg.tile_size, cfg.tile_size - cfg.overlap, align)
    samples = list_samples(cfg.source, cfg.storage) if samples is None else samples
    pub = publication(cfg)
    complete = pub.prepare()
    if complete is not None:
        return complete
    env, work = gdal_env(cfg.storage), work_area(cfg)
    plan = ScenesPlan(cfg, family, ckpt, num_classes, in_channels, names, bands, align, env, work, samples,
                      publication=pub, finished=finished_scenes(work, cfg.storage) if cfg.resume else {})
    headers = iter(read_headers([s.image for s in samples if not s.error], env))  # per scene, not per pixel
    for sample in samples:
        plan.add(sample, None if sample.error else next(headers))
    crss = {s.info.crs for s in plan.scenes.values()} - {None}  # scenes without a CRS get no polygons beside others
    plan.polygon_crs = None if not crss else next(iter(crss)) if len(crss) == 1 else MIXED_CRS
    return plan


def scene_blend(cfg: SceneInferJobConfig, model_config: dict) -> str:
    """``blend: auto`` resolved: ``core`` where the margin covers the model's receptive field
    (every core pixel is then more than its radius from an inner tile edge: the untiled result,
    with under a byte per pixel in the work area), else ``cosine``."""
    if cfg.blend != "auto":
        return cfg.blend
    radius = receptive_radius(model_config)
    return "core" if radius is not None and radius <= cfg.margin else "cosine"


def finished_scenes(work: str, storage) -> dict[str, dict[str, Any]]:
    """The records a killed run left of the scenes it finished (see ``StitchQueue``)."""
    done = join(work, "done")
    records = {}
    for name in folder_files(done, storage):
        if name.endswith(".json"):
            record = json.loads(read_bytes(join(done, name), storage))
            records[record["scene_id"]] = record
    return records


def record_finished(work: str, scene_id: str, result: dict[str, Any], tile_ms: float, storage) -> None:
    """Written once a scene's stitch task has returned: its outputs are complete."""
    record = {"scene_id": scene_id, "result": result, "tile_ms": tile_ms}
    write_atomic(finished_url(work, scene_id), json.dumps(record, default=_plain).encode(), storage)


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _class_names(ckpt: Checkpoint) -> list[str]:
    names = list(ckpt.class_names)
    return ["background", *names] if len(names) == 1 else names
