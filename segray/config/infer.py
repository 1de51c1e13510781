"""Inference jobs: images (``segray infer``), GeoTIFF/COG scenes (``segray segment-scenes``) and
the nightly incremental run over an archive (``segray nightly``).

The three share their actor pool (``ActorPoolConfig``: the model's actors and the CPU tasks
around them) and the instance limits (``InstanceLimitsConfig``). ``segray infer`` and
``segment-scenes`` take them as mixins (flat in their YAML); a nightly run contains the images
run settings as its ``infer`` section (``ImageRunConfig``, exactly what ``segray infer`` takes).
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from segray.config.base import _Strict
from segray.config.data import SourceConfig, StorageOptions
from segray.config.outputs import IcebergTableConfig


class ActorPoolConfig(_Strict):
    """The model's actor pool (Ray Data ``ActorPoolStrategy``) and the CPU tasks around it."""

    batch_size: int = Field(default=16, gt=0, description="images per model batch")
    num_actors: int = Field(default=2, gt=0)
    num_gpus_per_actor: float = Field(default=0.0, ge=0)
    cpus_per_actor: float = Field(default=0.5, gt=0)
    cpus_per_task: float = Field(default=0.5, gt=0, description="decode/encode tasks")


class ImagePoolConfig(ActorPoolConfig):
    """The actor pool of whole-image inference, with its image size cap."""

    max_pixels: int = Field(default=64_000_000, gt=0, description="larger images become error rows")
    out_of_range: Literal["warn", "refuse"] = Field(
        default="warn", description="images with values beyond the checkpoint's data (a 16-bit image into a "
        "model trained on 8-bit data): 'warn' predicts them with an out_of_range warning in the row's warnings; "
        "'refuse' makes them error rows of kind out_of_range")


class InstanceLimitsConfig(_Strict):
    """Instance (Mask R-CNN) checkpoints only: overrides of the limits the checkpoint was trained with."""

    score_threshold: Optional[float] = Field(
        default=None, ge=0, le=1, description="instances: minimum score (default: the checkpoint's box_score_thresh)")
    max_detections: Optional[int] = Field(
        default=None, gt=0, description="instances: most per image or tile (default: the checkpoint's "
        "box_detections_per_img)")
    mask_threshold: Optional[float] = Field(
        default=None, gt=0, lt=1, description="instances: mask probability cut (default: the checkpoint's)")


TTA_HELP = ("test-time augmentation: logits averaged over the identity and each listed transform (hflip, vflip, "
            "rot90), inverse-transformed back; semantic checkpoints only; N transforms cost ~N+1 forward passes")


class TTAConfig(_Strict):
    """Test-time augmentation (segray.core.tta) of a semantic model's predictions."""

    tta: list[Literal["hflip", "vflip", "rot90"]] = Field(default_factory=list, description=TTA_HELP)

    @model_validator(mode="after")
    def _distinct(self) -> "TTAConfig":
        if len(set(self.tta)) != len(self.tta):
            raise ValueError(f"tta: a transform is listed twice: {self.tta}")
        return self


class PredictorConfig(TTAConfig):
    """What runs the model in the predictor actors: eager PyTorch or the exported ONNX graph."""

    predictor: Literal["eager", "onnxruntime"] = Field(
        default="eager", description="eager: the checkpoint's PyTorch model; onnxruntime: its ONNX export on "
        "ONNX Runtime's CPU provider (semantic checkpoints; CPU nodes)")
    onnx_model: Optional[str] = Field(
        default=None, description="onnxruntime: the `segray export` ONNX file of this checkpoint (local or s3://); "
        "default: each actor exports the checkpoint to a temporary file when it starts")

    @model_validator(mode="after")
    def _onnx_only(self) -> "PredictorConfig":
        if self.onnx_model and self.predictor != "onnxruntime":
            raise ValueError("onnx_model: given with predictor 'eager' (set predictor: onnxruntime)")
        return self


class ImageRunConfig(PredictorConfig, InstanceLimitsConfig, ImagePoolConfig):
    """How whole images are run through a model: the actor pool, the image size cap and the
    instance limits. ``segray infer`` has these fields at its top level; a nightly run's ``infer``
    section is one."""


class InferJobConfig(ImageRunConfig):
    source: SourceConfig
    checkpoint: str = Field(description="checkpoint directory or .pt file, local or s3://")
    output: str = Field(description="output directory (local or s3://): predictions/, summary.parquet, _SUCCESS")
    overwrite: bool = Field(default=False, description="replace a committed output (it is withdrawn first)")
    resume: bool = Field(default=False, description="keep the rows a killed run finished; process only the rest")
    # ---- instance checkpoints (Mask R-CNN) only; with one, source.masks are instance-id maps
    coco_json: Optional[str] = Field(
        default=None, description="instance ground truth as COCO JSON (matched by file_name); adds COCO metrics")
    class_masks: Optional[str] = Field(
        default=None, description="class maps for instance-id ground truth in source.masks (paired by stem)")
    storage: StorageOptions = Field(default_factory=StorageOptions)
    table: Optional[IcebergTableConfig] = Field(default=None, description="rows to this Iceberg table (upserted by source_path) instead of output/predictions/")

    @model_validator(mode="after")
    def _images_only(self) -> "InferJobConfig":
        if self.source.stac is not None:
            raise ValueError("source.stac: STAC items are scenes: segment them with segment-scenes "
                             "(or nightly with workload: scenes)")
        return self


