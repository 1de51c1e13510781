"""The per-worker training loop (runs inside Ray Train workers, DDP over gloo or NCCL)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
import torch.distributed as dist

from segray.config import TrainJobConfig
from segray.core.checkpoint import FILENAME, load_payload, make_payload, save_payload
from segray.core.losses import build_loss
from segray.core.metrics import SegmentationMeter, segmentation_metrics
from segray.core.models import build_model


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _improved(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def _resume(model, opt, sched) -> dict[str, Any]:
    """Restores model, optimizer and loop state from Ray Train's latest checkpoint, if any."""
    import ray.train

    state = {"epoch": 0, "best": None, "bad_epochs": 0, "history": []}
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return state
    with ckpt.as_directory() as d:
        payload = load_payload(os.path.join(d, FILENAME))
    model.load_state_dict(payload["model_state"])
    ts = payload["train_state"]
    opt.load_state_dict(ts["optimizer"])
    sched.load_state_dict(ts["scheduler"])
    state.update({k: ts[k] for k in ("epoch", "best", "bad_epochs", "history")})
    state["resumed_from_epoch"] = ts["epoch"]
    return state


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, float]]:
    import ray.train
    import ray.train.torch

    job = TrainJobConfig.model_validate(config["job"])
    band_stats = config["band_stats"]
    t = job.train
    torch.manual_seed(t.seed)
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()

    model = build_model(job.model)
    opt = torch.optim.AdamW(model.parameters(), lr=job.optim.lr, weight_decay=job.optim.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    state = _resume(model, opt, sched)
    model = ray.train.torch.prepare_model(model)

    mean = torch.tensor(band_stats["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(band_stats["std"], device=device).view(1, -1, 1, 1)
    loss_fn = build_loss(job.loss, job.model.num_classes, job.data.ignore_index).to(device)
    use_amp = t.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    dtypes = {"image": torch.float32, "mask": torch.int64}
    names = job.data.class_names

    for epoch in range(state["epoch"], t.epochs):
        model.train()
        sums = torch.zeros(4, dtype=torch.float64)  # train loss sum, train n, val loss sum, val n
        for batch in ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=t.batch_size, dtypes=dtypes, device=device, drop_last=True  # BatchNorm needs > 1
        ):
            x, y = (batch["image"] - mean) / std, batch["mask"]
            with torch.autocast(device.type, enabled=use_amp):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sums[0] += loss.item() * len(y)
            sums[1] += len(y)
        if sums[1] == 0:
            raise ValueError(f"train.batch_size: {t.batch_size} is more than this worker's share of the data")
        sched.step()

        meter = SegmentationMeter(job.model.num_classes, ignore_index=job.data.ignore_index)
        val = ray.train.get_dataset_shard("val") if config["has_val"] else None
        model.eval()
        with torch.no_grad():
            for batch in val.iter_torch_batches(batch_size=t.batch_size, dtypes=dtypes, device=device) if val else []:
                x, y = (batch["image"] - mean) / std, batch["mask"]
                with torch.autocast(device.type, enabled=use_amp):
                    logits = model(x).float()
                sums[2] += loss_fn(logits, y).item() * len(y)
                sums[3] += len(y)
                meter.update(logits.cpu(), y.cpu())
        _all_reduce(sums)
        cm = _all_reduce(meter.cm.clone())

        metrics: dict[str, float] = {"epoch": epoch + 1, "lr": sched.get_last_lr()[0],
                                     "train_loss": (sums[0] / sums[1].clamp(min=1)).item()}
        if sums[3] > 0:
            metrics["val_loss"] = (sums[2] / sums[3]).item()
            metrics.update({f"val_{key}": v for key, v in segmentation_metrics(cm, names).items()})
        if "resumed_from_epoch" in state:
            metrics["resumed_from_epoch"] = state["resumed_from_epoch"]
        score = metrics.get(t.metric)
        if score is None:
            raise ValueError(f"train.metric: {t.metric!r} is not reported; have {sorted(metrics)}")
        if _improved(score, state["best"], t.mode):
            state["best"], state["bad_epochs"] = score, 0
        else:
            state["bad_epochs"] += 1
        state["history"].append(metrics)
        state["epoch"] = epoch + 1
        stop = t.patience is not None and state["bad_epochs"] >= t.patience

        # Every rank must call report; only rank 0 writes the checkpoint.
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                train_state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                               **{k2: state[k2] for k2 in ("epoch", "best", "bad_epochs", "history")}}
                payload = make_payload(
                    model, job.model.model_dump(mode="json"), job.data.class_names, band_stats,
                    ignore_index=job.data.ignore_index, bands=job.data.bands, image_size=job.data.image_size,
                    metrics=metrics, train_state=train_state,
                )
                save_payload(payload, os.path.join(d, FILENAME))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
        if stop:
            break
    return state["history"]
