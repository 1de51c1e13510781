"""The steps of bulk inference as plain batch functions: read+decode -> predict -> encode.

Reading and decoding (:func:`segray.io.reads.read_decode`) lives in ``io``: training data uses it too.

No Ray here: the pipeline wires these into ``map_batches``, tests call them directly.
A batch is a dict of columns (numpy arrays or lists). Bad input never raises: the row
gets ``status="error"`` and a reason, and later steps pass it through untouched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from segray.core import masks
from segray.core.checkpoint import FILENAME, Checkpoint
from segray.core.metrics import confusion_matrix, metric_num_classes, segmentation_metrics
from segray.core.models import build_model
from segray.config import StorageOptions
from segray.io.fs import fsspec_options, join
from segray.io.reads import NO_MASK

OUTPUT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_path", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
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


def resolve_checkpoint(url: str) -> str:
    """A checkpoint is a ``.pt`` file or a directory holding ``checkpoint.pt``."""
    return url if url.endswith(".pt") else join(url, FILENAME)


def open_checkpoint(url: str, storage: StorageOptions | None = None) -> Checkpoint:
    """The checkpoint at ``url`` (local or any fsspec URL), read and validated once."""
    import fsspec

    path = resolve_checkpoint(url)
    with fsspec.open(path, "rb", **fsspec_options(path, storage)) as f:
        return Checkpoint.load(f.read())


def error_reasons(errors: list[str | None], most: int = 20) -> list[str]:
    """The distinct kinds of error of a run (the text before the first colon), for its summary."""
    return sorted({e.split(":")[0] for e in errors if e})[:most]


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

    def __init__(self, checkpoint: str, storage: StorageOptions | None = None, device: str | None = None,
                 amp: bool = True, max_batch: int = 16):
        ckpt = open_checkpoint(checkpoint, storage)
        if ckpt.task != self.task:
            raise ValueError(f"{checkpoint}: a {ckpt.task!r} checkpoint; this step needs a {self.task!r} one")
        self.checkpoint_id = ckpt.id
        self.model_cfg = ckpt.model()
        self.class_names = ckpt.class_names
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.amp = amp and self.device.type == "cuda"
        self.max_batch = max_batch
        model = build_model(self.model_cfg)
        model.load_state_dict(ckpt.model_state)
        self.model = model.to(self.device).eval()
        self.mean, self.std = ckpt.normalization()

    def usable(self, batch: dict[str, Any], what: str = "image") -> tuple[list, list, list[int]]:
        """Rows' status and error, and the rows to predict: earlier errors pass through untouched."""
        status, error = list(batch["status"]), list(batch["error"])
        todo = []
        for i, im in enumerate(batch["pixels"]):
            if status[i] != "ok":
                continue
            if im.shape[0] != self.model_cfg.in_channels:
                status[i], error[i] = "error", f"{what} has {im.shape[0]} bands, model expects {self.model_cfg.in_channels}"
                continue
            todo.append(i)
        return status, error, todo

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """Same-shape images go through the model together; returns (class map, mean confidence)."""
        results: list[tuple[np.ndarray, float] | None] = [None] * len(images)
        for chunk in same_shape_chunks(images, self.max_batch):
            x = torch.from_numpy(np.stack([images[i] for i in chunk]))
            x = ((x - self.mean) / self.std).to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, enabled=self.amp):
                logits = self.model(x).float()
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
        status, error, todo = self.usable(batch)
        preds: list[np.ndarray] = [NO_MASK.astype(np.uint8)] * len(status)
        conf = np.full(len(status), np.nan)
        for i, (p, c) in zip(todo, self.predict([batch["pixels"][i] for i in todo])):
            preds[i], conf[i] = p, c
        out = {k: v for k, v in batch.items() if k != "pixels"}  # drop pixels early: memory
        out.update(status=np.array(status, dtype=object), error=np.array(error, dtype=object), pred=preds,
                   mean_confidence=conf, model_name=np.full(len(status), self.model_cfg.name, dtype=object),
                   checkpoint_id=np.full(len(status), self.checkpoint_id, dtype=object),
                   predict_ms=np.full(len(status), (time.perf_counter() - t0) * 1000 / max(len(status), 1)))
        return out


def encode(batch: dict[str, Any], class_names: list[str], ignore_index: int | None = None) -> pa.Table:
    """Class maps -> PNG bytes, class fractions and, with ground truth, per-image metrics."""
    k = metric_num_classes(len(class_names) if len(class_names) > 1 else 1)
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
        for col in ("image_id", "source_path", "status", "error", "height", "width", "bands",
                    "model_name", "checkpoint_id", "decode_ms", "predict_ms"):
            v = batch[col][i]
            rows[col].append(v.item() if isinstance(v, np.generic) else v)
        rows["error"][-1] = rows["error"][-1] or None
        rows["mask_png"].append(masks.encode_png(pred) if ok else None)
        rows["class_fractions"].append(masks.class_fractions(pred, k).tolist() if ok else None)
        conf = float(batch["mean_confidence"][i])
        rows["mean_confidence"].append(conf if ok else None)
        rows["has_ground_truth"].append(has_gt)
        for key, v in metrics.items():
            rows[key].append(v)
    return pa.Table.from_pydict(rows, schema=OUTPUT_SCHEMA)