class SceneRunConfig(TTAConfig, InstanceLimitsConfig, ActorPoolConfig):
    """How scenes are tiled, predicted and stitched: what ``segment-scenes`` and a nightly run over
    scenes (``workload: scenes``) share.

    Stitching is exact for a fully-convolutional model when ``margin`` covers the model's
    receptive-field radius and ``overlap > 2 * margin`` (U-Net, maxpool/transpose: radius
    ``6 * 2**depth - 2`` px, e.g. 22 for depth 2, 46 for depth 3); smaller margins still blend
    seam-free but differ slightly from an untiled pass near tile edges.
    """

    tile_size: int = Field(default=512, ge=32)
    overlap: int = Field(default=128, ge=0)
    margin: int = Field(default=32, ge=0, description="tile-edge pixels given ~0 weight (receptive-field radius)")
    blend: Literal["auto", "cosine", "linear", "core"] = Field(
        default="auto", description="cosine/linear: tiles' probabilities blended over the overlaps; core: each "
        "pixel from the one tile whose core holds it, tiles passing on only their cores' class maps (under a byte "
        "per pixel; exact when margin covers the receptive field); auto: core where the margin covers the model's "
        "known receptive-field radius (U-Net: 6 * 2**depth - 2), else cosine")
    tile_align: Optional[int] = Field(
        default=None, gt=0, description="tile offsets are multiples of this; None = the model's downsampling factor")
    block_size: int = Field(default=512, ge=128, description="output COG block = stitching block (multiple of 16)")
    bands: Optional[list[int]] = Field(default=None, description="0-based bands, in order; None = the checkpoint's")
    nodata: Optional[float] = Field(default=None, description="input nodata value; overrides the files' own tag when set")
    label_values: Optional[dict[int, int]] = Field(default=None, description="ground truth value -> class id")
    label_nodata: Optional[int] = Field(default=None, description="ground truth value excluded from metrics")
    write_probabilities: bool = False
    probabilities_dtype: Literal["uint8", "float32"] = Field(
        default="uint8", description="uint8: round(p * 254), nodata 255; float32: p, nodata NaN")
    per_tile_rows: bool = Field(default=False, description="also write tiles.parquet, one row per tile")
    stac_items: Optional[bool] = Field(
        default=None, description="write stac/: a STAC Collection, one Item per segmented scene (default: when "
        "source.stac is the input)")
    polygons: bool = True
    min_polygon_pixels: int = Field(default=0, ge=0, description="drop smaller polygons (after merging)")
    polygon_max_vertices: int = Field(
        default=100_000, gt=0, description="a region growing past this many vertices (e.g. a class percolating "
        "through the scene as one web with countless holes) is emitted as its per-block pieces, flagged whole=false; "
        "so are the largest open regions while those pending hold over 20x this many (memory bound)")
    compress: Literal["deflate", "lzw", "zstd", "none"] = "deflate"
    work_dir: Optional[str] = Field(
        default=None, description="per-tile probabilities between predict and stitch; default <output>/_work. "
        "Must be reachable from every node (object storage or a shared filesystem)")
    keep_work: bool = False
    # the actor pool (ActorPoolConfig), with its own batch default and task description
    batch_size: int = Field(default=8, gt=0, description="tiles per model batch")
    cpus_per_task: float = Field(default=0.5, gt=0, description="read, write and stitch tasks")
    max_stitch_tasks: int = Field(default=2, gt=0, description="scenes assembled at once (COGs, polygons)")
    band_rows: int = Field(
        default=2048, ge=0, description="rows of a stitch band (rounded up to whole blocks): the bands of a scene "
        "are stitched by parallel tasks, each as soon as its tiles are predicted; 0 = one band per scene")
    gdal_cache_mb: int = Field(
        default=64, gt=0, description="GDAL block cache per worker process (GDAL's default, 5% of RAM, grows "
        "with every block read or written until full)")
    # ---- instance (Mask R-CNN) checkpoints only
    merge_ios: float = Field(
        default=0.5, gt=0, le=1, description="instances: merge detections from different tiles whose masks overlap "
        "by at least this fraction of the smaller one")
    write_instances: bool = Field(default=True, description="instances: also write instances/<scene>.tif (uint32 ids)")

    @model_validator(mode="after")
    def _consistent(self) -> "SceneRunConfig":
        if self.overlap >= self.tile_size:
            raise ValueError(f"overlap {self.overlap} must be smaller than tile_size {self.tile_size}")
        if self.margin and self.overlap <= 2 * self.margin:
            raise ValueError(f"margin: need overlap > 2 * margin (overlap {self.overlap}, margin {self.margin})")
        if self.block_size % 16:
            raise ValueError(f"block_size must be a multiple of 16, got {self.block_size}")
        return self


