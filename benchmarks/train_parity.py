"""Training parity: the same model, data, budget and seed trained two ways, in one run:

* plain loop    one process, its own ~100 lines of PyTorch (torch Dataset over the PNG pairs,
                DataLoader(shuffle=True, drop_last=True), AdamW, poly LR, cross-entropy, per-epoch
                validation with its own confusion matrix); only segray's model builder is borrowed
* segray        ``segray train`` (``run_training``) in-process, on 2 Ray Train workers (DDP, gloo)

Both get the same U-Net (segray's ``build_model``), the same global batch (plain batch =
workers x per-worker batch), epochs, optimizer (AdamW, lr 1e-3, wd 1e-4), per-step poly LR
schedule ``lr * (1 - step/total)**0.9``, loss (cross-entropy with ignore_index), augmentation
(random h/v flips only), per-band normalisation computed from the training images, and seed
(the same initial weights: both seed torch, then build the model). Both validate on exactly the
same images, a separate folder pair (``data.val_source``).

Two datasets, written as PNG folder pairs (``images/``, ``masks/``) whose file names come in a
sequential order, so that a way that does not shuffle would train on sorted data:

* demo   ``segray.demo.scenes.write_demo_dataset`` scenes (train: seed 0; val: seed 1)
* real   the 3 LoveDA tiles of ``<shared-data>/loveda_potsdam_vaihingen_mmseg`` (1024x1024 RGB),
         cut into chips named ``tileA_0000.png ...`` (grouped by tile); every 4th chip of each
         tile is validation. LoveDA label 0 (nodata) -> ignore 255, labels 1..7 -> classes 0..6

    python benchmarks/train_parity.py                     # demo + real, seeds 0 1 2
    python benchmarks/train_parity.py --datasets demo --seeds 0 1 2 3 4
    python benchmarks/train_parity.py --quick             # a smoke run: tiny data, 1 epoch, 1 seed

It prints, per dataset, val mIoU per seed and its mean +- std over seeds, step time (wall
seconds per optimizer step of the training part of an epoch, data waiting included; segray's
rank 0 reports it as ``train_step_s``; epoch 1 is shown apart, the ratio uses epochs 2+), the
ratios segray/plain and one verdict line per target. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.table import Table

from segray.config import ModelConfig
from segray.core.models import build_model
from segray.demo.scenes import write_demo_dataset
from segray.runtime import keep_freed_memory, use_node_env

console = Console() if sys.stdout.isatty() else Console(width=132)

REPO = Path(__file__).resolve().parents[1]
SPREADS = 2.0  # parity: segray mean >= plain mean - SPREADS * spread over seeds
STEP_TARGET = 1.1  # segray step time / plain step time, CPU
LOVEDA_CLASSES = ["background", "building", "road", "water", "barren", "forest", "agriculture"]
IGNORE = 255


# --------------------------------------------------------------------------- data


@dataclass
class PairSet:
    name: str
    train: tuple[str, str]  # images folder, masks folder
    val: tuple[str, str]
    class_names: list[str]
    ignore_index: int | None
    note: str = ""


def write_demo(root: Path, n_train: int, n_val: int, size: int) -> PairSet:
    tr = write_demo_dataset(root / "train", n_train, size, seed=0)
    va = write_demo_dataset(root / "val", n_val, size, seed=1)
    return PairSet("demo", (tr["images"], tr["masks"]), (va["images"], va["masks"]), tr["class_names"], None,
                   f"{n_train} train + {n_val} val generated scenes of {size}x{size}")


def shared_data_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    return Path(os.environ.get("SEGRAY_SHARED_DATA") or REPO.parent / "shared" / "data")


def write_loveda(shared: Path, root: Path, chip: int, val_every: int) -> PairSet | None:
    """Chips of the LoveDA tiles; chip k of a tile (raster order) is validation when k % val_every == val_every-1."""
    src = shared / "loveda_potsdam_vaihingen_mmseg" / "loveda"
    tiles = sorted((src / "img_dir").glob("*.png"), key=lambda p: p.stem)
    if not tiles:
        return None
    dirs = {s: (root / s / "images", root / s / "masks") for s in ("train", "val")}
    for d in (d for pair in dirs.values() for d in pair):
        d.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "val": 0}
    for t, path in enumerate(tiles):
        img = np.asarray(Image.open(path).convert("RGB"))
        lab = np.asarray(Image.open(src / "ann_dir" / path.name))
        mask = np.where(lab == 0, IGNORE, lab.astype(np.int16) - 1).astype(np.uint8)
        k = 0
        for r in range(0, img.shape[0] - chip + 1, chip):
            for c in range(0, img.shape[1] - chip + 1, chip):
                split = "val" if k % val_every == val_every - 1 else "train"
                name = f"tile{chr(ord('A') + t)}_{k:04d}.png"
                Image.fromarray(img[r:r + chip, c:c + chip]).save(dirs[split][0] / name)
                Image.fromarray(mask[r:r + chip, c:c + chip]).save(dirs[split][1] / name)
                counts[split] += 1
                k += 1
    return PairSet("real", tuple(map(str, dirs["train"])), tuple(map(str, dirs["val"])), list(LOVEDA_CLASSES),
                   IGNORE, f"{len(tiles)} LoveDA tiles cut into {chip}x{chip} chips: {counts['train']} train, "
                   f"{counts['val']} val (every {val_every}th chip of each tile)")


# --------------------------------------------------------------------------- the settings both ways share


@dataclass
class Settings:
    epochs: int
    batch_size: int  # per segray worker; the plain loop takes workers x this
    workers: int
    depth: int
    base_width: int
    lr: float = 1e-3
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    hflip: float = 0.5
    vflip: float = 0.5
    threads: int = 2  # the plain loop's torch threads (the cores the 2 Ray workers share)

    @property
    def global_batch(self) -> int:
        return self.workers * self.batch_size

    def model(self, num_classes: int) -> dict:
        return {"name": "unet", "in_channels": 3, "num_classes": num_classes, "depth": self.depth,
                "base_width": self.base_width, "batch_norm": True}


# --------------------------------------------------------------------------- way 1: a plain PyTorch loop


def _pairs(folders: tuple[str, str]) -> list[tuple[Path, Path]]:
    masks = {p.stem: p for p in Path(folders[1]).glob("*.png")}
    return [(p, masks[p.stem]) for p in sorted(Path(folders[0]).glob("*.png"), key=lambda p: p.name)]


def _read(pair: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray]:
    img = np.asarray(Image.open(pair[0]))
    img = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)  # [C, H, W]
    return img, np.asarray(Image.open(pair[1])).astype(np.int64)


class PairFolder(torch.utils.data.Dataset):
    """PNG image/mask pairs, normalised; random h/v flips when ``flips`` is given."""

    def __init__(self, folders, mean, std, flips: tuple[float, float] | None = None, seed: int = 0):
        self.pairs = _pairs(folders)
        self.mean, self.std = mean[:, None, None], std[:, None, None]
        self.flips, self.rng = flips, np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):
        img, mask = _read(self.pairs[i])
        if self.flips is not None:
            if self.rng.random() < self.flips[0]:
                img, mask = img[:, :, ::-1], mask[:, ::-1]
            if self.rng.random() < self.flips[1]:
                img, mask = img[:, ::-1], mask[::-1]
        x = (img.astype(np.float32) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(np.ascontiguousarray(mask))


def plain_band_stats(folders) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and population std over every training image (float64)."""
    pix = np.stack([_read(p)[0] for p in _pairs(folders)]).astype(np.float64)
    return pix.mean(axis=(0, 2, 3)), np.maximum(pix.std(axis=(0, 2, 3)), 1e-6)


