"""``segray submit`` and ``segray jobs ...``: the Ray Jobs API side of the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from segray.cli.errors import SET_HELP, run_known
from segray.jobs import JOBS
from segray.report import console


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

    sub = run_known(lambda: prepare(job, config, set_, working_dir=working_dir, image=image, pip=pip, env=env,
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
