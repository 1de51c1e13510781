"""Ray job entrypoint for Mask R-CNN training:
`ray job submit --working-dir . -- python jobs/train_instance.py configs/train_instance.yaml [--set k=v ...]`.

The same `segray train` command trains both families; this entrypoint only refuses configs that
are not instance configs (exit 2), so a mixed-up submission fails before any cluster work.

The job is registered in segray/jobs.py (JOBS["train-instance"]); `segray submit train-instance` runs this file.
Its checks run before Ray starts (a mistake: one line, exit code 2); `--debug` (anywhere in the
arguments) adds the traceback, `--verbose` puts Ray's output on the terminal (default: a log file).
Inside a Ray job RAY_ADDRESS is set, so segray joins the cluster instead of starting Ray.
"""

import sys

from segray.cli import run_job

if __name__ == "__main__":
    run_job("train-instance", sys.argv[1:])
