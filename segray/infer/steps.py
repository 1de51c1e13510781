"""The steps of bulk inference as plain batch functions: read+decode -> predict -> encode.

Reading and decoding (:func:`segray.io.reads.read_decode`) lives in ``io``: training data uses it too.

No Ray here: the pipeline wires these into ``map_batches``, tests call them directly.
A batch is a dict of columns (numpy arrays or lists). Bad input never raises: the row
gets ``status="error"`` and a reason, and later steps pass it through untouched.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from segray.config import StorageOptions
from segray.core import masks
from segray.core.checkpoint import Checkpoint
from segray.core.metrics import (
    confusion_matrix,
    metric_num_classes,
    segmentation_metrics,
)
from segray.core.models import build_model
from segray.core.tta import check_transforms, tta_logits
from segray.infer.runtimes import make_runtime
from segray.io.commit import resolve_checkpoint
from segray.io.fs import fsspec_options
from segray.io.reads import NO_MASK

OUTPUT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_path", pa.string()),
        ("source_path_bytes", pa.binary()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("error_kind", pa.string()),
        ("warnings", pa.list_(pa.string())),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("bands", pa.int32()),
        ("model_name", pa.string()),
        ("checkpoint_id", pa.string()),
        ("mask_png", pa.binary()),
        ("class_fractions", pa.list_(pa.float64())),
        ("mean_confidence", pa.float64()),
        ("has_ground_truth", pa.bool_()),
        ("pixel_accuracy", pa.float64()),
        ("iou", pa.list_(pa.float64())),
        ("dice", pa.list_(pa.float64())),
        ("confusion", pa.list_(pa.int64())),
        ("decode_ms", pa.float64()),
        ("predict_ms", pa.float64()),
    ]
)


def open_checkpoint(url: str, storage: StorageOptions | None = None) -> Checkpoint:
    """The checkpoint at ``url`` (local or any fsspec URL), read and validated once."""
    import fsspec

    path = resolve_checkpoint(url, storage)
    with fsspec.open(path, "rb", **fsspec_options(path, storage)) as f:
        return Checkpoint.load(f.read())


def error_reasons(kinds: list[str | None], most: int = 20) -> list[dict[str, Any]]:
    """``[{"kind": ..., "count": ...}]`` of a run's error rows, most frequent first, for its summary.

    Takes the rows' ``error_kind`` values; an error message works too (its kind is the text
    before the first colon: messages begin with it), so callers holding only messages count
    the same kinds.
    """
    counts = Counter(k.split(":", 1)[0].strip() for k in kinds if k)
    ranked = sorted(counts.items(), key=lambda kc: (-kc[1], kc[0]))
    return [{"kind": k, "count": c} for k, c in ranked[:most]]


def row_paths(batch: dict[str, Any], i: int) -> dict[str, Any]:
    """The path columns of output row ``i``: ``source_path`` (readable), ``source_path_bytes``."""
    raw = batch["source_path_bytes"][i]
    return {"source_path": str(batch["source_path"][i]),
            "source_path_bytes": bytes(raw) if isinstance(raw, bytes) and raw else None}


def row_problems(batch: dict[str, Any], i: int) -> dict[str, Any]:
    """``error`` and ``error_kind`` (null on ok rows) and ``warnings`` (a list) of output row ``i``."""
    warnings = batch["warnings"][i]
    return {"error": batch["error"][i] or None, "error_kind": batch["error_kind"][i] or None,
            "warnings": str(warnings).split("\n") if isinstance(warnings, str) and warnings else []}


def same_shape_chunks(images: list[np.ndarray], max_batch: int) -> Iterator[list[int]]:
    """Indices of same-shape images, at most ``max_batch`` at a time: one forward pass each."""
    by_shape: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(tuple(im.shape), []).append(i)
    for idx in by_shape.values():
        for start in range(0, len(idx), max_batch):
            yield idx[start : start + max_batch]


class Predictor:
    """Loads the checkpoint once, then maps decoded batches to class maps and confidences.

    The base of every predicting step (images, scene tiles, instances): one way to load a model
    and its band statistics, to batch by shape and to turn a wrong band count into an error row.
    """

    task = "semantic"  # the checkpoint's task this predictor serves
    returns_logits = True  # the model gives logits (through a runtime, with TTA); Mask R-CNN gives detections

    def __init__(self, checkpoint: str, storage: StorageOptions | None = None, device: str | None = None,
                 amp: bool = True, max_batch: int = 16, predictor: str = "eager", onnx_model: str | None = None,
                 tta: list[str] | tuple[str, ...] = (), threads: int | None = None):
        ckpt = open_checkpoint(checkpoint, storage)
        if ckpt.task != self.task:
            raise ValueError(f"{checkpoint}: a {ckpt.task!r} checkpoint; this step needs a {self.task!r} one")
        self.checkpoint_id = ckpt.id
        self.model_cfg = ckpt.model()
        self.class_names = ckpt.class_names
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.amp = amp and self.device.type == "cuda"
        self.max_batch = max_batch
        self.mean, self.std = ckpt.normalization()
        self.tta = check_transforms(tta)
        if self.returns_logits:  # the one seam between eager torch and ONNX Runtime (infer.runtimes)
            # The runtime builds the eager model only if it runs it: an ONNX actor holds no second copy.
            self.runtime = make_runtime(predictor, ckpt, lambda: self._build(ckpt), self.device, self.amp,
                                        onnx_model, storage, threads)
        else:
            self.model = self._build(ckpt)

    def _build(self, ckpt: Checkpoint) -> torch.nn.Module:
        model = build_model(self.model_cfg)
        model.load_state_dict(ckpt.model_state)
        return model.to(self.device).eval()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits of raw pixels ``x`` (CPU), through the runtime, averaged over ``tta``."""
        return tta_logits(self.runtime, x, self.tta)

    def checked(self, batch: dict[str, Any], what: str = "image") -> tuple[list, list, list, list[int]]:
        """Rows' status, error and error kind, and the rows to predict: earlier errors pass
        through untouched; a wrong band count is a ``band_mismatch``."""
        status, error = list(batch["status"]), list(batch["error"])
        kinds = list(batch["error_kind"]) if "error_kind" in batch else [str(e or "").split(":")[0] for e in error]
        todo = []
        for i, im in enumerate(batch["pixels"]):
            if status[i] != "ok":
                continue
            if im.shape[0] != self.model_cfg.in_channels:
                status[i], kinds[i] = "error", "band_mismatch"
                error[i] = f"band_mismatch: {what} has {im.shape[0]} bands, model expects {self.model_cfg.in_channels}"
                continue
            todo.append(i)
        return status, error, kinds, todo

    def usable(self, batch: dict[str, Any], what: str = "image") -> tuple[list, list, list[int]]:
        """``checked`` without the kinds (scene tiles carry none)."""
        status, error, _, todo = self.checked(batch, what)
        return status, error, todo

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """Same-shape images go through the model together; returns (class map, mean confidence)."""
        results: list[tuple[np.ndarray, float] | None] = [None] * len(images)
        for chunk in same_shape_chunks(images, self.max_batch):
            logits = self.logits(torch.from_numpy(np.stack([images[i] for i in chunk])))
            if logits.shape[1] == 1:
                p = torch.sigmoid(logits[:, 0])
                pred, conf = (p > 0.5).to(torch.uint8), torch.maximum(p, 1 - p)
            else:
                conf, pred = torch.softmax(logits, dim=1).max(dim=1)
                if logits.shape[1] <= 256:  # ids fit a byte: 8x fewer bytes off the GPU and to encode
                    pred = pred.to(torch.uint8)
            pred, conf = pred.cpu().numpy(), conf.mean(dim=(1, 2)).cpu().numpy()
            for j, i in enumerate(chunk):
                results[i] = (pred[j], float(conf[j]))
        return results  # type: ignore[return-value]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        status, error, kinds, todo = self.checked(batch)
        preds: list[np.ndarray] = [NO_MASK.astype(np.uint8)] * len(status)
        conf = np.full(len(status), np.nan)
        for i, (p, c) in zip(todo, self.predict([batch["pixels"][i] for i in todo])):
            preds[i], conf[i] = p, c
        out = {k: v for k, v in batch.items() if k != "pixels"}  # drop pixels early: memory
        out.update(status=np.array(status, dtype=object), error=np.array(error, dtype=object),
                   error_kind=np.array(kinds, dtype=object), pred=preds,
                   mean_confidence=conf, model_name=np.full(len(status), self.model_cfg.name, dtype=object),
                   checkpoint_id=np.full(len(status), self.checkpoint_id, dtype=object),
                   predict_ms=np.full(len(status), (time.perf_counter() - t0) * 1000 / max(len(status), 1)))
        return out


