"""The jobs segray runs on a cluster, registered once in :data:`JOBS`.

``segray submit`` (what to upload and run, which config class validates the config), the CLI
(the job commands run a job's ``preflight``, then its ``run``; ``submit`` and ``show-config`` list
the names) and the
entrypoints ``jobs/*.py`` (``run_job(name, sys.argv[1:])`` in :mod:`segray.cli`) all read it.

Each job: its config class, the function that runs a validated config (it checks what needs no
cluster, then joins or starts Ray, shows its progress line and prints the summary; Ray, torch and
the runner are imported only when it is called, so importing this module stays cheap), its
preflight (every check that needs no cluster, through :mod:`segray.io.preflight`: inputs,
checkpoint, band counts, outputs, object storage; run before ``run``, so a mistake fails in a
second or two as one line naming the field), its entrypoint script under ``jobs/``, the
``segray`` command that runs it from an installed package (``segray submit --image``) and a
one-line description.

Layering: this module sits beside demo/ and submit.py, above train/ and infer/ (imported
lazily) and below cli.py; nothing under it imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from pydantic import BaseModel

from segray.config import (
    ConfigError,
    DemoJobConfig,
    InferJobConfig,
    NightlyJobConfig,
    SceneInferJobConfig,
    TrainJobConfig,
)
from segray.report import infer_rows, print_table, stage

__all__ = ["JOBS", "Job", "preflight_demo"]

_TASK_FORMATS = {"semantic": "'semantic'", "instance": "'instance_masks' or 'coco'"}


def _train(job: TrainJobConfig) -> None:
    from segray.train.trainer import run_training, summary_rows

    with stage("train", unit="rows"):
        result = run_training(job)
    print_table("training summary", summary_rows(result, job.data.class_names) + [
        ("best checkpoint", result.best_checkpoint), ("curves", result.curves_png), ("run", result.run_path)])


def _infer(job: InferJobConfig) -> None:
    from segray.infer.pipeline import run_inference

    with stage("infer", unit="images"):
        summary = run_inference(job)
    print_table("inference summary", infer_rows(summary))


def _segment_scenes(job: SceneInferJobConfig) -> None:
    from segray.infer.scenes import run_scenes, summary_rows

    with stage("segment-scenes", unit="tiles"):
        summary = run_scenes(job)
    print_table("scene segmentation summary", summary_rows(summary))


def _nightly(job: NightlyJobConfig) -> None:
    from segray.infer.nightly import run_nightly, summary_rows

    with stage("nightly", unit="images"):
        summary = run_nightly(job)
    print_table("nightly run", summary_rows(summary))


# --------------------------------------------------------------------------- preflight
# What each job checks before Ray starts (segray.io.preflight): every check that needs no
# cluster. A failure raises a ConfigError naming the field or path; the CLI prints that one line
# and exits 2. The runners check again (idempotent and cheap); these run first, and all together.


def _committed():
    """How a job's output folder says it is committed (segray.infer.sinks.committed, once it exists)."""
    try:
        from segray.infer import sinks
    except ImportError:  # pragma: no cover - a broken install fails later with its own error
        return None
    return getattr(sinks, "committed", None)


def _fits(image: str, source, storage, ckpt, bands, field: str, bands_field: str | None) -> None:
    """One input's header has the bands the checkpoint's model takes (through ``bands``, if set)."""
    from segray.io.preflight import check_bands, image_bands

    if not image:  # a STAC search whose first items are all bad: they become error rows
        return
    where = f"{field}.{_kind(source)}"
    check_bands(image_bands(image, storage, where), image, ckpt.in_channels, bands, field=where,
                bands_field=bands_field, what=f"the checkpoint's {ckpt.model_name}")


def _kind(source) -> str:
    from segray.io.sources import source_kind

    return source_kind(source)


def _optional(url, storage, field: str) -> None:
    from segray.io.preflight import check_exists

    if url:
        check_exists(url, storage, field)


def preflight_infer(job: InferJobConfig) -> None:
    from segray.io.preflight import check_checkpoint, check_output, check_source

    image = check_source(job.source, job.storage, "source")
    ckpt = check_checkpoint(job.checkpoint, job.storage)
    _fits(image, job.source, job.storage, ckpt, ckpt.bands, "source", None)
    _optional(job.coco_json, job.storage, "coco_json")
    _optional(job.class_masks, job.storage, "class_masks")
    check_output(job.output, job.storage, job.overwrite, "output", resume=getattr(job, "resume", False),
                 committed=_committed())


