"""The per-worker training loop (runs inside Ray Train workers, DDP over gloo or NCCL).

One loop for every model family: a task (:mod:`segray.train.tasks`) supplies the model, how a
shard becomes batches, the loss and the validation metrics; the loop owns the optimizer, the
LR schedule (warm-up, cosine/step), AMP, gradient clipping, early stopping, checkpoints and
resuming from Ray Train's latest checkpoint after a lost worker.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from segray.config import TrainJobConfig
from segray.core.checkpoint import FILENAME, load_payload, make_payload, save_payload
from segray.core.optim import build_optimizer, lr_factor, set_lr
from segray.train.tasks import all_reduce, make_task


def _improved(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def _resume(model, opt) -> dict[str, Any]:
    """Restores model, optimizer and loop state from Ray Train's latest checkpoint, if any."""
    import ray.train

    state = {"epoch": 0, "step": 0, "best": None, "bad_epochs": 0, "history": []}
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return state
    with ckpt.as_directory() as d:
        payload = load_payload(os.path.join(d, FILENAME))
    model.load_state_dict(payload["model_state"])
    ts = payload["train_state"]
    opt.load_state_dict(ts["optimizer"])
    state.update({k: ts[k] for k in ("epoch", "best", "bad_epochs", "history")})
    state["step"] = ts.get("step", 0)
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
    use_amp = t.amp and device.type == "cuda"
    task = make_task(job, band_stats, device, use_amp)

    model = task.build_model()
    opt = build_optimizer(job.optim, model.parameters())
    state = _resume(model, opt)
    model = ray.train.torch.prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    for epoch in range(state["epoch"], t.epochs):
        model.train()
        sums: dict[str, float] = {"loss": 0.0, "n": 0.0}
        lr = job.optim.lr
        for batch in task.train_batches(ray.train.get_dataset_shard("train")):
            lr = job.optim.lr * lr_factor(job.optim, t.epochs, epoch, state["step"])
            set_lr(opt, lr)
            with torch.autocast(device.type, enabled=use_amp):
                loss, n, parts = task.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if job.optim.grad_clip is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, job.optim.grad_clip)
            scaler.step(opt)
            scaler.update()
            state["step"] += 1
            sums["loss"] += loss.item() * n
            sums["n"] += n
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * n
        if sums["n"] == 0:
            raise ValueError(f"train.batch_size: {t.batch_size} is more than this worker's share of the data")
        keys = sorted(sums)  # same keys on every rank: the task always reports the same parts
        totals = all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        reduced = dict(zip(keys, totals.tolist()))

        model.eval()
        val = ray.train.get_dataset_shard("val") if config["has_val"] else None
        # The trainer does not split validation (see trainer.build_trainer): every worker reads it
        # whole and evaluates its part, so each image counts once and no worker runs out of rows.
        part = (rank, ray.train.get_context().get_world_size()) if config.get("val_whole") else None
        # The bare module: DDP's forward would broadcast buffers, a collective that ranks with
        # different numbers of validation batches would never all reach.
        bare = getattr(model, "module", model)
        val_metrics = task.validate(bare, val, part) if config["has_val"] else {}

        metrics: dict[str, float] = {"epoch": epoch + 1, "lr": lr, "train_loss": reduced["loss"] / max(reduced["n"], 1)}
        metrics.update({k: v / max(reduced["n"], 1) for k, v in reduced.items() if k.startswith("train_")})
        metrics.update(val_metrics)
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
                train_state = {"optimizer": opt.state_dict(),
                               **{k2: state[k2] for k2 in ("epoch", "step", "best", "bad_epochs", "history")}}
                payload = make_payload(
                    model, job.model.model_dump(mode="json"), job.data.class_names, band_stats, task=task.name,
                    ignore_index=job.data.ignore_index, bands=job.data.bands, image_size=job.data.image_size,
                    metrics=metrics, train_state=train_state,
                )
                if config.get("category_ids") is not None:
                    payload["category_ids"] = list(config["category_ids"])
                save_payload(payload, os.path.join(d, FILENAME))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
        if stop:
            break
    return state["history"]
