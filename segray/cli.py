"""The ``segray`` command line: demo, train, infer. Configs are YAML; ``--set key.path=value`` overrides."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from segray.config import ConfigError, DemoJobConfig, build_config, dump_config, load_config, parse_overrides
from segray.jobs import JOBS
from segray.report import console, print_table

app = typer.Typer(
    help="segray: image segmentation at scale with Ray Train and Ray Data.\n\n"
    "Every job reads a YAML config; override any field with --set, e.g. --set train.epochs=3.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

SET_HELP = "Override a config field: --set train.epochs=3 (repeatable; values parse as YAML)."
GLOBAL_FLAGS = ("--debug", "--verbose")
_options = {"debug": False}


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", envvar="SEGRAY_DEBUG",
                               help="On an error, show the traceback (not only the one-line message)."),
    verbose: bool = typer.Option(False, "--verbose", help="Ray's own output (Ray Data, Ray Train, workers) on the "
                                 "terminal too; by default it goes to a log file, whose path is printed."),
) -> None:
    """segray: image segmentation at scale with Ray Train and Ray Data."""
    _options["debug"] = debug
    if verbose:
        from segray.runtime import set_verbose

        set_verbose()  # SEGRAY_RAY_LOGS=1, read by start_ray


# --------------------------------------------------------------------------- errors
# The one place where a known mistake becomes one line and exit code 2 (no traceback unless
# --debug): a config that does not validate, a path or object that is not there, no permission,
# an endpoint that does not answer, a checkpoint that does not load.


def _known_errors() -> tuple[type[BaseException], ...]:
    known: list[type[BaseException]] = [ConfigError, ValueError, FileNotFoundError, PermissionError,
                                        IsADirectoryError, NotADirectoryError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        known += [BotoCoreError, ClientError]
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        pass
    try:
        from aiohttp import ClientConnectionError

        known.append(ClientConnectionError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(known)


def error_line(err: BaseException) -> str:
    """The message of a known error, as the CLI prints it (without 'error: ')."""
    if isinstance(err, ConfigError):
        return str(err)
    if isinstance(err, OSError) and getattr(err, "filename", None) and err.strerror:
        what = "not found" if isinstance(err, FileNotFoundError) else err.strerror.lower()
        return f"{err.filename}: {what}"
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, ValueError) or isinstance(err, FileNotFoundError) else \
        f"{type(err).__name__}: {text}"


def _fail(err: BaseException) -> None:
    if _options["debug"]:
        import traceback

        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    print(f"error: {error_line(err)}", file=sys.stderr, flush=True)
    raise typer.Exit(2) from None


def _run(fn):
    """``fn()``; a known error (see _known_errors) exits 2 with its one-line message."""
    try:
        return fn()
    except typer.Exit:
        raise
    except _known_errors() as err:
        _fail(err)


def _load(cls, path: Optional[Path], overrides: list[str] | None):
    return _run(lambda: load_config(cls, path, overrides))


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
    _run(lambda: spec.preflight(job))
    _run(lambda: spec.run(job))


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
        _options["debug"] = True
    if spec.task and argv and not argv[0].startswith("-"):
        overrides = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--set"]

        def check():
            parse_overrides(overrides)
            spec.check(load_config(spec.config_cls, argv[0], overrides))

        try:
            _run(check)
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

    _run(lambda: preflight_demo(cfg))

    def demo_run():
        with stage("demo"):
            return run_demo(cfg)

    _run(demo_run)


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
    out = _run(lambda: export_coco(predictions, output, storage=storage, gt_json=gt, min_score=min_score))
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


def _jobs_address(address: Optional[str]) -> str:
    if not address:
        console.print("[bold red]error:[/] give --address http://HOST:8265 (the Ray dashboard) or set RAY_ADDRESS")
        raise typer.Exit(2)
    return address


def _jobs_client(address: Optional[str]):
    from segray.submit import ClusterError, client_for

    try:
        return client_for(_jobs_address(address))
    except ClusterError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(1) from None


ADDRESS_HELP = "Ray Jobs API (dashboard) address, e.g. http://HOST:8265; default $RAY_ADDRESS."


@app.command()
def submit(
    job: str = typer.Argument(..., help="; ".join(f"{name} = {spec.description}" for name, spec in JOBS.items())),
    config: str = typer.Argument(..., help="YAML config (local path or fsspec URL); validated here first."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP),
    submission_id: Optional[str] = typer.Option(
        None, "--id", help="Submission id (default: segray-<job>-<YYYYMMDD>-<hash of job and resolved config>)."),
    rerun: bool = typer.Option(False, "--rerun", help="The id exists already: submit a new attempt <id>-rN."),
    working_dir: Optional[Path] = typer.Option(
        None, "--working-dir", help="Uploaded as the job's working dir (default: the segray checkout)."),
    image: bool = typer.Option(
        False, "--image", help="Upload nothing: run the segray installed in the cluster's image."),
    exclude: Optional[list[str]] = typer.Option(None, "--exclude", help="More upload excludes (gitignore style)."),
    pip: Optional[list[str]] = typer.Option(None, "--pip", help="A pip requirement for the job (repeatable)."),
    env: Optional[list[str]] = typer.Option(
        None, "--env", help="KEY (its local value) or KEY=VALUE into the job's environment (repeatable)."),
    env_from_local: bool = typer.Option(
        False, "--env-from-local", help="Pass every local AWS_* variable (object storage credentials, endpoint)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Submit and return; do not follow the logs."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the submission; submit nothing."),
) -> None:
    """Submit a job to a Ray cluster (Ray Jobs API), follow its logs, exit with its result.

    The config is validated locally first. Submitting the same job and config again on the
    same day finds the job already submitted and attaches to it (no duplicate). Exit code 0
    when the job SUCCEEDED, 1 when it FAILED or was STOPPED (the reason is printed), 2 for a
    bad config or command line.
    """
    import json

    from segray.submit import ClusterError, prepare
    from segray.submit import submit as submit_job

    sub = _run(lambda: prepare(job, config, set_, working_dir=working_dir, image=image, pip=pip, env=env,
                               env_from_local=env_from_local, excludes=exclude, submission_id=submission_id))
    for w in sub.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    if dry_run:
        console.print_json(json.dumps(sub.describe()))
        return
    client = _jobs_client(address)
    try:
        sid, attached = submit_job(client, sub, rerun=rerun)
    except ClusterError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(1) from None
    if attached:
        console.print(f"job [bold]{sid}[/] was already submitted: attaching to it (--rerun starts a new attempt)")
    else:
        console.print(f"submitted [bold]{sid}[/]: {sub.entrypoint}")
    if no_wait:
        console.print(f"follow: segray jobs logs {sid} --follow;  stop: segray jobs stop {sid}")
        return
    _follow_to_the_end(client, sid)


def _follow_to_the_end(client, sid: str) -> None:
    """Follow the job's logs; exit with its result (Ctrl-C detaches, the job keeps running)."""
    from segray.submit import exit_code, follow, status_of

    try:
        info = follow(client, sid, console)
    except KeyboardInterrupt:
        console.print(f"\ndetached; the job keeps running: segray jobs logs {sid} --follow / segray jobs stop {sid}")
        raise typer.Exit(130) from None
    code = exit_code(info)
    if code == 0:
        console.print(f"[bold green]job {sid} SUCCEEDED[/]")
    else:
        typer.echo(f"job {sid} {status_of(info)}: {info.message}", err=True)
    raise typer.Exit(code)


