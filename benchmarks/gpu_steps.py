"""Model-only figures on one device, without Ray: training steps and forward passes.

Measured, never asserted. For each model (U-Net; an smp U-Net/ResNet-18 when registered;
Mask R-CNN) it times, on preloaded tensors on the device:

- training steps/s (forward, loss, backward, AdamW step) in fp32 and in mixed precision
  (fp16 autocast with a GradScaler on CUDA, bf16 autocast on a CPU), and their ratio;
- inference images/s (forward + argmax) in fp32 and in mixed precision.

It needs only torch, torchvision and segray's pure core, so ``gpu_check.sh`` runs it even
where Ray cannot be installed.

    .venv/bin/python benchmarks/gpu_steps.py --device cuda
    .venv/bin/python benchmarks/gpu_steps.py --device cpu --size 128 --steps 3   # a smoke run here
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from segray.config import LossConfig, ModelConfig
from segray.core.losses import build_loss
from segray.core.models import MODELS, build_model
from segray.runtime import keep_freed_memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device, mixed: bool):
    if not mixed:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def _timed(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up: cuDNN autotune, allocator, thread pools
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return steps / (time.perf_counter() - t)


def _figures(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_of, run, device: torch.device, steps: int,
             batch: int) -> dict:
    """Training and inference images/s, fp32 and mixed, for ``loss_of()`` (a scalar) and ``run()``."""
    out = {}
    for mixed in (False, True):
        scaler = torch.amp.GradScaler(enabled=mixed and device.type == "cuda")

        def train_step():
            opt.zero_grad(set_to_none=True)
            with _autocast(device, mixed):
                loss = loss_of()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        @torch.inference_mode()
        def forward():
            with _autocast(device, mixed):
                run()

        model.train()
        out[("train", mixed)] = _timed(train_step, steps, device) * batch
        model.eval()
        out[("infer", mixed)] = _timed(forward, steps, device) * batch
    return out


def semantic_figures(cfg: ModelConfig, device: torch.device, batch: int, size: int, steps: int) -> dict:
    model = build_model(cfg).to(device)
    loss_fn = build_loss(LossConfig(), cfg.num_classes, None)
    x = torch.randn(batch, cfg.in_channels, size, size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch, size, size), device=device)
    return _figures(model, torch.optim.AdamW(model.parameters(), lr=1e-4), lambda: loss_fn(model(x).float(), y),
                    lambda: model(x).float().argmax(1), device, steps, batch)


def maskrcnn_figures(device: torch.device, batch: int, size: int, steps: int) -> dict:
    cfg = ModelConfig(name="maskrcnn_resnet50_fpn", num_classes=4, min_size=size, max_size=size)
    model = build_model(cfg).to(device)
    images = [torch.rand(3, size, size, device=device) for _ in range(batch)]
    box = torch.tensor([[size * 0.2, size * 0.2, size * 0.6, size * 0.6]], device=device)
    mask = torch.zeros(1, size, size, dtype=torch.uint8, device=device)
    mask[:, size // 5: size * 3 // 5, size // 5: size * 3 // 5] = 1
    targets = [{"boxes": box, "labels": torch.tensor([1], device=device), "masks": mask} for _ in range(batch)]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return _figures(model, opt, lambda: sum(model(images, targets).values()), lambda: model(images), device,
                    steps, batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--size", type=int, default=512, help="square input side, px")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per figure")
    ap.add_argument("--skip-maskrcnn", action="store_true")
    args = ap.parse_args()
    keep_freed_memory()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    mixed = "fp16 AMP" if device.type == "cuda" else "bf16 autocast"
    print(f"device: {name}; batch {args.batch_size}, {args.size}x{args.size}, {args.steps} timed steps; "
          f"mixed precision = {mixed}")
    models = {"unet (depth 4, width 32)": ModelConfig(name="unet", in_channels=4, num_classes=5)}
    if "smp" in MODELS:
        models["smp Unet/resnet18"] = ModelConfig(name="smp", arch="Unet", encoder="resnet18", in_channels=4,
                                                  num_classes=5)
    rows = {label: semantic_figures(cfg, device, args.batch_size, args.size, args.steps)
            for label, cfg in models.items()}
    if not args.skip_maskrcnn:
        rows["maskrcnn_resnet50_fpn"] = maskrcnn_figures(device, max(1, args.batch_size // 4), args.size, args.steps)
    print(f"{'model':<26} {'train img/s fp32':>16} {'mixed':>8} {'x':>6} {'infer img/s fp32':>17} {'mixed':>8} {'x':>6}")
    for label, r in rows.items():
        print(f"{label:<26} {r['train', False]:>16.1f} {r['train', True]:>8.1f} {r['train', True] / r['train', False]:>5.2f}x"
              f" {r['infer', False]:>17.1f} {r['infer', True]:>8.1f} {r['infer', True] / r['infer', False]:>5.2f}x")


if __name__ == "__main__":
    main()
