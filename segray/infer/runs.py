"""What every inference run reports, whatever its model family: where rows go, and the counts.

The images pipeline (:mod:`segray.infer.pipeline`) and the instance rows
(:mod:`segray.infer.instance`) both summarise their runs with :func:`run_counts`.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pyarrow as pa

from segray.config import InferJobConfig
from segray.core.checkpoint import Checkpoint
from segray.infer.steps import error_reasons
from segray.io.fs import join

from segray.infer.sinks import PREDICTIONS


def run_counts(cfg: InferJobConfig, ckpt: Checkpoint, num_inputs: int, wall_s: float,
               table: pa.Table) -> dict[str, Any]:
    """What every inference summary reports, from the written rows' ``status``, ``error_kind``,
    ``height``, ``width``, ``decode_ms`` and ``predict_ms``: counts, rates, stage times, and
    ``error_reasons`` (``[{"kind", "count"}]``, most frequent first)."""
    status = np.asarray(table["status"].to_pylist())
    ok = status == "ok"
    kinds = [k or "unknown" for k, s in zip(table["error_kind"].to_pylist(), status) if s != "ok"]
    pixels = float(np.sum(np.asarray(table["height"].to_pylist(), float) * np.asarray(table["width"].to_pylist(), float)))
    return {
        "run_id": uuid.uuid4().hex[:12],
        "output": cfg.output,
        "predictions": join(cfg.output, PREDICTIONS),
        "model_name": ckpt.model_name,
        "checkpoint_id": ckpt.id,
        "num_inputs": num_inputs,
        "num_rows": len(status),
        "num_ok": int(ok.sum()),
        "num_error": int((~ok).sum()),
        "wall_s": wall_s,
        "images_per_s": len(status) / wall_s if wall_s else 0.0,
        "megapixels_per_s": pixels / 1e6 / wall_s if wall_s else 0.0,
        "mean_decode_ms": float(np.mean(table["decode_ms"].to_pylist())) if len(status) else 0.0,
        "mean_predict_ms": float(np.mean(table["predict_ms"].to_pylist())) if len(status) else 0.0,
        "error_reasons": error_reasons(kinds),
    }
