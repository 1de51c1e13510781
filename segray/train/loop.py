"""The per-worker training loop (runs inside Ray Train workers, DDP over gloo or NCCL).

One loop for every model family: a task (:mod:`segray.train.tasks`) supplies the model, how a
shard becomes batches, the loss and the validation metrics; the loop owns the optimizer, the
LR schedule (warm-up, cosine/step), AMP, gradient clipping, early stopping, checkpoints and
resuming from Ray Train's latest checkpoint after a lost worker.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import threading
import time
from typing import Any

import torch

from segray.config import ConfigError, TrainJobConfig
from segray.core.checkpoint import FILENAME, Checkpoint
from segray.core.models import model_encoder, model_spec
from segray.core.optim import (
    batch_norm_eval,
    build_optimizer,
    freeze_batch_norm,
    group_scales,
    lr_factor,
    param_groups,
    set_lr,
)
from segray.train.tasks import all_reduce, make_task


def check_finetune(job: TrainJobConfig) -> None:
    """Refuse fine-tuning controls for a model whose registry entry names no encoder (one line)."""
    if job.finetune.active and model_spec(job.model.name).encoder is None:
        field = next(f for f in ("freeze_encoder_epochs", "encoder_lr_mult", "encoder_batch_norm")
                     if getattr(job.finetune, f) != type(job.finetune).model_fields[f].default)
        raise ConfigError(f"finetune.{field}: model {job.model.name!r} has no encoder to fine-tune "
                          "(remove the finetune section)")


def finetune_setup(job: TrainJobConfig, model: torch.nn.Module) -> tuple[list[dict], list[torch.nn.Module]]:
    """The optimizer's parameter groups and the encoder BatchNorm layers to keep in eval mode.

    Before DDP wraps the model: frozen BatchNorm parameters leave ``requires_grad`` here, once,
    so every rank's DDP sees the same trained parameters for the whole run.
    """
    check_finetune(job)
    encoder = model_encoder(job.model.name, model) if job.finetune.active else None
    frozen = freeze_batch_norm(encoder) if encoder is not None and job.finetune.encoder_batch_norm == "frozen" else []
    return param_groups(model, encoder), frozen


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
        ckpt = Checkpoint.load(os.path.join(d, FILENAME))
    model.load_state_dict(ckpt.model_state)
    ts = ckpt.train_state
    opt.load_state_dict(ts["optimizer"])
    state.update({k: ts[k] for k in ("epoch", "best", "bad_epochs", "history")})
    state["step"] = ts.get("step", 0)
    state["resumed_from_epoch"] = ts["epoch"]
    return state


class _NextEpoch:
    """Starts an epoch's batches in the background and holds its first batch.

    Ray Data restarts the shard's plan for every epoch (a new execution, the global shuffle's
    barrier), a fixed ~0.5 s here before the first batch. Started as soon as the previous epoch's
    training ends, that wait overlaps validation and the checkpoint, as a DataLoader's persistent
    workers would. The shard is split in a coordinator actor with its own copy of the dataset, so
    starting early does not change the seeded orders. A run that stops early leaves it unread; the
    thread is a daemon and ends with the worker.
    """

    def __init__(self, task, epoch: int):
        import ray.train

        self.batches = iter(task.train_batches(ray.train.get_dataset_shard("train"), epoch))
        self.first: list = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fetch, daemon=True, name=f"segray-epoch-{epoch}")
        self.thread.start()

    def _fetch(self) -> None:
        try:
            self.first = [next(self.batches)]
        except StopIteration:
            pass
        except BaseException as e:  # raised again in the training thread, where it belongs
            self.error = e

    def __iter__(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return itertools.chain(self.first, self.batches)


def _train_epoch(job: TrainJobConfig, task, model, opt, scaler, state: dict, epoch: int, plan: dict,
                 batches: _NextEpoch) -> dict:
    """One pass over this worker's shard; returns summed loss parts, its sample count and step time.

    With ``accumulate_grad_batches = N`` the optimizer steps after every N batches (and after the
    epoch's last one); DDP synchronises gradients only on those batches (``no_sync`` elsewhere).
    Every worker gets the same number of batches (the shard split is equal), so they agree on it.
    """
    t, accum = job.train, job.train.accumulate_grad_batches
    use_amp = scaler.is_enabled()
    params = [p for p in model.parameters() if p.requires_grad]
    sums: dict[str, float] = {"loss": 0.0, "n": 0.0}
    lr, steps, started, waited = job.optim.lr, 0, time.perf_counter(), 0.0
    t0 = time.perf_counter()
    batches = iter(batches)
    waited += time.perf_counter() - t0
    for i in itertools.count():
        t0 = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - t0  # the input pipeline's share of the step time
        if batch is None:
            break
        boundary = (i + 1) % accum == 0 or i + 1 >= plan["batches_per_epoch"]
        if i % accum == 0:
            lr = job.optim.lr * lr_factor(job.optim, t.epochs, epoch, state["step"], plan["total_steps"])
            set_lr(opt, lr, group_scales(job.finetune, epoch))
        sync = contextlib.nullcontext() if boundary or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(task.device.type, enabled=use_amp):
                loss, n, parts = task.loss(model, batch)
            scaler.scale(loss / accum).backward()
        if boundary:
            if job.optim.grad_clip is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, job.optim.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            steps += 1
        sums["loss"] += loss.item() * n
        sums["n"] += n
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v * n
    if sums["n"] == 0:
        raise ValueError(f"train.batch_size: {t.batch_size} is more than this worker's share of the data")
    return {"sums": sums, "lr": lr, "step_s": (time.perf_counter() - started) / max(steps, 1),
            "data_wait_s": waited / max(steps, 1)}


def _epoch_metrics(epoch: int, done: dict, rank: int, world: int) -> dict[str, float]:
    """Loss parts averaged over all workers' samples, and the samples each worker saw."""
    sums = done["sums"]
    keys = sorted(sums)  # same keys on every rank: the task always reports the same parts
    reduced = dict(zip(keys, all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64)).tolist()))
    seen = torch.zeros(world, dtype=torch.float64)
    seen[rank] = sums["n"]
    seen = all_reduce(seen)
    n = max(reduced["n"], 1)
    metrics: dict[str, float] = {"epoch": epoch + 1, "lr": done["lr"], "train_loss": reduced["loss"] / n,
                                 "train_step_s": done["step_s"], "train_data_wait_s": done["data_wait_s"],
                                 "train_samples": reduced["n"]}
    metrics.update({k: v / n for k, v in reduced.items() if k.startswith("train_")})
    metrics.update({f"train_samples/w{r}": float(v) for r, v in enumerate(seen.tolist())})
    return metrics


