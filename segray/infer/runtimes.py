"""What runs a semantic model inside a predictor actor: one seam, two runtimes.

A runtime is a callable ``raw float32 pixels [B, C, H, W] (torch, CPU) -> float32 logits [B, K, H, W]``:
normalisation is its business, so the predictor (:class:`segray.infer.steps.Predictor`) and
test-time augmentation (:func:`segray.core.tta.tta_logits`) are the same for both.

- :class:`EagerRuntime`: the checkpoint's PyTorch model (normalise, then the model; AMP on CUDA).
- :class:`OrtRuntime`: the checkpoint's ONNX export (:mod:`segray.core.export`: normalisation inside
  the graph) on ONNX Runtime's CPU provider. Without an ``onnx_model`` file the actor exports the
  checkpoint itself when it starts (a few seconds, once per actor).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from segray.config import StorageOptions
from segray.core.checkpoint import Checkpoint
from segray.core.export import export_onnx, onnx_metadata

Runtime = Callable[[torch.Tensor], torch.Tensor]
RUNTIMES = ("eager", "onnxruntime")


class EagerRuntime:
    """normalise -> model (on ``device``, autocast when ``amp``) -> float32 logits (on ``device``)."""

    name = "eager"

    def __init__(self, model: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                 amp: bool) -> None:
        self.model, self.device, self.amp = model, device, amp
        self.mean, self.std = mean.to(device), std.to(device)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.to(self.device, non_blocking=True) - self.mean) / self.std
        with torch.autocast(self.device.type, enabled=self.amp):
            return self.model(x).float()


def ort_threads(cpus: float | None) -> int:
    """Intra-op threads for an actor holding ``cpus`` CPUs: Ray's own rule for OMP_NUM_THREADS (the
    whole part, at least 1), so a 0.5-CPU actor runs one thread instead of one per core."""
    if cpus is None:
        cpus = float(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    return max(1, int(cpus))


class OrtRuntime:
    """An ONNX Runtime session (CPUExecutionProvider) on the exported graph."""

    name = "onnxruntime"

    def __init__(self, onnx_bytes: bytes, checkpoint_id: str, threads: int) -> None:
        import onnxruntime as ort

        meta = onnx_metadata(onnx_bytes)
        if meta.get("checkpoint_id") and checkpoint_id and meta["checkpoint_id"] != checkpoint_id:
            raise ValueError(f"onnx_model: exported from checkpoint {meta['checkpoint_id']}, "
                             f"not this job's checkpoint {checkpoint_id}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input: x.detach().cpu().float().contiguous().numpy()})[0]
        return torch.from_numpy(out)


def make_runtime(kind: str, ckpt: Checkpoint, build: Callable[[], torch.nn.Module], device: torch.device,
                 amp: bool, onnx_model: str | None = None, storage: StorageOptions | None = None,
                 threads: int | None = None) -> Runtime:
    """The runtime ``kind`` (one of :data:`RUNTIMES`) for this checkpoint; ``build()`` gives its eager
    model (on ``device``, eval), called only by the runtime that runs it."""
    if kind == "eager":
        mean, std = ckpt.normalization()
        return EagerRuntime(build(), mean, std, device, amp)
    if kind == "onnxruntime":
        from segray.io.fs import read_bytes

        data = read_bytes(onnx_model, storage) if onnx_model else export_onnx(ckpt)
        return OrtRuntime(data, ckpt.id, threads or ort_threads(None))
    raise ValueError(f"predictor: unknown runtime {kind!r}; one of {', '.join(RUNTIMES)}")
