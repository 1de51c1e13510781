"""The checkpoint payload: everything inference needs, in one ``torch.save`` file.

Only tensors, numbers, strings, lists and dicts go in, so the file loads with
``torch.load(weights_only=True)`` (no pickled code runs when a checkpoint is opened).
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, BinaryIO

import torch

FORMAT = "segray/1"
FILENAME = "checkpoint.pt"


def make_payload(
    model: torch.nn.Module,
    model_config: dict,
    class_names: list[str],
    band_stats: dict | None,
    *,
    task: str = "semantic",
    ignore_index: int | None = None,
    bands: list[int] | None = None,
    image_size: list[int] | None = None,
    metrics: dict[str, float] | None = None,
    train_state: dict | None = None,
) -> dict[str, Any]:
    state = {k.removeprefix("module."): v.detach().cpu() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT,
        "task": task,
        "model_config": model_config,
        "class_names": list(class_names),
        "band_stats": band_stats,
        "ignore_index": ignore_index,
        "bands": bands,
        "image_size": image_size,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "model_state": state,
        "train_state": train_state or {},
    }


def save_payload(payload: dict, f: str | BinaryIO) -> None:
    torch.save(payload, f)


def load_payload(f: str | BinaryIO | bytes) -> dict[str, Any]:
    if isinstance(f, bytes):
        f = io.BytesIO(f)
    payload = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"not a segray checkpoint (expected format {FORMAT!r})")
    return payload


def checkpoint_id(data: bytes) -> str:
    """Content hash: the same weights give the same id wherever they are stored."""
    return hashlib.sha256(data).hexdigest()[:16]
