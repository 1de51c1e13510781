"""The model families segray serves, by name: a checkpoint's ``task`` picks its family.

Adding a family (panoptic, say) means one module with its parts (see :mod:`segray.infer.family`)
and one entry here; the pipelines stay as they are.
"""

from __future__ import annotations

from segray.config import ConfigError
from segray.core.checkpoint import Checkpoint
from segray.infer.family import Family
from segray.infer.instance import INSTANCE_SCHEMA, instance_stages, summarize_instances
from segray.infer.scene_instances import INSTANCE_SCENES
from segray.infer.scene_steps import SEMANTIC_SCENES
from segray.infer.semantic import semantic_stages, summarize_semantic
from segray.infer.steps import OUTPUT_SCHEMA

FAMILIES: dict[str, Family] = {
    "semantic": Family(name="semantic", schema=OUTPUT_SCHEMA, image_stages=semantic_stages,
                       summarize=summarize_semantic, scenes=SEMANTIC_SCENES),
    "instance": Family(name="instance", schema=INSTANCE_SCHEMA, image_stages=instance_stages,
                       summarize=summarize_instances, scenes=INSTANCE_SCENES),
}


def family_of(checkpoint: Checkpoint | dict | str) -> Family:
    """The family of a checkpoint (its ``task``; a payload dict from before tasks is semantic)."""
    if isinstance(checkpoint, Checkpoint):
        task = checkpoint.task
    else:
        task = checkpoint if isinstance(checkpoint, str) else checkpoint.get("task", "semantic")
    if task not in FAMILIES:
        raise ConfigError(f"checkpoint: unknown task {task!r}; segray knows {sorted(FAMILIES)}")
    return FAMILIES[task]
