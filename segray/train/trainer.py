"""Driver side of training: datasets, TorchTrainer, best checkpoint, test set, curves."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from segray.config import TrainJobConfig
from segray.io.commit import Publication
from segray.io.fs import join, pyarrow_fs
from segray.runtime import model_runtime_env, start_ray
from segray.train.loop import check_finetune, train_loop_per_worker
from segray.train.tasks import TASKS


@dataclass
class TrainResult:
    run_path: str
    best_checkpoint: str
    latest_checkpoint: str
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    curves_png: str | None
    test_metrics: dict[str, Any] = field(default_factory=dict)  # data.test_source, best checkpoint
    class_weights: list[float] | None = None  # as trained (resolved when loss.class_weights is 'auto')


def loop_plan(job: TrainJobConfig, num_train: int) -> dict[str, int]:
    """Batches per worker and epoch, and optimizer steps in the run (the poly schedule's horizon).

    Ray Train splits the training set equally (``streaming_split(equal=True)``): each worker gets
    ``num_train // num_workers`` rows and drops its last partial batch.
    """
    t = job.train
    batches = (num_train // t.num_workers) // t.batch_size
    return {"batches_per_epoch": batches,
            "total_steps": max(1, t.epochs * math.ceil(batches / t.accumulate_grad_batches))}


def build_trainer(job: TrainJobConfig, datasets: dict, band_stats: dict, plan: dict,
                  category_ids: list[int] | None = None, loop: Callable = train_loop_per_worker):
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from segray.data.plans import restart_epoch_count

    t = job.train
    fs, storage_path = pyarrow_fs(t.storage_path, job.data.storage)
    restart_epoch_count(datasets["train"])
    return TorchTrainer(
        loop,
        train_loop_config={"job": job.model_dump(mode="json"), "band_stats": band_stats, "has_val": "val" in datasets,
                           "category_ids": category_ids, "val_whole": True, "plan": plan},
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
        # Validation is read whole (see loop.py). preserve_order: the seeded shuffle then reaches
        # the same worker in the same order in every run, and every worker reads validation alike.
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ExecutionOptions(preserve_order=True)),
    )


def _url(storage_root: str, fs_path: str) -> str:
    """Ray reports paths without the scheme; give users back the URL they can open."""
    scheme = storage_root.split("://", 1)[0] + "://" if "://" in storage_root else ""
    return fs_path if not scheme or fs_path.startswith(scheme) else scheme + fs_path


def evaluate_test_set(job: TrainJobConfig, checkpoint: str, run_path: str) -> dict[str, Any]:
    """The best checkpoint on ``data.test_source``, through the inference pipeline (whole images,
    exactly as ``segray infer`` will see them); predictions land in ``<run>/test``."""
    from segray.config import InferJobConfig
    from segray.infer.pipeline import run_inference

    cfg = InferJobConfig(source=job.data.test_source, checkpoint=checkpoint, output=join(run_path, "test"),
                         overwrite=True, storage=job.data.storage)
    return run_inference(cfg)


def run_training(job: TrainJobConfig, curves_path: str | None = None) -> TrainResult:
    from segray.data.datasets import build_datasets
    from segray.train.plots import plot_curves

    check_finetune(job)  # before any cluster work
    # A rerun under the same name withdraws the last run's commit first: Ray Train rotates the
    # checkpoints it lists (num_to_keep), and a killed rerun must not look like a finished run.
    publication = Publication(join(job.train.storage_path, job.train.name), job.data.storage, "train")
    publication.uncommit()
    start_ray()
    data = build_datasets(job.data, seed=job.train.seed)
    job = TASKS[job.task].prepare(job, data.decoded)
    datasets = {"train": data.train, **({"val": data.val} if data.val is not None else {})}
    plan = loop_plan(job, data.num_train)
    result = build_trainer(job, datasets, data.band_stats.to_dict(), plan, data.category_ids).fit()
    if result.error:
        raise result.error

    best = result.get_best_checkpoint(job.train.metric, job.train.mode) or result.checkpoint
    best_metrics = next((m for c, m in result.best_checkpoints or [] if c.path == best.path), result.metrics)
    history = result.return_value or []
    run_path = _url(job.train.storage_path, result.path)
    curves = curves_path or join(run_path, "curves.png")
    plot_curves(history, curves, metric=job.train.metric, storage=job.data.storage)
    best_url = _url(job.train.storage_path, best.path)
    test = evaluate_test_set(job, best_url, run_path) if job.data.test_source is not None else {}
    result = TrainResult(
        run_path=run_path,
        best_checkpoint=best_url,
        latest_checkpoint=_url(job.train.storage_path, result.checkpoint.path),
        best_metrics={k: v for k, v in best_metrics.items() if isinstance(v, (int, float))},
        history=history,
        curves_png=curves,
        test_metrics=test,
        class_weights=job.loss.class_weights if isinstance(job.loss.class_weights, list) else None,
    )
    commit_run(result, job.data.storage)
    return result


def commit_run(result: TrainResult, storage) -> dict[str, Any]:
    """The run folder's ``_SUCCESS`` (segray.io.commit), last: ``segray infer`` given the run
    folder as ``checkpoint`` reads its best checkpoint from here; a killed run has none."""
    record = {"best_checkpoint": result.best_checkpoint, "latest_checkpoint": result.latest_checkpoint,
              "best_metrics": result.best_metrics, "epochs": len(result.history), "curves_png": result.curves_png,
              "test_metrics": {k: v for k, v in result.test_metrics.items() if isinstance(v, (int, float, str))}}
    return Publication(result.run_path, storage, "train").commit(record)


def summary_rows(result: TrainResult, class_names: list[str]) -> list[tuple[str, Any]]:
    """The end-of-training table: which split and checkpoint the figures are from, per-class IoU,
    the samples each worker saw per epoch, and the test set when one was given."""
    m = result.best_metrics
    rows: list[tuple[str, Any]] = [("epochs run", len(result.history)),
                                   ("metrics of", f"best checkpoint (epoch {m.get('epoch', '?')}), validation split")]
    rows += [(k, m[k]) for k in ("val_miou", "val_pixel_accuracy", "val_mean_class_accuracy",
                                 "val_fwiou", "val_mean_dice", "val_segm_ap", "val_segm_ap50", "val_segm_ap75",
                                 "val_segm_ar", "val_bbox_ap", "val_bbox_ap50", "val_bbox_ap75", "val_bbox_ar",
                                 "val_loss", "train_loss", "train_step_s") if k in m]
    rows += [(f"IoU {c}", m[f"val_iou/{c}"]) for c in class_names if f"val_iou/{c}" in m]
    last = result.history[-1] if result.history else {}
    workers = sorted(k for k in last if k.startswith("train_samples/w"))
    if workers:
        rows.append(("samples per epoch per worker", [int(last[k]) for k in workers]))
    if result.class_weights is not None:
        rows.append(("class weights", [round(w, 3) for w in result.class_weights]))
    t = result.test_metrics
    if t:
        rows.append(("test images (ok / all)", f"{t.get('num_ok')} / {t.get('num_inputs')}"))
        rows += [(f"test_{k}", t[k]) for k in ("miou", "pixel_accuracy", "mean_dice") if k in t]
        rows += [(f"test IoU {c}", t[f"iou/{c}"]) for c in class_names if f"iou/{c}" in t]
    return rows
