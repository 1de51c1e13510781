"""The semantic demo (``segray demo``): generated scenes -> Ray Train U-Net -> Ray Data inference -> report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from segray.config import DemoJobConfig, InferJobConfig, SourceConfig, TrainJobConfig
from segray.report import console, infer_rows, print_table


def demo_train_config(cfg: DemoJobConfig, train: dict[str, Any], val: dict[str, Any],
                      workdir: Path) -> TrainJobConfig:
    return TrainJobConfig.model_validate({
        "data": {
            "source": {"images": train["images"], "masks": train["masks"]},
            "val_source": {"images": val["images"], "masks": val["masks"]},
            "class_names": train["class_names"],
        },
        "model": cfg.model.model_dump(),
        "optim": cfg.optim.model_dump(),
        "train": {**cfg.train.model_dump(), "storage_path": str(workdir / "runs"), "name": "demo"},
    })


def write_demo_splits(cfg: DemoJobConfig, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Training scenes and, from another seed, a quarter as many validation scenes."""
    from segray.demo.scenes import write_demo_dataset

    n_val = max(1, cfg.num_images // 4)
    train = write_demo_dataset(root / "train", cfg.num_images - n_val, cfg.image_size, seed=cfg.seed)
    val = write_demo_dataset(root / "val", n_val, cfg.image_size, seed=cfg.seed + 1)
    return train, val


def overlay_panels(predictions: str, limit: int = 4) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """A few rows of the written Parquet, decoded back into pictures."""
    import pyarrow.compute as pc
    from PIL import Image

    from segray.core.masks import decode_png
    from segray.infer.sinks import committed_rows

    table = committed_rows(predictions, columns=["image_id", "source_path", "mask_png", "status"])
    table = table.filter(pc.equal(table["status"], "ok")).slice(0, limit)
    panels = []
    for row in table.to_pylist():
        rgb = np.asarray(Image.open(row["source_path"]).convert("RGB"))
        mask_path = Path(row["source_path"]).parent.parent / "masks" / Path(row["source_path"]).name
        truth = np.asarray(Image.open(mask_path)) if mask_path.exists() else None
        panels.append((row["image_id"], rgb, decode_png(row["mask_png"]), truth))
    return panels


def run_semantic_demo(cfg: DemoJobConfig) -> dict[str, Any]:
    from segray.infer.pipeline import run_inference
    from segray.train.plots import plot_overlays
    from segray.train.trainer import run_training, summary_rows

    workdir = Path(cfg.workdir).resolve()
    console.rule("[bold]segray demo")
    train, val = write_demo_splits(cfg, workdir / "data")
    console.print(f"1/3 generated {train['count']} training and {val['count']} validation scenes of "
                  f"{cfg.image_size}px in {workdir / 'data'}")

    job = demo_train_config(cfg, train, val, workdir)
    console.print(f"2/3 training {job.model.name} on {job.train.num_workers} Ray Train workers "
                  f"for {job.train.epochs} epochs (validation: the {val['count']} held-out scenes)")
    result = run_training(job)
    print_table("training summary", summary_rows(result, job.data.class_names) + [
        ("best checkpoint", result.best_checkpoint), ("curves", result.curves_png)])

    console.print(f"3/3 segmenting the {val['count']} validation scenes with Ray Data "
                  "(never trained on; ground truth given, so metrics are computed)")
    infer_cfg = InferJobConfig(
        source=SourceConfig(images=val["images"], masks=val["masks"]),
        checkpoint=result.best_checkpoint,
        output=str(workdir / "predictions"),
        overwrite=True,
    )
    summary = run_inference(infer_cfg)
    overlays = str(workdir / "overlays.png")
    plot_overlays(overlay_panels(summary["predictions"]), overlays)
    print_table("inference summary (validation scenes)", infer_rows(summary, val["class_names"]) + [("overlays", overlays)])
    return {"train": result, "infer": summary, "overlays": overlays}
