"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/infer.py configs/<x>.yaml [--set k=v ...]`.

The job is registered in segray/jobs.py (JOBS["infer"]); `segray submit infer` runs this file.
Its checks run before Ray starts (a mistake: one line, exit code 2); `--debug` (anywhere in the
arguments) adds the traceback, `--verbose` puts Ray's output on the terminal (default: a log file).
Inside a Ray job RAY_ADDRESS is set, so segray joins the cluster instead of starting Ray.
"""

import sys

from segray.cli import run_job

if __name__ == "__main__":
    run_job("infer", sys.argv[1:])
