"""``segray export CHECKPOINT --format onnx|pt2 --output PATH``: a semantic checkpoint for serving.

The exported graph takes raw float32 band values (normalisation is inside it) of any batch,
height and width and returns logits; class names, band statistics, model config and checkpoint
id go with it (segray.core.export). Known mistakes (no such checkpoint, an instance checkpoint,
an unknown format) are one line and exit code 2.
"""

from __future__ import annotations

from typing import Optional

import typer

from segray.cli.errors import run_known
from segray.report import print_table


def export_model(
    checkpoint: str = typer.Argument(..., help="Checkpoint: a .pt file, a training run folder, local or s3://."),
    format: str = typer.Option("onnx", "--format", help="onnx (ONNX Runtime, opset 18) or pt2 (torch.export)."),
    output: str = typer.Option(..., "--output", help="File to write (local or s3://)."),
    endpoint_url: Optional[str] = typer.Option(
        None, "--endpoint-url", help="S3-compatible endpoint for s3:// paths (keys: the usual AWS_* variables)."),
) -> None:
    """Export a semantic checkpoint as ONNX or a torch.export program (raw bands in, logits out)."""
    from segray.config import StorageOptions
    from segray.core.export import FORMATS, export_checkpoint
    from segray.infer.steps import open_checkpoint
    from segray.io.commit import write_atomic

    storage = StorageOptions(endpoint_url=endpoint_url)

    def run() -> tuple:
        if format not in FORMATS:
            raise ValueError(f"--format: {format!r} is not one of {', '.join(FORMATS)}")
        ckpt = open_checkpoint(checkpoint, storage)
        data = export_checkpoint(ckpt, format)
        write_atomic(output, data, storage)  # a killed export leaves no half-written model
        return ckpt, len(data)

    ckpt, size = run_known(run)
    print_table("export", [("checkpoint", ckpt.id), ("model", ckpt.model_name), ("classes", len(ckpt.class_names)),
                           ("format", format), ("bytes", size), ("output", output)])
