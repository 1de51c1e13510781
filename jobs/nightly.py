"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/nightly.py configs/nightly.yaml [--set k=v ...]`.

The nightly incremental archive run (segray/infer/nightly.py): only new or changed images,
into <output>/run_date=YYYY-MM-DD/, committed by a _SUCCESS record written last.
Inside a Ray job RAY_ADDRESS is set, so segray joins the cluster instead of starting Ray.
"""

import sys

from segray.cli import app

if __name__ == "__main__":
    app(["nightly", *sys.argv[1:]])
