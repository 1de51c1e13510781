"""A semantic checkpoint as one self-contained graph for serving: ONNX or a ``torch.export`` program.

What is exported is :class:`ServingModel`: raw ``float32 [B, C, H, W]`` band values in (the
values ``segray infer`` decodes, before normalisation), logits ``float32 [B, K, H, W]`` out.
Band normalisation is *inside* the graph, so a server needs nothing from the checkpoint but the
file, and cannot normalise with the wrong statistics. Batch, height and width are dynamic.

The checkpoint's class names, band statistics, model config and id go with the file (ONNX
``metadata_props``; the pt2 archive's ``extra_files``), as JSON strings under :data:`META_KEYS`.

Why the wrapper pads: U-Net pads odd sizes itself behind ``if h % m``, a branch an exporter must
pick once. ServingModel pads every input to the next multiple of the model's ``align``
(``(h + m - 1) // m * m``: by zero on multiples, exactly what the model's own padding does
elsewhere), so one graph serves every size with the eager model's logits. ``torch.export`` still
records shape guards for the size it traced (whether the padding is zero); they are
over-cautious here, so :func:`load_pt2` runs the program with ``check_guards=False`` (the unit
tests compare it with the eager model at several sizes, odd ones included).

Pure torch (+ onnx for the metadata); no Ray.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from segray.core.checkpoint import Checkpoint
from segray.core.models import build_model, model_spec

FORMATS = ("onnx", "pt2")
INPUT, OUTPUT = "pixels", "logits"  # the ONNX graph's input and output names
META_KEYS = ("segray_format", "class_names", "band_stats", "model_config", "checkpoint_id", "task", "bands",
             "ignore_index", "input", "output")
SERVING_FORMAT = "segray-serving/1"
ONNX_OPSET = 18


class ServingModel(nn.Module):
    """normalise -> pad to a multiple of ``align`` (edge-replicated) -> model -> crop: raw bands in, logits out."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor, align: int) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).float())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).float())
        self.align = int(align)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.align
        x = (x - self.mean) / self.std
        # Replicate padding commutes with the per-band affine normalisation, so this equals the
        # eager path (normalise, then the model pads) pixel for pixel.
        x = F.pad(x, (0, (w + m - 1) // m * m - w, 0, (h + m - 1) // m * m - h), mode="replicate")
        return self.model(x)[..., :h, :w]


def _semantic(ckpt: Checkpoint) -> None:
    if ckpt.task != "semantic":
        raise ValueError(f"export: a {ckpt.task!r} checkpoint ({ckpt.model_name}); only semantic models export "
                         "(Mask R-CNN's detections are not supported)")


def serving_model(ckpt: Checkpoint) -> ServingModel:
    """The checkpoint's model, weights loaded, in eval mode, wrapped as :class:`ServingModel`."""
    _semantic(ckpt)
    cfg = ckpt.model()
    model = build_model(cfg)
    model.load_state_dict(ckpt.model_state)
    mean, std = ckpt.normalization()
    return ServingModel(model, mean, std, model_spec(cfg.name).output_align(cfg)).eval()


def metadata(ckpt: Checkpoint) -> dict[str, str]:
    """What a server needs to know of the checkpoint, as strings (JSON values)."""
    return {"segray_format": SERVING_FORMAT, "class_names": json.dumps(ckpt.class_names),
            "band_stats": json.dumps(ckpt.band_stats), "model_config": json.dumps(ckpt.model_config),
            "checkpoint_id": ckpt.id, "task": ckpt.task, "bands": json.dumps(ckpt.bands),
            "ignore_index": json.dumps(ckpt.ignore_index),
            "input": "raw float32 band values [B, C, H, W], normalised inside the graph",
            "output": "logits float32 [B, K, H, W]; K = 1: sigmoid > 0.5, else argmax"}


def _example(ckpt: Checkpoint) -> torch.Tensor:
    # An odd, non-square size: the traced sizes are not multiples of the model's align, and H != W.
    return torch.rand(2, ckpt.in_channels, 37, 45)


def _dynamic_shapes() -> tuple[dict[int, Any], ...]:
    d = torch.export.Dim.DYNAMIC
    return ({0: d, 2: d, 3: d},)


def export_onnx(ckpt: Checkpoint) -> bytes:
    """The ONNX file (opset 18, dynamo exporter, weights embedded), metadata included."""
    import onnx

    model = serving_model(ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        # The exporter prints its progress on stdout: keep it off the CLI's output.
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(model, (_example(ckpt),), path, dynamo=True, dynamic_shapes=_dynamic_shapes(),
                              input_names=[INPUT], output_names=[OUTPUT], opset_version=ONNX_OPSET,
                              external_data=False, verbose=False)
        proto = onnx.load(path)
    for key, value in metadata(ckpt).items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def export_pt2(ckpt: Checkpoint) -> bytes:
    """The ``torch.export`` program as a ``.pt2`` archive, metadata in its extra files (``<key>.json``)."""
    model = serving_model(ckpt)
    with torch.no_grad():
        program = torch.export.export(model, (_example(ckpt),), dynamic_shapes=_dynamic_shapes(), strict=False)
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={f"{k}.json": v for k, v in metadata(ckpt).items()})
    return buf.getvalue()


EXPORTERS: dict[str, Callable[[Checkpoint], bytes]] = {"onnx": export_onnx, "pt2": export_pt2}


def export_checkpoint(ckpt: Checkpoint, fmt: str) -> bytes:
    """The checkpoint exported as ``fmt`` (one of :data:`FORMATS`)."""
    if fmt not in EXPORTERS:
        raise ValueError(f"export: unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    return EXPORTERS[fmt](ckpt)


def load_pt2(data: bytes) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, str]]:
    """A ``.pt2`` export as (callable: raw pixels -> logits, metadata). Shape guards are not checked
    (see the module doc: they record the traced padding branch, which the graph does not need)."""
    extra = {f"{k}.json": "" for k in META_KEYS}
    program = torch.export.load(io.BytesIO(data), extra_files=extra)
    return program.module(check_guards=False), {k[: -len(".json")]: v for k, v in extra.items()}


def onnx_metadata(data: bytes) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file's bytes."""
    import onnx

    return {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