def confusion(pred: torch.Tensor, target: torch.Tensor, k: int, ignore: int | None) -> np.ndarray:
    keep = (target != ignore) if ignore is not None else torch.ones_like(target, dtype=torch.bool)
    keep &= (target >= 0) & (target < k)
    idx = target[keep] * k + pred[keep]
    return np.bincount(idx.numpy(), minlength=k * k).reshape(k, k)  # rows: truth


def miou(cm: np.ndarray) -> float:
    """nanmean of per-class IoU; a class absent from both target and prediction is NaN."""
    tp, support, predicted = np.diag(cm).astype(float), cm.sum(1), cm.sum(0)
    union = support + predicted - tp
    iou = np.where(support + predicted > 0, tp / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan


def plain_train(data: PairSet, s: Settings, seed: int) -> dict:
    torch.set_num_threads(s.threads)
    k = len(data.class_names)
    mean, std = plain_band_stats(data.train)
    train_ds = PairFolder(data.train, mean, std, flips=(s.hflip, s.vflip), seed=seed)
    val_ds = PairFolder(data.val, mean, std)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=s.global_batch, shuffle=True, drop_last=True,
                                         num_workers=0, generator=torch.Generator().manual_seed(seed))
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=s.global_batch, shuffle=False, num_workers=0)
    if len(loader) == 0:
        raise ValueError(f"global batch {s.global_batch} is more than the {len(train_ds)} training images")
    torch.manual_seed(seed)  # as segray's workers: seed, then build (the same initial weights)
    model = build_model(ModelConfig(**s.model(k)))
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    ignore = data.ignore_index if data.ignore_index is not None else -100
    total, step, history = s.epochs * len(loader), 0, []
    t_start = time.perf_counter()
    for epoch in range(s.epochs):
        model.train()
        loss_sum = n = 0.0
        t0 = time.perf_counter()
        for x, y in loader:
            lr = s.lr * (1 - step / total) ** s.poly_power
            for g in opt.param_groups:
                g["lr"] = lr
            nll = F.cross_entropy(model(x), y, ignore_index=ignore, reduction="sum")
            loss = nll / (y != ignore).sum().clamp_min(1)  # mean over valid pixels, 0 if none
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum, n = loss_sum + loss.item() * len(y), n + len(y)
        train_s = time.perf_counter() - t0
        model.eval()
        cm = np.zeros((k, k), dtype=np.int64)
        with torch.no_grad():
            for x, y in val_loader:
                cm += confusion(model(x).argmax(1), y, k, data.ignore_index)
        history.append({"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / n, "val_miou": miou(cm),
                        "train_step_s": train_s / len(loader), "steps": len(loader)})
    return {"history": history, "wall_s": time.perf_counter() - t_start,
            "band_stats": {"mean": mean.tolist(), "std": std.tolist()}}