class SceneInferJobConfig(SceneRunConfig):
    """Segment GeoTIFF/COG scenes of any size: tiles with overlap -> actor pool -> blended,
    georeferenced outputs per scene (COG mask, optional probabilities, Parquet rows, polygons)."""

    source: SourceConfig = Field(description="scenes (.tif/.png/...); masks, if given, are ground truth for metrics")
    checkpoint: str = Field(description="checkpoint directory or .pt file, local or s3://")
    output: str = Field(description="output folder, local or s3://")
    overwrite: bool = Field(default=False, description="replace a committed output (it is withdrawn first)")
    resume: bool = Field(default=False, description="keep the scenes a killed run finished; process only the rest")
    storage: StorageOptions = Field(default_factory=StorageOptions)


class NightlyJobConfig(_Strict):
    """Nightly incremental inference over a growing archive (``segray nightly``, jobs/nightly.py).

    Each run lists the archive, skips every image whose (path, size, etag/mtime) a committed
    earlier run already processed, segments the rest into ``<output>/run_date=YYYY-MM-DD/`` and
    commits the partition with a ``_SUCCESS`` record written last (segray/infer/nightly.py).
    A checkpoint of any model family (one family per output). ``infer`` holds the run settings of
    ``segray infer`` (actor pool, image size cap, instance limits); configs that give them at the
    top level, as before, still load.
    """

    source: SourceConfig = Field(description="the archive: images (a folder/prefix), glob, or manifest")
    checkpoint: str = Field(description="checkpoint directory or .pt file, local or s3://")
    output: str = Field(description="root of the partitioned output, local or s3:// (run_date=YYYY-MM-DD/ below)")
    run_date: Optional[_dt.date] = Field(
        default=None, description="the night to run (YYYY-MM-DD); default: today in UTC. Set it for backfills")
    rebuild: bool = Field(
        default=False, description="rerun a night that is already committed (default: rerunning it is a no-op)")
    workload: Literal["images", "scenes"] = Field(
        default="images", description="images: rows as segray infer writes them; scenes: segment-scenes outputs "
        "(COG masks, scene rows, polygons) per night under run_date=.../scenes/")
    infer: ImageRunConfig = Field(default_factory=ImageRunConfig, description="how the night's images are run")
    scenes: SceneRunConfig = Field(default_factory=SceneRunConfig,
                                   description="how the night's scenes are tiled and stitched (workload: scenes)")
    storage: StorageOptions = Field(default_factory=StorageOptions)
    table: Optional[IcebergTableConfig] = Field(default=None, description="nights into this Iceberg table (one snapshot per night) instead of run_date= folders")

    @model_validator(mode="before")
    @classmethod
    def _flat_run_settings(cls, data: Any) -> Any:
        """The settings at the top level (the shape before ``infer``) move into ``infer``."""
        if not isinstance(data, dict):
            return data
        flat = {k: data[k] for k in ImageRunConfig.model_fields if k in data}
        if not flat:
            return data
        nested = data.get("infer")
        if nested is not None and not isinstance(nested, dict):
            return data  # a built ImageRunConfig: validation reports the extra fields
        both = sorted(set(flat) & set(nested or {}))
        if both:
            raise ValueError(f"infer.{both[0]}: given both at the top level and in infer")
        rest = {k: v for k, v in data.items() if k not in flat}
        return {**rest, "infer": {**(nested or {}), **flat}}

    @model_validator(mode="after")
    def _scenes_to_folders(self) -> "NightlyJobConfig":
        if self.workload == "scenes" and self.table is not None:
            raise ValueError("table: nights of workload 'scenes' go to run_date= folders (rasters have no table)")
        if self.source.stac is not None and self.workload != "scenes":
            raise ValueError("source.stac: STAC items are scenes: set workload: scenes")
        return self

    def night(self) -> _dt.date:
        return self.run_date or _dt.datetime.now(_dt.timezone.utc).date()

    def scene_config(self, output: str) -> "SceneInferJobConfig":
        """The SceneInferJobConfig of one night of scenes (written whole: the night is redone)."""
        return SceneInferJobConfig(output=output, source=self.source, checkpoint=self.checkpoint,
                                   storage=self.storage, overwrite=True, **self.scenes.model_dump())

    def infer_config(self, output: str) -> InferJobConfig:
        """The InferJobConfig of one night (same source, checkpoint and run settings)."""
        return InferJobConfig(output=output, source=self.source, checkpoint=self.checkpoint, storage=self.storage,
                              **self.infer.model_dump())


# --------------------------------------------------------------------------- loading
