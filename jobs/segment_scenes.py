"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/segment_scenes.py configs/<x>.yaml [--set k=v ...]`.

Inside a Ray job RAY_ADDRESS is set, so segray joins the cluster instead of starting Ray.
"""

import sys

from segray.cli import app

if __name__ == "__main__":
    app(["segment-scenes", *sys.argv[1:]])
