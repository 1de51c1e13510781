"""What a model family gives the inference pipelines: one object per family, no ``if`` per family.

The images pipeline (:mod:`segray.infer.pipeline`), the nightly runs and the scenes pipeline wire
their Ray Data stages once and ask the checkpoint's family (:func:`segray.infer.families.family_of`)
for the parts: how listed samples become rows, the read, predict and encode steps, the row
schema, the run summary, and for scenes the tile predictor and the scene merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa


@dataclass(frozen=True)
class ImageStages:
    """One images run of a family: its rows, then read -> predict (an actor pool) -> encode."""

    items: pa.Table | list[dict]  # one row per listed sample, in listing order
    read: Callable[..., dict]
    read_kwargs: dict
    predictor: type  # constructed once per actor
    predictor_kwargs: dict
    encode: Callable[..., pa.Table]
    encode_kwargs: dict


@dataclass(frozen=True)
class Family:
    """A model family (the ``family`` of a registered model, the ``task`` of its checkpoints)."""

    name: str
    schema: pa.Schema  # the images pipeline's row schema
    image_stages: Callable[..., ImageStages]  # (InferJobConfig, listing table, Checkpoint) -> stages
    summarize: Callable[..., dict[str, Any]]  # (InferJobConfig, Checkpoint, inputs, wall s) -> summary
    scenes: Any = field(default=None)  # the scene parts: tile predictor, tile writer, scene merge
