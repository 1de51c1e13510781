"""The jobs segray runs on a cluster, registered once in :data:`JOBS`.

``segray submit`` (what to upload and run, which config class validates the config), the CLI
(the job commands run a job's ``run``; ``submit`` and ``show-config`` list the names) and the
entrypoints ``jobs/*.py`` (``run_job(name, sys.argv[1:])`` in :mod:`segray.cli`) all read it.

Each job: its config class, the function that runs a validated config (it checks what needs no
cluster, then joins or starts Ray, and prints the summary; Ray, torch and the runner are imported only when it is called, so
importing this module stays cheap), its entrypoint script under ``jobs/``, the ``segray``
command that runs it from an installed package (``segray submit --image``) and a one-line
description.

Layering: this module sits beside demo/ and submit.py, above train/ and infer/ (imported
lazily) and below cli.py; nothing under it imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from pydantic import BaseModel

from segray.config import ConfigError, InferJobConfig, NightlyJobConfig, SceneInferJobConfig, TrainJobConfig
from segray.report import infer_rows, print_table

__all__ = ["JOBS", "Job"]

_TASK_FORMATS = {"semantic": "'semantic'", "instance": "'instance_masks' or 'coco'"}


def _train(job: TrainJobConfig) -> None:
    from segray.train.trainer import run_training, summary_rows

    result = run_training(job)
    print_table("training summary", summary_rows(result, job.data.class_names) + [
        ("best checkpoint", result.best_checkpoint), ("curves", result.curves_png), ("run", result.run_path)])


def _infer(job: InferJobConfig) -> None:
    from segray.infer.pipeline import run_inference

    print_table("inference summary", infer_rows(run_inference(job)))


def _segment_scenes(job: SceneInferJobConfig) -> None:
    from segray.infer.scenes import run_scenes, summary_rows

    print_table("scene segmentation summary", summary_rows(run_scenes(job)))


def _nightly(job: NightlyJobConfig) -> None:
    from segray.infer.nightly import run_nightly, summary_rows

    print_table("nightly run", summary_rows(run_nightly(job)))


@dataclass(frozen=True)
class Job:
    name: str
    config_cls: type[BaseModel]
    run: Callable[[Any], None]  # a validated config_cls -> does the work, prints the summary
    script: str  # the entrypoint, relative to the working dir (the checkout)
    command: str  # the `segray` command that runs it (--image mode, and what the script calls)
    description: str
    task: Optional[str] = None  # the config's required task (TrainJobConfig.task)
    fallback_script: Optional[str] = None  # run when a working dir lacks `script`

    def check(self, cfg: BaseModel) -> None:
        """Refuse a config this job does not run (train-instance: instance data only)."""
        task = getattr(cfg, "task", None)
        if self.task and task != self.task:
            raise ConfigError(f"data.format: job {self.name!r} needs {self.task} data "
                              f"({_TASK_FORMATS.get(self.task, self.task)}; the config's task is {task!r})")


JOBS: dict[str, Job] = {job.name: job for job in [
    Job("train", TrainJobConfig, _train, "jobs/train.py", "train",
        "train a model with Ray Train (semantic, or Mask R-CNN on instance data)"),
    # Instance training is TrainJobConfig with instance data: its own entrypoint, which refuses
    # other configs before any cluster work; a checkout without it runs the generic one.
    Job("train-instance", TrainJobConfig, _train, "jobs/train_instance.py", "train",
        "train Mask R-CNN (refuses configs without instance data)", task="instance",
        fallback_script="jobs/train.py"),
    Job("infer", InferJobConfig, _infer, "jobs/infer.py", "infer",
        "segment a collection of images with Ray Data into Parquet"),
    Job("segment-scenes", SceneInferJobConfig, _segment_scenes, "jobs/segment_scenes.py", "segment-scenes",
        "segment GeoTIFF/COG scenes of any size (COG masks, polygons)"),
    Job("nightly", NightlyJobConfig, _nightly, "jobs/nightly.py", "nightly",
        "segment the new or changed images of an archive into a run_date= partition"),
]}