# --------------------------------------------------------------------------- way 2: segray train


def segray_train(data: PairSet, s: Settings, seed: int, storage: Path) -> dict:
    from segray.config import TrainJobConfig, build_config
    from segray.train.trainer import run_training

    tree = {
        "data": {
            "source": {"images": data.train[0], "masks": data.train[1]},
            "val_source": {"images": data.val[0], "masks": data.val[1]},
            "class_names": data.class_names,
            "ignore_index": data.ignore_index,
            "augment": {"hflip": s.hflip, "vflip": s.vflip, "rot90": 0, "rotate_degrees": 0,
                        "brightness": 0, "contrast": 0},
        },
        "model": s.model(len(data.class_names)),
        "loss": {"terms": [{"name": "ce"}]},
        "optim": {"optimizer": "adamw", "lr": s.lr, "weight_decay": s.weight_decay, "schedule": "poly",
                  "poly_power": s.poly_power, "warmup_steps": 0},
        "train": {"epochs": s.epochs, "batch_size": s.batch_size, "num_workers": s.workers,
                  "cpus_per_worker": 0.5, "seed": seed, "patience": None, "storage_path": str(storage),
                  "name": f"parity-{data.name}-seed{seed}"},
    }
    job = build_config(TrainJobConfig, tree)
    t0 = time.perf_counter()
    result = run_training(job, curves_path=str(storage / f"curves-{data.name}-seed{seed}.png"))
    wall = time.perf_counter() - t0
    history = [{k: v for k, v in row.items() if isinstance(v, (int, float))} for row in result.history]
    return {"history": history, "wall_s": wall, "best_val_miou": result.best_metrics.get("val_miou")}


# --------------------------------------------------------------------------- report


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _step_s(history: list[dict]) -> tuple[float | None, float | None]:
    """(epoch 1's step time, the mean over epochs 2+: steady state; epoch 1's with one epoch);
    None when the history does not carry ``train_step_s``. Epoch 1 carries one-time costs (Ray
    Train workers' first batches, the first shuffle; the plain loop's warm-up): shown, not judged."""
    vals = [row.get("train_step_s") for row in history]
    if not vals or vals[0] is None:
        return None, None
    later = [v for v in vals[1:] if v is not None]
    return float(vals[0]), float(np.mean(later)) if later else float(vals[0])


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for way, rs in runs.items():
        final = [r["history"][-1].get("val_miou", math.nan) if r["history"] else math.nan for r in rs]
        best = [max((h.get("val_miou", math.nan) for h in r["history"]), default=math.nan) for r in rs]
        steps = [_step_s(r["history"]) for r in rs]
        m, sd = _mean_std(final)
        bm, bsd = _mean_std(best)
        first = [a for a, _ in steps if a is not None]
        steady = [b for _, b in steps if b is not None]
        out[way] = {"final": final, "best": best, "mean": m, "std": sd, "best_mean": bm, "best_std": bsd,
                    "step_s": float(np.mean(steady)) if steady else None,
                    "first_step_s": float(np.mean(first)) if first else None, "step_per_seed": steps,
                    "wall_s": float(np.mean([r["wall_s"] for r in rs]))}
    return out


