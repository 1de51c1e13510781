"""The ``segray`` command line: demo, train, infer. Configs are YAML; ``--set key.path=value`` overrides."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer

from segray.config import (
    ConfigError,
    DemoJobConfig,
    InferJobConfig,
    TrainJobConfig,
    build_config,
    dump_config,
    load_config,
)
from segray.report import console, infer_rows, print_table

app = typer.Typer(
    help="segray: image segmentation at scale with Ray Train and Ray Data.\n\n"
    "Every job reads a YAML config; override any field with --set, e.g. --set train.epochs=3.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

SET_HELP = "Override a config field: --set train.epochs=3 (repeatable; values parse as YAML)."


def _load(cls, path: Optional[Path], overrides: list[str] | None):
    try:
        return load_config(cls, path, overrides)
    except ConfigError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None


def _run(fn):
    """Config errors found late (e.g. an output that exists) still exit 2 with the message."""
    try:
        return fn()
    except ConfigError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None


def _init_ray() -> None:
    import ray

    if not ray.is_initialized():
        # RAY_ADDRESS (set by `ray job submit`) joins the cluster; otherwise a local Ray starts.
        ray.init(log_to_driver=os.environ.get("SEGRAY_RAY_LOGS") == "1")
    logging.getLogger("ray").setLevel(logging.WARNING)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML training config (local path or fsspec URL)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
) -> None:
    """Train a semantic segmentation model with Ray Train (DDP over train.num_workers workers)."""
    job = _load(TrainJobConfig, config, set_)
    if print_config:
        console.print(dump_config(job))
        return
    from segray.train.trainer import run_training, summary_rows

    _init_ray()
    result = _run(lambda: run_training(job))
    print_table("training summary", summary_rows(result, job.data.class_names) + [
        ("best checkpoint", result.best_checkpoint), ("curves", result.curves_png), ("run", result.run_path)])


@app.command()
def infer(
    config: Path = typer.Argument(..., help="YAML inference config (local path or fsspec URL)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
) -> None:
    """Segment a collection with Ray Data; writes predictions/ (Parquet) and summary.parquet."""
    job = _load(InferJobConfig, config, set_)
    if print_config:
        console.print(dump_config(job))
        return
    from segray.infer.pipeline import run_inference

    _init_ray()
    summary = _run(lambda: run_inference(job))
    print_table("inference summary", infer_rows(summary))


@app.command()
def demo(
    config: Optional[Path] = typer.Argument(None, help="Optional YAML demo config."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Generate aerial-like demo scenes, train a U-Net on 2 workers, segment them, report.

    Runs on a local Ray with local files and no network. Outputs go to workdir
    (default ./segray-demo): data/, runs/ (checkpoints, curves.png), predictions/, overlays.png.
    """
    cfg = _load(DemoJobConfig, config, set_)
    from segray.demo import run_demo

    _init_ray()
    _run(lambda: run_demo(cfg))


@app.command("show-config")
def show_config(
    job: str = typer.Argument(..., help="train | infer | demo"),
    config: Optional[Path] = typer.Argument(None, help="YAML config to resolve (optional for demo)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Validate a config and print it with every default filled in."""
    classes = {"train": TrainJobConfig, "infer": InferJobConfig, "demo": DemoJobConfig}
    if job not in classes:
        console.print(f"[bold red]error:[/] job must be one of {', '.join(classes)}")
        raise typer.Exit(2)
    console.print(dump_config(_load(classes[job], config, set_)))


def main() -> None:  # pragma: no cover - console script
    app()


__all__ = ["app", "build_config"]