_SCENE_OUTPUTS = ("masks", "scenes.parquet", "polygons.parquet", "summary.parquet")


def preflight_scenes(job: SceneInferJobConfig) -> None:
    from segray.io.preflight import check_checkpoint, check_output, check_source, check_writable

    image = check_source(job.source, job.storage, "source")
    ckpt = check_checkpoint(job.checkpoint, job.storage)
    _fits(image, job.source, job.storage, ckpt, job.bands if job.bands is not None else ckpt.bands, "source", "bands")
    check_output(job.output, job.storage, job.overwrite, "output", resume=getattr(job, "resume", False),
                 committed=_committed(), in_the_way=_SCENE_OUTPUTS)
    if job.work_dir:
        check_writable(job.work_dir, job.storage, "work_dir")


def preflight_nightly(job: NightlyJobConfig) -> None:
    from segray.io.preflight import check_checkpoint, check_source, check_writable

    image = check_source(job.source, job.storage, "source")
    ckpt = check_checkpoint(job.checkpoint, job.storage)
    _fits(image, job.source, job.storage, ckpt, ckpt.bands, "source", None)
    check_writable(job.output, job.storage, "output")  # the nights' root: it exists after the first night


def preflight_train(job: TrainJobConfig) -> None:
    from segray.io.preflight import check_bands, check_source, check_writable, image_bands

    d = job.data
    check_writable(job.train.storage_path, d.storage, "train.storage_path")
    for field in ("weights", "backbone_weights"):  # the weights a run starts (or resumes) from
        _optional(getattr(job.model, field, None), d.storage, f"model.{field}")
    encoder_weights = getattr(job.model, "encoder_weights", None)
    if encoder_weights:
        from segray.core.models.smp import is_weights_name

        if not is_weights_name(encoder_weights):  # a file (a name like imagenet is smp's to fetch)
            _optional(encoder_weights, d.storage, "model.encoder_weights")
    for name in ("source", "val_source", "test_source"):
        source = getattr(d, name)
        if source is None:
            continue
        image = check_source(source, d.storage, f"data.{name}")
        if name == "source" and image:  # "": a STAC search whose first items are all bad
            where = f"data.{name}.{_kind(source)}"
            check_bands(image_bands(image, d.storage, where), image, job.model.in_channels, d.bands, field=where,
                        bands_field="data.bands", what="the model (model.in_channels)")
    _optional(d.coco_json, d.storage, "data.coco_json")
    _optional(d.class_masks, d.storage, "data.class_masks")
    if d.chips is not None and d.chips.vector_labels and "{stem}" not in d.chips.vector_labels:
        _optional(d.chips.vector_labels, d.storage, "data.chips.vector_labels")


def preflight_demo(cfg: DemoJobConfig) -> None:
    """``segray demo`` writes everything under its workdir."""
    from segray.io.preflight import check_writable

    check_writable(cfg.workdir, None, "workdir")


@dataclass(frozen=True)
class Job:
    name: str
    config_cls: type[BaseModel]
    run: Callable[[Any], None]  # a validated config_cls -> does the work, prints the summary
    script: str  # the entrypoint, relative to the working dir (the checkout)
    command: str  # the `segray` command that runs it (--image mode, and what the script calls)
    description: str
    preflight: Callable[[Any], None] = lambda cfg: None  # the checks before Ray starts (raise ConfigError)
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
        "train a model with Ray Train (semantic, or Mask R-CNN on instance data)", preflight=preflight_train),
    # Instance training is TrainJobConfig with instance data: its own entrypoint, which refuses
    # other configs before any cluster work; a checkout without it runs the generic one.
    Job("train-instance", TrainJobConfig, _train, "jobs/train_instance.py", "train",
        "train Mask R-CNN (refuses configs without instance data)", preflight=preflight_train, task="instance",
        fallback_script="jobs/train.py"),
    Job("infer", InferJobConfig, _infer, "jobs/infer.py", "infer",
        "segment a collection of images with Ray Data into Parquet", preflight=preflight_infer),
    Job("segment-scenes", SceneInferJobConfig, _segment_scenes, "jobs/segment_scenes.py", "segment-scenes",
        "segment GeoTIFF/COG scenes of any size (COG masks, polygons)", preflight=preflight_scenes),
    Job("nightly", NightlyJobConfig, _nightly, "jobs/nightly.py", "nightly",
        "segment the new or changed images of an archive into a run_date= partition",
        preflight=preflight_nightly),
]}
