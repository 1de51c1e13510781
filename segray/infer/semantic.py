"""The semantic family's images parts: rows of image (+ mask) URLs -> class maps -> ``OUTPUT_SCHEMA``.

The steps themselves are in :mod:`segray.infer.steps` (the predictor is the base of every
family's); this module says how a run of them is set up and summarised.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch

from segray.config import ConfigError, InferJobConfig
from segray.core.checkpoint import Checkpoint
from segray.core.metrics import segmentation_metrics
from segray.infer.family import ImageStages
from segray.infer.runtimes import ort_threads
from segray.infer.runs import PREDICTIONS, run_counts
from segray.infer.steps import Predictor, encode
from segray.io.fs import join, pyarrow_fs
from segray.io.images import full_scale
from segray.io.listing import LISTING
from segray.io.reads import read_decode


def semantic_stages(cfg: InferJobConfig, listed: pa.Table, ckpt: Checkpoint) -> ImageStages:
    if cfg.coco_json or cfg.class_masks:
        raise ConfigError("coco_json/class_masks: ground truth of instances needs an instance (Mask R-CNN) checkpoint")
    return ImageStages(
        items=listed.select(LISTING.names),  # the listing's columns are the rows' (segray.io.listing)
        read=read_decode,
        read_kwargs={"storage": cfg.storage, "bands": ckpt.bands, "max_pixels": cfg.max_pixels,
                     "full_scale": full_scale(ckpt.band_stats), "out_of_range": cfg.out_of_range},
        predictor=Predictor,
        predictor_kwargs={"checkpoint": cfg.checkpoint, "storage": cfg.storage, "max_batch": cfg.batch_size,
                          "predictor": cfg.predictor, "onnx_model": cfg.onnx_model, "tta": list(cfg.tta),
                          "threads": ort_threads(cfg.cpus_per_actor)},
        encode=encode,
        encode_kwargs={"class_names": ckpt.class_names, "ignore_index": ckpt.ignore_index},
    )


def summarize_semantic(cfg: InferJobConfig, ckpt: Checkpoint, num_inputs: int, wall_s: float) -> dict[str, Any]:
    """Counts, and the dataset-level metrics from the summed confusion matrices of rows with ground truth."""
    fs, path = pyarrow_fs(join(cfg.output, PREDICTIONS), cfg.storage)
    cols = ["status", "error_kind", "height", "width", "confusion", "decode_ms", "predict_ms"]
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=cols)
    summary = run_counts(cfg, ckpt, num_inputs, wall_s, table)
    cms = [c for c in table["confusion"].to_pylist() if c is not None]
    summary["num_with_ground_truth"] = len(cms)
    if cms:
        k = int(round(math.sqrt(len(cms[0]))))
        cm = torch.tensor(np.sum(cms, axis=0).reshape(k, k))
        summary.update(segmentation_metrics(cm, ckpt.class_names))
    return summary
