"""The ``segray`` command line: demo, train, infer. Configs are YAML; ``--set key.path=value`` overrides."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from segray.config import DemoJobConfig, build_config, dump_config, load_config, parse_overrides
from segray.cli import cluster
from segray.cli.export import export_model
from segray.cli.errors import SET_HELP, error_line, run_known, set_debug
from segray.jobs import JOBS
from segray.report import console, print_table

app = typer.Typer(
    help="segray: image segmentation at scale with Ray Train and Ray Data.\n\n"
    "Every job reads a YAML config; override any field with --set, e.g. --set train.epochs=3.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

GLOBAL_FLAGS = ("--debug", "--verbose")


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", envvar="SEGRAY_DEBUG",
                               help="On an error, show the traceback (not only the one-line message)."),
    verbose: bool = typer.Option(False, "--verbose", help="Ray's own output (Ray Data, Ray Train, workers) on the "
                                 "terminal too; by default it goes to a log file, whose path is printed."),
) -> None:
    """segray: image segmentation at scale with Ray Train and Ray Data."""
    set_debug(debug)
    if verbose:
        from segray.runtime import set_verbose

        set_verbose()  # SEGRAY_RAY_LOGS=1, read by start_ray


def _load(cls, path: Optional[Path], overrides: list[str] | None):
    return run_known(lambda: load_config(cls, path, overrides))


def _job(cls, config, set_, print_config: bool):
    """The validated job config; with --print-config, print it and stop (exit 0) before any work."""
    job = _load(cls, config, set_)
    if print_config:
        console.print(dump_config(job))
        raise typer.Exit(0)
    return job


def _run_job(name: str, config: str, set_: list[str] | None, print_config: bool) -> None:
    """The job ``name`` of segray.jobs.JOBS: validate its config, run its preflight (every check
    that needs no cluster), then run it (Ray joined or started)."""
    spec = JOBS[name]
    job = _job(spec.config_cls, config, set_, print_config)
    run_known(lambda: spec.preflight(job))
    run_known(lambda: spec.run(job))


def run_job(name: str, argv: list[str]) -> None:
    """What the entrypoint ``jobs/<x>.py`` does: ``segray [--debug] [--verbose] <command> CONFIG
    [--set k=v ...]`` for the job ``name`` of segray.jobs.JOBS, after refusing a config that job
    does not run (exit 2). The global flags may come anywhere in ``argv``.

    Inside a Ray job RAY_ADDRESS is set, so the job joins the cluster instead of starting Ray.
    """
    spec = JOBS[name]
    flags = [a for a in argv if a in GLOBAL_FLAGS]
    argv = [a for a in argv if a not in GLOBAL_FLAGS]
    if "--debug" in flags:
        set_debug(True)
    if spec.task and argv and not argv[0].startswith("-"):
        overrides = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--set"]

        def check():
            parse_overrides(overrides)
            spec.check(load_config(spec.config_cls, argv[0], overrides))

        try:
            run_known(check)
        except typer.Exit as e:
            sys.exit(e.exit_code)
    app([*flags, spec.command, *argv])


@app.command()
def train(
    config: str = typer.Argument(..., help="YAML training config (local path or fsspec URL)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
) -> None:
    """Train a segmentation model with Ray Train (DDP over train.num_workers workers).

    Semantic models (U-Net, FCN, DeepLabV3) on class maps, or Mask R-CNN on instances
    (data.format instance_masks or coco).
    """
    _run_job("train", config, set_, print_config)


@app.command()
def infer(
    config: str = typer.Argument(..., help="YAML inference config (local path or fsspec URL)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
) -> None:
    """Segment a collection with Ray Data; writes predictions/ (Parquet) and summary.parquet."""
    _run_job("infer", config, set_, print_config)


@app.command("segment-scenes")
def segment_scenes(
    config: str = typer.Argument(..., help="YAML scene config (local path or fsspec URL)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
) -> None:
    """Segment GeoTIFF/COG scenes of any size: overlapping tiles on Ray Data, stitched seam-free.

    Writes masks/ (COG per scene), scenes.parquet, polygons.parquet (GeoParquet), summary.parquet
    and, if asked, probabilities/ and tiles.parquet.
    """
    _run_job("segment-scenes", config, set_, print_config)


@app.command()
def demo(
    config: Optional[Path] = typer.Argument(None, help="Optional YAML demo config."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Generate aerial-like demo scenes, train a U-Net on 2 workers, segment them, report.

    Runs on a local Ray with local files and no network. Outputs go to workdir
    (default ./segray-demo): data/, runs/ (checkpoints, curves.png), predictions/, overlays.png.
    With --set task=instance: separate buildings, fields and vehicles, Mask R-CNN, COCO metrics
    and coco_results.json.
    """
    cfg = _load(DemoJobConfig, config, set_)
    from segray.demo import run_demo
    from segray.jobs import preflight_demo
    from segray.report import stage

    run_known(lambda: preflight_demo(cfg))

    def demo_run():
        with stage("demo", follow_datasets=False):
            return run_demo(cfg)

    run_known(demo_run)


@app.command("export-coco")
def export_coco_cmd(
    predictions: str = typer.Argument(..., help="Instance predictions: the predictions/ Parquet folder (local or s3://)."),
    output: str = typer.Argument(..., help="COCO results JSON to write (local or s3://)."),
    gt: Optional[str] = typer.Option(None, "--gt", help="COCO ground-truth JSON: take image and category ids from it."),
    min_score: float = typer.Option(0.0, "--min-score", help="Leave out detections scoring below this."),
    endpoint_url: Optional[str] = typer.Option(
        None, "--endpoint-url", help="S3-compatible endpoint for s3:// paths (keys: the usual AWS_* variables)."),
) -> None:
    """Export Mask R-CNN predictions to a COCO results JSON (image_id, category_id, bbox, score, RLE)."""
    from segray.config import StorageOptions
    from segray.infer.export import export_coco

    storage = StorageOptions(endpoint_url=endpoint_url)
    out = run_known(lambda: export_coco(predictions, output, storage=storage, gt_json=gt, min_score=min_score))
    print_table("COCO export", [("detections", out["detections"]), ("images", out["images"]),
                                ("rows read", out["rows"]), ("output", out["output"])])


@app.command()
def nightly(
    config: str = typer.Argument(..., help="YAML nightly config (local path or fsspec URL)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
) -> None:
    """Incremental archive run: segment only new or changed images into run_date=YYYY-MM-DD/.

    Lists the archive (source), skips every image a committed earlier night already processed
    (same path, size and etag/mtime), writes the rest as Parquet into the night's partition and
    commits it with a _SUCCESS record written last. Rerunning a night is safe: a committed
    night is a no-op (rebuild=true recomputes it), an uncommitted one is redone.
    """
    _run_job("nightly", config, set_, print_config)


@app.command("show-config")
def show_config(
    job: str = typer.Argument(..., help=" | ".join([*JOBS, "demo"])),
    config: Optional[Path] = typer.Argument(None, help="YAML config to resolve (optional for demo)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Validate a config and print it with every default filled in."""
    classes = {**{name: spec.config_cls for name, spec in JOBS.items()}, "demo": DemoJobConfig}
    if job not in classes:
        console.print(f"[bold red]error:[/] job must be one of {', '.join(classes)}")
        raise typer.Exit(2)
    console.print(dump_config(_load(classes[job], config, set_)))


app.command()(cluster.submit)
app.command("export")(export_model)
app.add_typer(cluster.jobs_app, name="jobs")


def main() -> None:  # pragma: no cover - console script
    app()


__all__ = ["app", "build_config", "error_line", "run_job"]
