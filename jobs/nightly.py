"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/nightly.py configs/nightly.yaml [--set k=v ...]`.

The nightly incremental archive run (segray/infer/nightly.py): only new or changed images,
into <output>/run_date=YYYY-MM-DD/, committed by a _SUCCESS record written last.

The job is registered in segray/jobs.py (JOBS["nightly"]); `segray submit nightly` runs this file.
Its checks run before Ray starts (a mistake: one line, exit code 2); `--debug` (anywhere in the
arguments) adds the traceback, `--verbose` puts Ray's output on the terminal (default: a log file).
Inside a Ray job RAY_ADDRESS is set, so segray joins the cluster instead of starting Ray.
"""

import sys

from segray.cli import run_job

if __name__ == "__main__":
    run_job("nightly", sys.argv[1:])