def encode(batch: dict[str, Any], class_names: list[str], ignore_index: int | None = None) -> pa.Table:
    """Class maps -> PNG bytes, class fractions and, with ground truth, per-image metrics."""
    k = metric_num_classes(max(1, len(class_names)))
    rows: dict[str, list] = {f.name: [] for f in OUTPUT_SCHEMA}
    n = len(batch["status"])
    for i in range(n):
        ok = batch["status"][i] == "ok"
        pred = batch["pred"][i]
        has_gt = ok and bool(batch["has_gt"][i])
        metrics: dict[str, Any] = {"pixel_accuracy": None, "iou": None, "dice": None, "confusion": None}
        if has_gt:
            cm = confusion_matrix(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(batch["gt"][i]), k, ignore_index)
            m = segmentation_metrics(cm, class_names)
            metrics = {
                "pixel_accuracy": m["pixel_accuracy"],
                "iou": [v for key, v in m.items() if key.startswith("iou/")],
                "dice": [v for key, v in m.items() if key.startswith("dice/")],
                "confusion": cm.flatten().tolist(),
            }
        for col in ("image_id", "status", "height", "width", "bands", "model_name", "checkpoint_id",
                    "decode_ms", "predict_ms"):
            v = batch[col][i]
            rows[col].append(v.item() if isinstance(v, np.generic) else v)
        for col, v in {**row_paths(batch, i), **row_problems(batch, i)}.items():
            rows[col].append(v)
        rows["mask_png"].append(masks.encode_png(pred) if ok else None)
        rows["class_fractions"].append(masks.class_fractions(pred, k).tolist() if ok else None)
        conf = float(batch["mean_confidence"][i])
        rows["mean_confidence"].append(conf if ok else None)
        rows["has_ground_truth"].append(has_gt)
        for key, v in metrics.items():
            rows[key].append(v)
    return pa.Table.from_pydict(rows, schema=OUTPUT_SCHEMA)