jobs_app = typer.Typer(help="Jobs on a Ray cluster: list, status, logs, stop.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
def jobs_list(
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP),
    all_: bool = typer.Option(False, "--all", help="Also drivers that connected directly (not submitted)."),
) -> None:
    """Submitted jobs, newest first: id, status, start, duration, entrypoint, message."""
    import datetime as dt

    from rich.table import Table

    from segray.submit import status_of

    jobs = [j for j in _jobs_client(address).list_jobs() if all_ or j.submission_id]
    table = Table(title=f"{len(jobs)} job(s)", title_justify="left")
    table.add_column("submission id", no_wrap=True)
    for col in ("status", "started (UTC)", "duration", "entrypoint", "message"):
        table.add_column(col, overflow="fold")
    for j in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        start = dt.datetime.fromtimestamp(j.start_time / 1000, dt.timezone.utc) if j.start_time else None
        dur = ((j.end_time or dt.datetime.now().timestamp() * 1000) - j.start_time) / 1000 if j.start_time else None
        table.add_row(j.submission_id or j.job_id or "-", status_of(j), f"{start:%Y-%m-%d %H:%M:%S}" if start else "-",
                      f"{dur:,.0f}s" if dur is not None else "-", j.entrypoint or "-",
                      ((j.message or "").splitlines() or [""])[0][:200])
    console.print(table)


@jobs_app.command("status")
def jobs_status(
    submission_id: str = typer.Argument(..., help="Submission id."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP),
) -> None:
    """Print a job's status and message; exit 0 if it SUCCEEDED, 1 if FAILED/STOPPED, 3 while running."""
    from segray.submit import TERMINAL, exit_code, job_info, status_of

    info = job_info(_jobs_client(address), submission_id)
    if info is None:
        console.print(f"[bold red]error:[/] no job {submission_id}")
        raise typer.Exit(2)
    console.print(f"{submission_id}: {status_of(info)}  {info.message or ''}")
    raise typer.Exit(exit_code(info) if status_of(info) in TERMINAL else 3)


@jobs_app.command("logs")
def jobs_logs(
    submission_id: str = typer.Argument(..., help="Submission id."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP),
    follow_: bool = typer.Option(False, "--follow", "-f", help="Follow until the job ends; exit with its result."),
) -> None:
    """Print a job's logs (driver stdout/stderr)."""
    from segray.submit import exit_code, follow, job_info

    client = _jobs_client(address)
    if job_info(client, submission_id) is None:
        console.print(f"[bold red]error:[/] no job {submission_id}")
        raise typer.Exit(2)
    if follow_:
        raise typer.Exit(exit_code(follow(client, submission_id, console)))
    typer.echo(client.get_job_logs(submission_id), nl=False)


@jobs_app.command("stop")
def jobs_stop(
    submission_id: str = typer.Argument(..., help="Submission id."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the job has stopped."),
) -> None:
    """Stop a running job (SIGTERM to its driver, then SIGKILL)."""
    import time

    from segray.submit import TERMINAL, job_info, status_of

    client = _jobs_client(address)
    info = job_info(client, submission_id)
    if info is None:
        console.print(f"[bold red]error:[/] no job {submission_id}")
        raise typer.Exit(2)
    if status_of(info) in TERMINAL:
        console.print(f"{submission_id} already ended: {status_of(info)}")
        return
    client.stop_job(submission_id)
    deadline = time.monotonic() + 120
    while wait and status_of(info) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
        info = client.get_job_info(submission_id)
    console.print(f"{submission_id}: {status_of(info)}")


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


def main() -> None:  # pragma: no cover - console script
    app()


__all__ = ["app", "build_config", "run_job"]
