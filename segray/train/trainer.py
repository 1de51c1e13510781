"""Driver side of training: datasets, TorchTrainer, best checkpoint, curves."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from segray.config import TrainJobConfig
from segray.io.fs import join, pyarrow_fs
from segray.runtime import model_runtime_env
from segray.train.loop import train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_path: str
    best_checkpoint: str
    latest_checkpoint: str
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    curves_png: str | None


def build_trainer(job: TrainJobConfig, datasets: dict, band_stats: dict, category_ids: list[int] | None = None):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = job.train
    fs, storage_path = pyarrow_fs(t.storage_path, job.data.storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.model_dump(mode="json"), "band_stats": band_stats, "has_val": "val" in datasets,
                           "category_ids": category_ids, "val_whole": True},
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=t.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.num_to_keep, checkpoint_score_attribute=t.metric, checkpoint_score_order=t.mode
            ),
            failure_config=FailureConfig(max_failures=t.max_failures),
            worker_runtime_env=model_runtime_env(),  # allocator settings (segray.runtime)
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),  # see loop.py: validation is read whole
    )


def _url(storage_root: str, fs_path: str) -> str:
    """Ray reports paths without the scheme; give users back the URL they can open."""
    scheme = storage_root.split("://", 1)[0] + "://" if "://" in storage_root else ""
    return fs_path if not scheme or fs_path.startswith(scheme) else scheme + fs_path


def run_training(job: TrainJobConfig, curves_path: str | None = None) -> TrainResult:
    import ray

    from segray.data.datasets import build_datasets
    from segray.data.instance_datasets import build_instance_datasets
    from segray.train.plots import plot_curves

    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    category_ids = None
    if job.task == "instance":  # COCO category ids travel in the checkpoint, for COCO exports
        train_ds, val_ds, stats, category_ids = build_instance_datasets(job.data, seed=job.train.seed)
    else:
        train_ds, val_ds, stats = build_datasets(job.data, seed=job.train.seed)
    datasets = {"train": train_ds, **({"val": val_ds} if val_ds is not None else {})}
    result = build_trainer(job, datasets, stats.to_dict(), category_ids).fit()
    if result.error:
        raise result.error

    best = result.get_best_checkpoint(job.train.metric, job.train.mode) or result.checkpoint
    best_metrics = next((m for c, m in result.best_checkpoints or [] if c.path == best.path), result.metrics)
    history = result.return_value or []
    run_path = _url(job.train.storage_path, result.path)
    curves = curves_path or join(run_path, "curves.png")
    plot_curves(history, curves, metric=job.train.metric, storage=job.data.storage)
    return TrainResult(
        run_path=run_path,
        best_checkpoint=_url(job.train.storage_path, best.path),
        latest_checkpoint=_url(job.train.storage_path, result.checkpoint.path),
        best_metrics={k: v for k, v in best_metrics.items() if isinstance(v, (int, float))},
        history=history,
        curves_png=curves,
    )


def summary_rows(result: TrainResult, class_names: list[str]) -> list[tuple[str, Any]]:
    m = result.best_metrics
    rows = [("epochs run", len(result.history))]
    rows += [(k, m[k]) for k in ("epoch", "val_miou", "val_pixel_accuracy", "val_mean_class_accuracy",
                                 "val_fwiou", "val_mean_dice", "val_segm_ap", "val_segm_ap50", "val_segm_ap75",
                                 "val_segm_ar", "val_bbox_ap", "val_bbox_ap50", "val_bbox_ap75", "val_bbox_ar",
                                 "val_loss", "train_loss") if k in m]
    rows += [(f"IoU {c}", m[f"val_iou/{c}"]) for c in class_names if f"val_iou/{c}" in m]
    return rows
