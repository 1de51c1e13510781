"""The embedded instance demo (``segray demo --set task=instance``): generated scenes with separate
buildings, fields and vehicles -> Mask R-CNN on Ray Train -> Ray Data inference with COCO
metrics -> COCO results JSON -> overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from segray.config import DemoJobConfig, InferJobConfig, SourceConfig, TrainJobConfig
from segray.report import console, infer_rows, print_table


def demo_instance_train_config(cfg: DemoJobConfig, data: dict[str, Any], workdir: Path) -> TrainJobConfig:
    return TrainJobConfig.model_validate({
        "data": {
            "source": {"images": data["images"]},
            "format": "coco",
            "coco_json": data["coco_json"],
            "class_names": data["class_names"],
            "val_fraction": 0.25,
            "augment": {"rotate_degrees": 0},
        },
        "model": cfg.model.model_dump(),
        "optim": {"lr": 1e-4, "warmup_steps": 10, "grad_clip": 10.0},
        "train": {**cfg.train.model_dump(), "storage_path": str(workdir / "runs"), "name": "demo-instance"},
    })


def instance_panels(predictions: str, limit: int = 4) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """A few written rows drawn as instance maps (one colour per object; best score on top)."""
    import pyarrow.compute as pc
    from PIL import Image

    from segray.core.instances import decode_rle
    from segray.infer.sinks import committed_rows

    def paint(instances: list[dict] | None, shape: tuple[int, int]) -> np.ndarray:
        out = np.zeros(shape, np.int64)
        for k, inst in reversed(list(enumerate(instances or [], start=1))):
            out[decode_rle(inst["mask"]) > 0] = (k - 1) % 20 + 1
        return out

    table = committed_rows(predictions, columns=["image_id", "source_path", "instances", "gt_instances", "height",
                                                 "width", "status"])
    table = table.filter(pc.equal(table["status"], "ok")).slice(0, limit)
    panels = []
    for row in table.to_pylist():
        rgb = np.asarray(Image.open(row["source_path"]).convert("RGB"))
        shape = (row["height"], row["width"])
        truth = paint(row["gt_instances"], shape) if row["gt_instances"] is not None else None
        panels.append((row["image_id"], rgb, paint(row["instances"], shape), truth))
    return panels


def run_instance_demo(cfg: DemoJobConfig) -> dict[str, Any]:
    from segray.demo.instance_scenes import write_instance_demo_dataset
    from segray.infer.export import export_coco
    from segray.infer.pipeline import run_inference
    from segray.train.plots import plot_overlays
    from segray.train.trainer import run_training, summary_rows

    workdir = Path(cfg.workdir).resolve()
    console.rule("[bold]segray demo: instance segmentation")
    console.print(f"1/4 generating {cfg.num_images} scenes of up to {cfg.image_size}px in {workdir / 'data'}")
    data = write_instance_demo_dataset(workdir / "data", cfg.num_images, cfg.image_size, seed=cfg.seed)

    job = demo_instance_train_config(cfg, data, workdir)
    console.print(f"2/4 training {job.model.name} on {job.train.num_workers} Ray Train workers "
                  f"for {job.train.epochs} epochs")
    result = run_training(job)
    print_table("training summary", summary_rows(result, job.data.class_names) + [
        ("best checkpoint", result.best_checkpoint), ("curves", result.curves_png)])

    console.print("3/4 segmenting the scenes with Ray Data (COCO ground truth given, so COCO metrics are computed)")
    infer_cfg = InferJobConfig(
        source=SourceConfig(images=data["images"]),
        coco_json=data["coco_json"],
        checkpoint=result.best_checkpoint,
        output=str(workdir / "predictions"),
        batch_size=4,
        num_actors=1,
        overwrite=True,
    )
    summary = run_inference(infer_cfg)
    console.print("4/4 exporting COCO results JSON")
    exported = export_coco(summary["predictions"], str(workdir / "coco_results.json"), gt_json=data["coco_json"])
    overlays = str(workdir / "overlays.png")
    plot_overlays(instance_panels(summary["predictions"]), overlays)
    print_table("inference summary", infer_rows(summary) + [
        ("COCO results", f"{exported['output']} ({exported['detections']} detections)"), ("overlays", overlays)])
    return {"train": result, "infer": summary, "coco_results": exported["output"], "overlays": overlays}
