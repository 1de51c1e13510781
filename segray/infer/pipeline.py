"""Bulk inference on Ray Data: list -> read+decode (CPU tasks) -> predict (actor pool) -> encode -> Parquet.

Nothing is collected on the driver: rows stream from the source through the actor pool into
Parquet files, and the summary is computed afterwards from a few small columns.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from segray.config import ConfigError, InferJobConfig
from segray.core.metrics import segmentation_metrics
from segray.infer.steps import Predictor, encode, error_reasons, read_checkpoint, read_decode
from segray.io.fs import exists, join, list_samples, pyarrow_fs, remove_tree
from segray.runtime import model_runtime_env

PREDICTIONS = "predictions"
SUMMARY = "summary.parquet"


def check_output(cfg: InferJobConfig) -> None:
    """Ray Data appends to existing Parquet folders: refuse unless asked to overwrite."""
    target = join(cfg.output, PREDICTIONS)
    if exists(target, cfg.storage):
        if not cfg.overwrite:
            raise ConfigError(f"output: {target} already exists (set overwrite=true to replace it)")
        remove_tree(target, cfg.storage)


def build_dataset(cfg: InferJobConfig, samples: list, payload: dict):
    """The lazy Ray Dataset of output rows (a pyarrow schema of steps.OUTPUT_SCHEMA)."""
    import ray
    from ray.data import ActorPoolStrategy

    if payload.get("task") == "instance" or cfg.coco_json or cfg.class_masks:  # Mask R-CNN: instance rows
        from segray.infer.instance import build_instance_dataset

        return build_instance_dataset(cfg, samples, payload)

    items = [{"image": s.image, "mask": s.mask or "", "image_id": s.image_id} for s in samples]
    # Blocks of a few batches: enough blocks to keep every actor busy, few enough to stay cheap.
    blocks = max(1, min(len(items), max(cfg.num_actors * 4, math.ceil(len(items) / (cfg.batch_size * 2)))))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(
        read_decode,
        fn_kwargs={"storage": cfg.storage, "bands": payload.get("bands"), "max_pixels": cfg.max_pixels},
        batch_size=cfg.batch_size,
        num_cpus=cfg.cpus_per_task,
    )
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"checkpoint": cfg.checkpoint, "storage": cfg.storage, "max_batch": cfg.batch_size},
        compute=ActorPoolStrategy(size=cfg.num_actors),
        batch_size=cfg.batch_size,
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.num_gpus_per_actor,
        runtime_env=model_runtime_env(),  # allocator settings (segray.runtime): ~1.5x on CPU
    )
    return ds.map_batches(
        encode,
        fn_kwargs={"class_names": payload["class_names"], "ignore_index": payload.get("ignore_index")},
        batch_size=cfg.batch_size,
        num_cpus=cfg.cpus_per_task,
    )


def run_inference(cfg: InferJobConfig) -> dict[str, Any]:
    """Runs the job; returns the summary (also written to ``<output>/summary.parquet``)."""
    import ray

    # Everything that can fail fast does so before any cluster work.
    payload, ckpt_id = read_checkpoint(cfg.checkpoint, cfg.storage)
    samples = list_samples(cfg.source, cfg.storage)
    check_output(cfg)

    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    t0 = time.perf_counter()
    fs, out_path = pyarrow_fs(join(cfg.output, PREDICTIONS), cfg.storage)
    # The write asks for the encode tasks' CPUs, so Ray Data fuses encode->Write into one task:
    # with its default 1 CPU the Write ran as separate tasks, one more object-store hop per
    # block, and waited for a whole free CPU beside the busy actors.
    build_dataset(cfg, samples, payload).write_parquet(
        out_path, filesystem=fs, ray_remote_args={"num_cpus": cfg.cpus_per_task})
    wall = time.perf_counter() - t0

    summary = summarize(cfg, payload, ckpt_id, num_inputs=len(samples), wall_s=wall)
    write_summary(cfg, summary)
    return summary


def summarize(cfg: InferJobConfig, payload: dict, ckpt_id: str, num_inputs: int, wall_s: float) -> dict[str, Any]:
    if payload.get("task") == "instance":
        from segray.infer.instance import summarize_instances

        return summarize_instances(cfg, payload, ckpt_id, num_inputs, wall_s)
    fs, path = pyarrow_fs(join(cfg.output, PREDICTIONS), cfg.storage)
    cols = ["status", "error", "height", "width", "confusion", "decode_ms", "predict_ms"]
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=cols)
    summary = run_counts(cfg, payload, ckpt_id, num_inputs, wall_s, table)
    names = payload["class_names"]
    cms = [c for c in table["confusion"].to_pylist() if c is not None]
    summary["num_with_ground_truth"] = len(cms)
    if cms:
        k = int(round(math.sqrt(len(cms[0]))))
        cm = torch.tensor(np.sum(cms, axis=0).reshape(k, k))
        summary.update(segmentation_metrics(cm, names))
    return summary


def run_counts(cfg: InferJobConfig, payload: dict, ckpt_id: str, num_inputs: int, wall_s: float,
               table: pa.Table) -> dict[str, Any]:
    """What every inference summary reports, from the written rows' ``status``, ``error``,
    ``height``, ``width``, ``decode_ms`` and ``predict_ms``: counts, rates, stage times, errors."""
    status = np.asarray(table["status"].to_pylist())
    ok = status == "ok"
    errors = [e for e, s in zip(table["error"].to_pylist(), status) if s != "ok"]
    pixels = float(np.sum(np.asarray(table["height"].to_pylist(), float) * np.asarray(table["width"].to_pylist(), float)))
    return {
        "run_id": uuid.uuid4().hex[:12],
        "output": cfg.output,
        "predictions": join(cfg.output, PREDICTIONS),
        "model_name": payload["model_config"]["name"],
        "checkpoint_id": ckpt_id,
        "num_inputs": num_inputs,
        "num_rows": len(status),
        "num_ok": int(ok.sum()),
        "num_error": int((~ok).sum()),
        "wall_s": wall_s,
        "images_per_s": len(status) / wall_s if wall_s else 0.0,
        "megapixels_per_s": pixels / 1e6 / wall_s if wall_s else 0.0,
        "mean_decode_ms": float(np.mean(table["decode_ms"].to_pylist())) if len(status) else 0.0,
        "mean_predict_ms": float(np.mean(table["predict_ms"].to_pylist())) if len(status) else 0.0,
        "error_reasons": error_reasons(errors),
    }


def write_summary(cfg: InferJobConfig, summary: dict[str, Any]) -> None:
    fs, path = pyarrow_fs(join(cfg.output, SUMMARY), cfg.storage)
    row = {k: [", ".join(v) if isinstance(v, list) else v] for k, v in summary.items()}
    pq.write_table(pa.Table.from_pydict(row), path, filesystem=fs)
