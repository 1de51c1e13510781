"""Data sections: where images come from (any fsspec URL), how they are read and augmented,
and the training data of a job (semantic class maps, instance masks, COCO, or scene chips)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from segray.config.base import Size2D, _Strict


class StorageOptions(_Strict):
    """fsspec/pyarrow options for object storage (an S3-compatible endpoint, keys)."""

    endpoint_url: Optional[str] = None
    key: Optional[str] = None
    secret: Optional[str] = None
    region: Optional[str] = None


class StacSourceConfig(_Strict):
    """Scenes from a STAC catalog or API: each item one scene, its band assets stacked on one grid.

    ``catalog``: a static Catalog, Collection or ItemCollection (or one Item) JSON on any fsspec
    URL; ``api``: a STAC API searched with pystac-client. ``assets`` names the band assets in band
    order; the grid is the first asset's (its CRS, extent and pixel size) or ``resolution`` (in
    the CRS's units). Other assets are resampled onto it by GDAL (``resampling``, per asset in
    ``asset_resampling``), read windowed; ``raster:bands`` scale, offset and nodata are applied.
    """

    catalog: Optional[str] = None
    api: Optional[str] = None
    collections: Optional[list[str]] = None
    bbox: Optional[list[float]] = Field(default=None, min_length=4, max_length=4, description="west, south, east, north")
    intersects: Optional[dict] = Field(default=None, description="a GeoJSON geometry")
    datetime: Optional[str] = Field(default=None, description="an instant or interval, e.g. 2024-01-01/2024-06-30")
    query: Optional[dict] = Field(default=None, description='e.g. {"eo:cloud_cover": {"lt": 20}}')
    filter: Optional[str] = Field(default=None, description="CQL2 text, e.g. \"eo:cloud_cover < 20\" (API only)")
    max_items: Optional[int] = Field(default=None, gt=0)
    assets: list[str] = Field(min_length=1, description="band asset keys in band order, e.g. [B04, B03, B02, B08]")
    label_asset: Optional[str] = Field(default=None, description="a class-map asset on the grid (chips training)")
    resolution: Optional[float] = Field(default=None, gt=0)
    resampling: Literal["nearest", "bilinear", "cubic", "average", "mode"] = "bilinear"
    asset_resampling: dict[str, Literal["nearest", "bilinear", "cubic", "average", "mode"]] = Field(
        default_factory=dict)

    @model_validator(mode="after")
    def _one_catalog(self) -> "StacSourceConfig":
        if bool(self.catalog) == bool(self.api):
            raise ValueError("give exactly one of catalog, api")
        if self.filter and self.catalog:
            raise ValueError("filter (CQL2) needs a STAC API; a static catalog takes query")
        unknown = sorted(set(self.asset_resampling) - set(self.assets))
        if unknown:
            raise ValueError(f"asset_resampling: {unknown[0]!r} is not one of assets")
        return self


class SourceConfig(_Strict):
    """Where images (and optionally masks) come from, on any fsspec URL.

    Exactly one of ``images`` (a folder), ``glob``, ``manifest`` or ``stac`` (a catalog or API,
    scenes only) names the images. Masks pair with images by file stem (folder pair) or by the
    manifest's second column.
    """

    images: Optional[str] = None
    masks: Optional[str] = None
    glob: Optional[str] = None
    manifest: Optional[str] = None
    stac: Optional[StacSourceConfig] = None
    extensions: list[str] = Field(default_factory=lambda: [".png", ".jpg", ".jpeg", ".tif", ".tiff"])
    mask_suffix: str = ""
    limit: Optional[int] = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> "SourceConfig":
        given = [n for n in ("images", "glob", "manifest", "stac") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of images, glob, manifest, stac (got {given or 'none'})")
        return self



class AugmentConfig(_Strict):
    hflip: float = Field(default=0.5, ge=0, le=1)
    vflip: float = Field(default=0.5, ge=0, le=1)
    rot90: float = Field(default=0.5, ge=0, le=1)
    rotate_degrees: float = Field(default=10.0, ge=0, le=180)
    brightness: float = Field(default=0.1, ge=0, le=1)
    contrast: float = Field(default=0.1, ge=0, le=1)


class BandStatsConfig(_Strict):
    """Per-band normalisation ``(x - mean) / std``, in the order of the bands read."""

    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _same_length(self) -> "BandStatsConfig":
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError(f"mean and std need one value per band (got {len(self.mean)} and {len(self.std)})")
        if min(self.std) <= 0:
            raise ValueError("std values must be positive")
        return self


class ChipsConfig(_Strict):
    """Training windows ("chips") cut from GeoTIFF/COG scenes of any size, read windowed.

    Labels come from the raster paired with each scene by ``source.masks`` or the manifest's
    second column (pixel-aligned with the scene; ``label_values`` remaps values,
    ``label_nodata`` pixels are ignored), or from polygons in ``vector_labels`` (GeoJSON or
    GeoParquet, reprojected to the scene's CRS and rasterised per chip; ``{stem}`` in the
    path becomes the scene's file stem). Pixels that are nodata in the image or the label, or
    outside the scene, get ``data.ignore_index``: they count in neither loss nor metrics.
    """

    size: int = Field(default=256, ge=16, description="chip side in pixels")
    mode: Literal["random", "grid"] = "random"
    per_scene: Optional[int] = Field(
        default=16, gt=0, description="random: windows per scene; grid: a seeded subset of this many (None = all)")
    overlap: int = Field(default=0, ge=0, description="grid: overlap of neighbouring chips")
    vector_labels: Optional[str] = Field(default=None, description="GeoJSON/GeoParquet polygons; '{stem}' = scene stem")
    label_attribute: Optional[str] = Field(
        default=None, description="vector: property/column holding the class; None = every polygon is class 1")
    class_map: Optional[dict[str, int]] = Field(
        default=None, description="vector: property value -> class id (default: the value as an integer)")
    label_values: Optional[dict[int, int]] = Field(
        default=None, description="raster: label value -> class id, e.g. {255: 1}; unlisted values stay")
    label_nodata: Optional[int] = Field(default=None, description="raster: label value meaning 'no label'")
    nodata: Optional[float] = Field(default=None, description="image nodata value; overrides the files' own tag when set")
    min_valid_fraction: float = Field(default=0.5, ge=0, le=1, description="drop chips with fewer labelled pixels")

    @model_validator(mode="after")
    def _consistent(self) -> "ChipsConfig":
        if self.mode == "grid" and self.overlap >= self.size:
            raise ValueError(f"overlap {self.overlap} must be smaller than size {self.size}")
        if self.mode == "random" and self.per_scene is None:
            raise ValueError("per_scene: random chips need a count per scene")
        if self.vector_labels is None and (self.label_attribute or self.class_map):
            raise ValueError("label_attribute/class_map only apply to vector_labels")
        return self


class DataConfig(_Strict):
    """Training data. ``format`` says what the labels are:

    - ``semantic``: ``source.masks`` are class maps (one class index per pixel);
    - ``instance_masks``: ``source.masks`` are instance-id maps (0 background, 1..N one object
      each; ``ignore_index`` pixels belong to none); the class of each object is the majority
      value of the class map in ``class_masks`` (paired by file stem), or 1 for all without it;
    - ``coco``: ``coco_json`` (polygons or RLE) describes the images named by ``source``,
      matched by ``file_name``; categories map to ``class_names`` by name.
    """

    source: SourceConfig
    format: Literal["semantic", "instance_masks", "coco"] = "semantic"
    coco_json: Optional[str] = Field(default=None, description="COCO instances JSON (format: coco), any fsspec URL")
    class_masks: Optional[str] = Field(
        default=None, description="folder of class maps paired with the instance masks by stem (format: instance_masks)")
    class_names: list[str] = Field(default_factory=lambda: ["background", "foreground"])
    ignore_index: Optional[int] = Field(default=None, description="label value excluded from loss and metrics")
    bands: Optional[list[int]] = Field(default=None, description="0-based bands to read, in order; None = all")
    image_size: Optional[Size2D] = Field(
        default=None, description="resize every image to [h, w] (an int: square) before training; None = as is")
    crop_size: Optional[Size2D] = Field(
        default=None, description="random [h, w] crop of each training image, drawn anew every epoch (an int: "
        "square); images smaller than the crop are padded (mask: ignore_index, else mirrored)")
    scale_jitter: Optional[tuple[float, float]] = Field(
        default=None, description="rescale each training image by a random factor in [lo, hi] before the crop")
    val_crop: Literal["whole", "center"] = Field(
        default="whole", description="validate on whole images (any size) or on centre crops of crop_size")
    shuffle: Literal["global", "buffer", "none"] = Field(
        default="global", description="training order, reshuffled every epoch from train.seed: 'global' = Ray "
        "Data random_shuffle of the whole set; 'buffer' = a local shuffle buffer (shuffle_buffer_size rows) "
        "after randomizing block order, for sets too big to shuffle; 'none' = source order (rarely right)")
    shuffle_buffer_size: int = Field(default=512, gt=1, description="rows held by the 'buffer' shuffle, per worker")
    val_fraction: float = Field(default=0.2, ge=0, lt=1, description="random cut for validation (without val_source)")
    val_source: Optional[SourceConfig] = Field(
        default=None, description="a separate validation set (folder, glob or manifest); replaces the random cut "
        "(val_fraction is then not used)")
    test_source: Optional[SourceConfig] = Field(
        default=None, description="a test set, evaluated once with the best checkpoint after training")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    storage: StorageOptions = Field(default_factory=StorageOptions)
    chips: Optional[ChipsConfig] = Field(default=None, description="train on windows cut from GeoTIFF/COG scenes")
    band_stats: Optional[BandStatsConfig] = Field(
        default=None, description="fixed normalisation; None = computed from a sample of the training data")

    @property
    def task(self) -> str:
        return "semantic" if self.format == "semantic" else "instance"

    @property
    def has_val(self) -> bool:
        return self.val_source is not None or self.val_fraction > 0

    @model_validator(mode="after")
    def _sizes(self) -> "DataConfig":
        if self.scale_jitter is not None:
            lo, hi = self.scale_jitter
            if not 0 < lo <= hi:
                raise ValueError(f"scale_jitter: need 0 < lo <= hi, got [{lo}, {hi}]")
            if self.crop_size is None:
                raise ValueError("scale_jitter: rescaled images differ in size; give crop_size too")
        if self.val_crop == "center" and self.crop_size is None:
            raise ValueError("val_crop: 'center' crops to crop_size; give crop_size")
        if self.task == "instance" and (self.crop_size or self.scale_jitter or self.val_source or self.test_source):
            raise ValueError("crop_size/scale_jitter/val_source/test_source: semantic data only for now")
        return self

    @model_validator(mode="after")
    def _chips_fields(self) -> "DataConfig":
        if self.chips is None:
            if self.source.stac is not None:
                raise ValueError("source.stac: STAC items are scenes: train on them with chips")
            return self
        if self.format != "semantic":
            raise ValueError("chips: scene chips carry semantic labels (format 'semantic')")
        if self.image_size is not None:
            raise ValueError("image_size: chips have chips.size; leave image_size unset")
        if self.val_source is not None or self.test_source is not None:
            raise ValueError("val_source/test_source: chips hold out whole scenes (val_fraction)")
        if self.ignore_index is None and (self.chips.label_nodata is not None or self.chips.nodata is not None):
            raise ValueError("ignore_index: nodata pixels need an ignore_index to be left out of loss and metrics")
        return self

    @model_validator(mode="after")
    def _format_fields(self) -> "DataConfig":
        if self.format == "coco" and not self.coco_json:
            raise ValueError("coco_json: format 'coco' needs the COCO JSON file")
        if self.format != "coco" and self.coco_json:
            raise ValueError(f"coco_json: only read with format 'coco' (format is {self.format!r})")
        if self.format != "instance_masks" and self.class_masks:
            raise ValueError(f"class_masks: only read with format 'instance_masks' (format is {self.format!r})")
        if self.format != "semantic" and self.image_size is not None:
            raise ValueError("image_size: instance data keeps its size; Mask R-CNN resizes by model.min_size/max_size")
        return self