def _validate(config: dict, task, model, rank: int, world: int) -> dict[str, float]:
    import ray.train

    if not config["has_val"]:
        return {}
    model.eval()
    # The trainer does not split validation (see trainer.build_trainer): every worker reads it
    # whole and evaluates its part, so each image counts once and no worker runs out of rows.
    part = (rank, world) if config.get("val_whole") else None
    # The bare module: DDP's forward would broadcast buffers, a collective that ranks with
    # different numbers of validation batches would never all reach.
    return task.validate(getattr(model, "module", model), ray.train.get_dataset_shard("val"), part)


def _update_state(t, state: dict, metrics: dict) -> bool:
    """Best score, epochs without improvement, history; True when early stopping says stop."""
    score = metrics.get(t.metric)
    if score is None:
        raise ValueError(f"train.metric: {t.metric!r} is not reported; have {sorted(metrics)}")
    if _improved(score, state["best"], t.mode):
        state["best"], state["bad_epochs"] = score, 0
    else:
        state["bad_epochs"] += 1
    state["history"].append(metrics)
    state["epoch"] += 1
    return t.patience is not None and state["bad_epochs"] >= t.patience


def _report(job: TrainJobConfig, config: dict, task, model, opt, state: dict, metrics: dict, rank: int) -> None:
    """Every rank must call report; only rank 0 writes the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            train_state = {"optimizer": opt.state_dict(),
                           **{k: state[k] for k in ("epoch", "step", "best", "bad_epochs", "history")}}
            Checkpoint.of(
                model, job.model.model_dump(mode="json"), job.data.class_names, config["band_stats"],
                task=task.name, ignore_index=job.data.ignore_index, bands=job.data.bands,
                image_size=list(job.data.image_size) if job.data.image_size else None,
                metrics=metrics, train_state=train_state,
                category_ids=list(config["category_ids"]) if config.get("category_ids") is not None else None,
            ).save(os.path.join(d, FILENAME))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, float]]:
    import ray.train
    import ray.train.torch

    job = TrainJobConfig.model_validate(config["job"])
    t = job.train
    torch.manual_seed(t.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    use_amp = t.amp and device.type == "cuda"
    task = make_task(job, config["band_stats"], device, use_amp)

    model = task.build_model()
    if job.model.sync_batch_norm and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    groups, frozen_bn = finetune_setup(job, model)
    opt = build_optimizer(job.optim, groups)
    state = _resume(model, opt)
    model = ray.train.torch.prepare_model(model)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    upcoming = _NextEpoch(task, state["epoch"]) if state["epoch"] < t.epochs else None
    for epoch in range(state["epoch"], t.epochs):
        model.train()
        batch_norm_eval(frozen_bn)  # after every train(): frozen statistics stay frozen
        done = _train_epoch(job, task, model, opt, scaler, state, epoch, config["plan"], upcoming)
        upcoming = _NextEpoch(task, epoch + 1) if epoch + 1 < t.epochs else None
        metrics = _epoch_metrics(epoch, done, rank, world)
        metrics.update(_validate(config, task, model, rank, world))
        if "resumed_from_epoch" in state:
            metrics["resumed_from_epoch"] = state["resumed_from_epoch"]
        stop = _update_state(t, state, metrics)
        _report(job, config, task, model, opt, state, metrics, rank)
        if stop:
            break
    return state["history"]