def _f(x: float | None, fmt: str = "{:.4f}") -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else fmt.format(x)


def report(data: PairSet, seeds: list[int], s: Settings, summ: dict[str, dict]) -> dict:
    p, g = summ["plain"], summ["segray"]
    title = (f"{data.name}, val mIoU and step time: {data.note}; U-Net depth {s.depth} width {s.base_width}, "
             f"{s.epochs} epochs, global batch {s.global_batch} (segray {s.workers} workers x {s.batch_size}), "
             "poly LR, CE, flips")
    table = Table(title=title, title_justify="left")
    table.add_column("way", no_wrap=True)
    for seed in seeds:
        table.add_column(f"seed {seed}", justify="right", no_wrap=True)
    later = "epochs 2+" if s.epochs > 1 else "epoch 1"
    cols = ["mean±std", "best ep", "step ep1"] + (["step ep2+"] if s.epochs > 1 else [])
    for col in cols + ["wall s", "mIoU/plain", "step/plain"]:
        table.add_column(col, justify="right", no_wrap=True)
    ratio_miou = g["mean"] / p["mean"] if p["mean"] else math.nan
    ratio_step = g["step_s"] / p["step_s"] if g["step_s"] and p["step_s"] else None
    for way, label, r_m, r_s in (("plain", "plain", 1.0, 1.0),
                                 ("segray", "segray", ratio_miou, ratio_step)):
        w = summ[way]
        steps = [_f(w["first_step_s"], "{:.3f}")] + ([_f(w["step_s"], "{:.3f}")] if s.epochs > 1 else [])
        table.add_row(label, *[_f(v) for v in w["final"]], f"{_f(w['mean'])}±{_f(w['std'])}",
                      _f(w["best_mean"]), *steps,
                      _f(w["wall_s"], "{:.1f}"), _f(r_m, "{:.2f}x"), _f(r_s, "{:.2f}x"))
    console.print(table)
    console.print("  seed columns: the final epoch's val mIoU; mean±std over seeds; best ep: mean over seeds of each "
                  "run's best epoch. step ep1/ep2+: seconds per optimizer step (training wall time of an epoch / its "
                  "steps, data waiting included; segray: rank 0's train_step_s), mean over seeds; step/plain and the "
                  f"verdict use {later}. wall s: one whole run (segray: with Ray Train start, dataset decode, "
                  "checkpoints).")
    spread = math.sqrt((p["std"] ** 2 + g["std"] ** 2) / 2) if np.isfinite(p["std"]) and np.isfinite(g["std"]) else math.nan
    floor = p["mean"] - SPREADS * spread
    parity = bool(np.isfinite(g["mean"]) and np.isfinite(floor) and g["mean"] >= floor)
    how = (f"spread = pooled std over {len(seeds)} seeds = {spread:.4f}" if len(seeds) > 1
           else "1 seed: no spread measured, the means are compared outright")
    console.print(f"[bold]{data.name}: mIoU parity (segray >= plain - 2*spread): {'MET' if parity else 'NOT MET'}[/] - "
                  f"segray {_f(g['mean'])} vs plain {_f(p['mean'])} - {SPREADS:g} x {_f(spread)} = {_f(floor)}; "
                  f"{how} (plain ± {_f(p['std'])}, segray ± {_f(g['std'])})")
    if ratio_step is None:
        missing = "segray's history has no train_step_s" if g["step_s"] is None else "no plain step time"
        console.print(f"[bold]{data.name}: step time <= {STEP_TARGET:g}x: NOT MEASURED[/] - {missing}")
        step_ok = None
    else:
        step_ok = ratio_step <= STEP_TARGET
        console.print(f"[bold]{data.name}: step time <= {STEP_TARGET:g}x: {'MET' if step_ok else 'NOT MET'}[/] - "
                      f"segray {g['step_s']:.3f} s/step vs plain {p['step_s']:.3f} s/step = {ratio_step:.2f}x "
                      f"({later})")
    return {"ratio_miou": ratio_miou, "ratio_step": ratio_step, "spread": spread, "parity": parity,
            "step_met": step_ok}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", choices=["demo", "real"], default=["demo", "real"])
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (--quick: 0)")
    ap.add_argument("--real-seeds", nargs="+", type=int, default=None, help="seeds on real data; default --seeds")
    ap.add_argument("--epochs", type=int, default=None, help="default 10 (--quick: 1)")
    ap.add_argument("--batch-size", type=int, default=None, help="per segray worker; default 4 (--quick: 2)")
    ap.add_argument("--workers", type=int, default=2, help="segray Ray Train workers (plain batch = workers x batch)")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--base-width", type=int, default=16)
    ap.add_argument("--num-images", type=int, default=None, help="demo training images; default 64 (--quick: 16)")
    ap.add_argument("--val-images", type=int, default=None, help="demo validation images; default 16 (--quick: 8)")
    ap.add_argument("--size", type=int, default=None, help="demo image side, px; default 128 (--quick: 64)")
    ap.add_argument("--chip", type=int, default=None, help="real: chip side cut from the 1024 tiles; default 128 "
                    "(--quick: 256)")
    ap.add_argument("--val-every", type=int, default=4, help="real: every n-th chip of each tile is validation")
    ap.add_argument("--shared-data", default=None,
                    help="the shared data folder; default $SEGRAY_SHARED_DATA, else ../shared/data beside the repo")
    ap.add_argument("--threads", type=int, default=2, help="the plain loop's torch threads")
    ap.add_argument("--ray-cpus", type=int, default=2, help="ray.init(num_cpus=...)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1 epoch, 1 seed")
    ap.add_argument("--workdir", default=None, help="where datasets and runs go (default: a temp dir, removed)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    q = args.quick
    pick = lambda v, full, quick: v if v is not None else (quick if q else full)  # noqa: E731
    seeds = pick(args.seeds, [0, 1, 2], [0])
    real_seeds = args.real_seeds or seeds
    s = Settings(epochs=pick(args.epochs, 10, 1), batch_size=pick(args.batch_size, 4, 2), workers=args.workers,
                 depth=args.depth, base_width=args.base_width, threads=args.threads)

    malloc = keep_freed_memory()  # what segray's Train workers get through their runtime_env
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="segray-train-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    sets: list[tuple[PairSet, list[int]]] = []
    if "demo" in args.datasets:
        sets.append((write_demo(work / "demo", pick(args.num_images, 64, 16), pick(args.val_images, 16, 8),
                                pick(args.size, 128, 64)), seeds))
    if "real" in args.datasets:
        shared = shared_data_dir(args.shared_data)
        real = write_loveda(shared, work / "real", pick(args.chip, 128, 256), args.val_every)
        if real is None:
            console.print(f"real: no LoveDA tiles under {shared}/loveda_potsdam_vaihingen_mmseg/loveda: skipped")
        else:
            sets.append((real, real_seeds))

    import logging

    import ray
    import ray.data

    for h in logging.getLogger("ray.data").handlers:  # its per-dataset INFO lines: to its log file only
        if getattr(h, "stream", None) in (sys.stdout, sys.stderr):
            h.setLevel(logging.WARNING)
    use_node_env(args.ray_cpus)  # the idle-worker limit segray gives the local Ray it starts
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    machine = f"{platform.node()}: {psutil.cpu_count()} CPU, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    console.print(f"segray training parity - {when} - {machine}; keep freed memory: {malloc}; plain loop "
                  f"{s.threads} torch threads; Ray {args.ray_cpus} CPUs, {s.workers} workers x 0.5 CPU; work dir {work}")
    t_all = time.perf_counter()
    results = {}
    try:
        for data, ds_seeds in sets:
            runs: dict[str, list[dict]] = {"plain": [], "segray": []}
            for seed in ds_seeds:  # alternate the ways, so both see the machine's load of the moment
                console.print(f"{data.name}, seed {seed}: plain loop ...")
                runs["plain"].append(plain_train(data, s, seed))
                console.print(f"  val mIoU {runs['plain'][-1]['history'][-1]['val_miou']:.4f}, "
                              f"{runs['plain'][-1]['wall_s']:.1f} s")
                console.print(f"{data.name}, seed {seed}: segray train ...")
                runs["segray"].append(segray_train(data, s, seed, work / "runs"))
                console.print(f"  val mIoU {runs['segray'][-1]['history'][-1].get('val_miou', math.nan):.4f}, "
                              f"{runs['segray'][-1]['wall_s']:.1f} s")
            summ = summarise(runs)
            results[data.name] = {"note": data.note, "seeds": ds_seeds, "summary": summ, "runs": runs,
                                  **report(data, ds_seeds, s, summ)}
    finally:
        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    console.print(f"total {time.perf_counter() - t_all:.0f} s")
    for name, r in results.items():
        console.print(f"train parity segray/plain mIoU: {_f(r['ratio_miou'], '{:.2f}')}  "
                      f"step: {_f(r['ratio_step'], '{:.2f}')}  ({name})")
    if args.json:
        Path(args.json).write_text(json.dumps({"when": when, "machine": machine, "args": vars(args),
                                               "settings": s.__dict__, "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
