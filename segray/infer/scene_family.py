"""What a model family gives the scenes pipeline (``Family.scenes``): one object, no ``if`` per family.

``scenes.py`` wires the same Ray Data stages for every family (read tiles -> the family's tile
predictor, an actor pool -> the family's tile writer) and submits the family's scene merge once
a scene's last tile is in. The semantic parts are ``scene_steps.SEMANTIC_SCENES``, the instance
parts ``scene_instances.INSTANCE_SCENES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from segray.config import ConfigError, SceneInferJobConfig


@dataclass(frozen=True)
class SceneFamily:
    """The scene parts of a model family."""

    name: str
    predictor: type  # actor: tile rows with ``pixels`` -> rows with the family's predictions
    predictor_kwargs: Callable[[SceneInferJobConfig], dict[str, Any]]  # beyond checkpoint/storage/max_batch
    write_tiles: Callable[..., pa.Table]  # predictions -> work-area blobs, rows of ``TILE_SCHEMA``
    write_kwargs: Callable[..., dict[str, Any]]  # (cfg, Checkpoint, GDAL env)
    stitch: Callable[..., dict[str, Any]]  # (stitch task dict, storage) -> scene result; never raises
    polygon_schema: pa.Schema  # of polygons.parquet
    polygon_types: tuple[str, ...]  # GeoParquet geometry types
    instance_rasters: bool = False  # writes instances/<scene_id>.tif (when write_instances)
    no_probabilities: str | None = None  # why write_probabilities is refused (None: allowed)
    no_tta: str | None = None  # why tta (test-time augmentation) is refused (None: allowed)
    # stitched in row bands instead (``scene_bands``): (task, band, storage) -> band result, and
    # (task, storage, band result refs) -> scene result; both never raise. None: one ``stitch`` per scene.
    band: Callable[..., dict[str, Any]] | None = None
    assemble: Callable[..., dict[str, Any]] | None = None

    def check(self, cfg: SceneInferJobConfig) -> None:
        """Refuse job settings the family cannot serve."""
        if cfg.write_probabilities and self.no_probabilities:
            raise ConfigError(f"write_probabilities: {self.no_probabilities}")
        if cfg.tta and self.no_tta:
            raise ConfigError(f"tta: {self.no_tta}")

    def writes_instances(self, cfg: SceneInferJobConfig) -> bool:
        return self.instance_rasters and bool(cfg.write_instances)
