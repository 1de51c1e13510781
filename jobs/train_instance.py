"""Ray job entrypoint for Mask R-CNN training:
`ray job submit --working-dir . -- python jobs/train_instance.py configs/train_instance.yaml [--set k=v ...]`.

The same `segray train` command trains both families; this entrypoint only refuses configs that
are not instance configs, so a mixed-up submission fails before any cluster work.
"""

import sys

from segray.cli import app
from segray.config import ConfigError, TrainJobConfig, load_config, parse_overrides

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and not args[0].startswith("-"):
        overrides = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
        try:
            parse_overrides(overrides)
            job = load_config(TrainJobConfig, args[0], overrides)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        if job.task != "instance":
            print("error: data.format: jobs/train_instance.py needs 'instance_masks' or 'coco' data", file=sys.stderr)
            sys.exit(2)
    app(["train", *args])
