"""Inference throughput, side by side on the same images, in one run:

* model-only     the forward pass (+ softmax/argmax) on preloaded, normalised tensors: an upper bound
* pipeline       segray's Ray Data job (``run_inference``: list -> read+decode -> predictor actors ->
                 PNG encode -> Parquet), timed end to end, at N/10 and at N images
* plain loop     one process doing the same work without Ray: read bytes, decode, normalise,
                 batched forward, softmax/argmax, PNG-encode, write Parquet in row groups

It also samples (psutil, in a thread) the peak RSS of the driver and the peak summed RSS of the
Ray worker processes during each pipeline run, to show that memory stays flat when N grows 10x,
and the CPU seconds each kind of process used (where the cores go).

    python benchmarks/infer_throughput.py                      # CPU, N=2000 images of 256x256
    python benchmarks/infer_throughput.py --num-images 400     # quicker
    python benchmarks/infer_throughput.py --device cuda --batch-size 64   # GPU (AMP), one actor per GPU

Nothing here asserts: it prints a table and one verdict line per target.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from segray.config import DemoJobConfig, InferJobConfig, ModelConfig, SourceConfig
from segray.core import masks
from segray.core.checkpoint import make_payload, save_payload
from segray.core.metrics import metric_num_classes
from segray.core.models import build_model
from segray.demo.scenes import DEMO_CLASSES, make_scene
from segray.infer.steps import OUTPUT_SCHEMA, open_checkpoint
from segray.io.sources import list_samples
from segray.io.images import decode_image
from segray.runtime import keep_freed_memory, use_node_env

# Piped output (a log, the README) gets a fixed width instead of rich's 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=132)

PIPELINE_TARGET_CPU = 1.0  # pipeline / plain loop, CPU
PIPELINE_TARGET_GPU = 0.95  # pipeline / model-only, GPU
FLAT_MEMORY = 1.25  # peak(N) / peak(N/10) at most this is "flat"


# --------------------------------------------------------------------------- data and checkpoint


def _write_scene(args: tuple[str, int, int, int]) -> None:
    path, i, size, seed = args
    img, _ = make_scene(size, np.random.default_rng([seed, i]))  # scene i = write_demo_dataset's scene i
    tmp = path + ".tmp"
    Image.fromarray(img).save(tmp, format="PNG")
    os.replace(tmp, path)


def prepare_images(workdir: Path, n: int, size: int, seed: int = 0) -> Path:
    """``workdir/images-<size>/scene_NNNNN.png``; only missing scenes are drawn (cached across runs)."""
    folder = workdir / f"images-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(str(folder / f"scene_{i:05d}.png"), i, size, seed) for i in range(n)
            if not (folder / f"scene_{i:05d}.png").exists()]
    if todo:
        console.print(f"drawing {len(todo)} scenes of {size}x{size} into {folder} (once; cached)")
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_write_scene, todo, chunksize=16))
    return folder


def save_random_checkpoint(path: Path, model_cfg: ModelConfig, class_names: list[str], images: Path,
                           sample: int = 32, task: str = "semantic") -> Path:
    """A random-init model (seed 0) as a segray checkpoint, band stats from the first ``sample`` images."""
    torch.manual_seed(0)
    model = build_model(model_cfg).eval()
    pix = np.stack([decode_image(p.read_bytes(), str(p)) for p in sorted(images.glob("*.png"))[:sample]])
    stats = {"mean": pix.mean(axis=(0, 2, 3)).tolist(), "std": pix.std(axis=(0, 2, 3)).tolist()}
    save_payload(make_payload(model, model_cfg.model_dump(mode="json"), class_names, stats, task=task), str(path))
    return path


def make_checkpoint(workdir: Path, model_cfg: ModelConfig, images: Path) -> Path:
    path = workdir / f"checkpoint-d{model_cfg.depth}-w{model_cfg.base_width}.pt"
    return save_random_checkpoint(path, model_cfg, DEMO_CLASSES, images)


# --------------------------------------------------------------------------- process sampling


def _role(cmd: str) -> str | None:
    """What a process of this Ray instance is, from its title; None for Ray's own services."""
    if "ray::" not in cmd:
        return "starting workers" if "default_worker" in cmd else None
    title = cmd.split("ray::", 1)[1].split(" ")[0]
    if "Agent" in title:
        return None  # ray::DashboardAgent, ray::RuntimeEnvAgent
    for key, role in (("Predictor", "predictor actors"), ("read_decode", "read+decode tasks"),
                      ("encode", "encode+write tasks"), ("Write", "encode+write tasks"), ("IDLE", "idle workers")):
        if key in title:
            return role
    return "other ray workers"  # Ray Data's stats/autoscaling actors, ...


class ProcSampler(threading.Thread):
    """Every ``interval`` s: the driver's RSS; the summed RSS (and anonymous RSS: RSS without shared
    libraries and object-store pages, which RSS counts again in every process) of this Ray
    instance's worker processes (the driver's descendants titled 'ray::', not Ray's agents); and
    the CPU seconds of each kind of process, Ray's services and the rest of the machine."""

    SYSTEM = "ray services (raylet, gcs, agents, ...)"
    OTHERS = "everything else on the machine"
    SAMPLER = "this sampler (in the driver process)"

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval = interval
        self.driver = psutil.Process()
        self.stop_evt = threading.Event()
        self.peak_driver = 0
        self.peak_workers = 0
        self.peak_workers_anon = 0
        self.peak_num_workers = 0
        self.cpu: dict[str, float] = {}
        self._last: dict[int, float] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._tree: list[psutil.Process] = []
        self._n = -1

    def _account(self, p: psutil.Process, role: str) -> None:
        try:
            t = p.cpu_times()
        except psutil.Error:
            return
        now = t.user + t.system
        last = self._last.get(p.pid)
        self._last[p.pid] = now
        if last is not None:  # only what was used while we watched
            self.cpu[role] = self.cpu.get(role, 0.0) + max(now - last, 0.0)

    def sample(self) -> None:
        self.peak_driver = max(self.peak_driver, self.driver.memory_info().rss)
        self._account(self.driver, "driver")
        rss = anon = count = 0
        self._n += 1
        if self._n % 8 == 0:  # walking the process tree reads every /proc entry: only every 8th sample
            self._tree = [self._procs.setdefault(p.pid, p) for p in self.driver.children(recursive=True)]
        for p in self._tree:  # ray.init(address="local") started all of them
            try:
                role = _role(" ".join(p.cmdline()))
                if role is not None:
                    m = p.memory_info()
                    rss, anon, count = rss + m.rss, anon + m.rss - m.shared, count + 1
            except psutil.Error:
                continue
            self._account(p, role or self.SYSTEM)
        if rss > self.peak_workers:
            self.peak_workers, self.peak_num_workers = rss, count
        self.peak_workers_anon = max(self.peak_workers_anon, anon)

    def run(self) -> None:
        t0 = time.thread_time()
        while not self.stop_evt.wait(self.interval):
            try:
                self.sample()
            except psutil.Error:
                pass
        self.own_cpu = time.thread_time() - t0  # the sampling itself runs in the driver process

    def __enter__(self) -> "ProcSampler":
        self.t0 = time.perf_counter()
        self.machine0 = psutil.cpu_times()
        self.sample()
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_evt.set()
        self.join()
        self.sample()
        self.wall = time.perf_counter() - self.t0
        if "driver" in self.cpu:
            self.cpu["driver"] = max(self.cpu["driver"] - self.own_cpu, 0.0)
        self.cpu[self.SAMPLER] = self.own_cpu
        m0, m1 = self.machine0, psutil.cpu_times()
        busy = lambda t: sum(t) - t.idle - getattr(t, "iowait", 0.0)  # noqa: E731
        ours = sum(self.cpu.values())
        self.cpu[self.OTHERS] = max(busy(m1) - busy(m0) - ours, 0.0)


# --------------------------------------------------------------------------- the three measurements


def _autocast(device: torch.device):
    return torch.autocast(device.type, enabled=device.type == "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_model(ckpt: Path, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, dict]:
    checkpoint = open_checkpoint(str(ckpt))
    model = build_model(checkpoint.model())
    model.load_state_dict(checkpoint.model_state)
    model = model.to(device).eval()
    mean, std = checkpoint.normalization()
    return model, mean, std, checkpoint.to_payload()


@torch.inference_mode()
def model_only(ckpt: Path, files: list[str], batch: int, device: torch.device, interval: float) -> dict:
    """Forward + softmax/argmax over preloaded normalised batches (already on the device)."""
    model, mean, std, _ = load_model(ckpt, device)
    pix = [decode_image(Path(f).read_bytes(), f) for f in files]
    batches = [((torch.from_numpy(np.stack(pix[i:i + batch])) - mean) / std).to(device)
               for i in range(0, len(pix), batch)]
    with _autocast(device):
        model(batches[0])  # warm-up (cuDNN autotune, allocator, thread pool)
    _sync(device)
    with ProcSampler(interval) as sampler:
        t0 = time.perf_counter()
        for x in batches:
            with _autocast(device):
                logits = model(x).float()
            conf, pred = torch.softmax(logits, dim=1).max(dim=1)
        _sync(device)
        wall = time.perf_counter() - t0
    return {"images": len(pix), "wall_s": wall, "rate": len(pix) / wall, "torch_threads": torch.get_num_threads(),
            "cpu": dict(sampler.cpu), "sampled_s": sampler.wall}


@torch.inference_mode()
def plain_loop(ckpt: Path, images: Path, n: int, out: Path, batch: int, device: torch.device,
               row_group: int = 256) -> dict:
    """Single-process PyTorch doing what the pipeline does, one stage after the other."""
    t_start = time.perf_counter()
    stage = dict.fromkeys(("read", "decode", "forward", "encode", "write"), 0.0)
    samples = list_samples(SourceConfig(images=str(images), limit=n))
    model, mean, std, payload = load_model(ckpt, device)
    k = metric_num_classes(len(payload["class_names"]))
    name = payload["model_config"]["name"]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    writer = pq.ParquetWriter(out / "predictions.parquet", OUTPUT_SCHEMA)
    pending: list[pa.Table] = []
    pending_rows = 0
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        t = time.perf_counter()
        data = []
        for s in chunk:
            with open(s.image, "rb") as f:
                data.append(f.read())
        t1 = time.perf_counter()
        pix = [decode_image(d, s.image) for d, s in zip(data, chunk)]
        t2 = time.perf_counter()
        x = ((torch.from_numpy(np.stack(pix)) - mean) / std).to(device, non_blocking=True)
        with _autocast(device):
            logits = model(x).float()
        conf, pred = torch.softmax(logits, dim=1).max(dim=1)
        pred, conf = pred.cpu().numpy(), conf.mean(dim=(1, 2)).cpu().numpy()
        t3 = time.perf_counter()
        rows = {f.name: [None] * len(chunk) for f in OUTPUT_SCHEMA}
        rows.update(
            image_id=[s.image_id for s in chunk], source_path=[s.image for s in chunk], status=["ok"] * len(chunk),
            height=[p.shape[1] for p in pix], width=[p.shape[2] for p in pix], bands=[p.shape[0] for p in pix],
            model_name=[name] * len(chunk), mask_png=[masks.encode_png(p) for p in pred],
            class_fractions=[masks.class_fractions(p, k).tolist() for p in pred],
            mean_confidence=[float(c) for c in conf], has_ground_truth=[False] * len(chunk),
        )
        pending.append(pa.Table.from_pydict(rows, schema=OUTPUT_SCHEMA))
        pending_rows += len(chunk)
        t4 = time.perf_counter()
        if pending_rows >= row_group or start + batch >= len(samples):
            writer.write_table(pa.concat_tables(pending), row_group_size=row_group)
            pending, pending_rows = [], 0
        t5 = time.perf_counter()
        for key, dt_ in zip(stage, (t1 - t, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            stage[key] += dt_
    writer.close()
    wall = time.perf_counter() - t_start
    return {"images": len(samples), "wall_s": wall, "rate": len(samples) / wall,
            "stage_ms": {k: v * 1000 / len(samples) for k, v in stage.items()},
            "torch_threads": torch.get_num_threads()}


def pipeline(cfg_kwargs: dict, images: Path, n: int, out: Path, interval: float) -> dict:
    from segray.infer.pipeline import run_inference

    cfg = InferJobConfig(source=SourceConfig(images=str(images), limit=n), output=str(out), overwrite=True,
                         **cfg_kwargs)
    with ProcSampler(interval) as sampler:
        t0 = time.perf_counter()
        summary = run_inference(cfg)
        wall = time.perf_counter() - t0
    assert summary["num_ok"] == n, summary
    return {"images": n, "wall_s": wall, "rate": n / wall, "job_wall_s": summary["wall_s"],
            "decode_ms": summary["mean_decode_ms"], "predict_ms": summary["mean_predict_ms"],
            "peak_driver": sampler.peak_driver, "peak_workers": sampler.peak_workers,
            "peak_workers_anon": sampler.peak_workers_anon, "peak_num_workers": sampler.peak_num_workers,
            "cpu": dict(sampler.cpu), "sampled_s": sampler.wall}


# --------------------------------------------------------------------------- report


def _mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def _runs(runs: list[dict]) -> str:
    return "; runs " + ", ".join(f"{r['rate']:.2f}" for r in runs) + " img/s" if len(runs) > 1 else ""


def _cpu_table(title: str, cpu: dict, wall: float, cores: int) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("process")
    t.add_column("CPU s", justify="right")
    t.add_column("cores (avg)", justify="right")
    for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]):
        t.add_row(k, f"{v:,.1f}", f"{v / wall:.2f}")
    t.add_row("[bold]available", f"{cores * wall:,.1f}", f"{cores}")
    return t


def main(argv: list[str] | None = None) -> int:
    demo = DemoJobConfig().model
    defaults = InferJobConfig.model_fields
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=2000, help="N (the pipeline also runs at N/10)")
    ap.add_argument("--size", type=int, default=256, help="square image side, px")
    ap.add_argument("--depth", type=int, default=demo.depth)
    ap.add_argument("--base-width", type=int, default=demo.base_width)
    ap.add_argument("--batch-size", type=int, default=defaults["batch_size"].default)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="model-only and plain loop device; with cuda the pipeline gets num_gpus_per_actor")
    ap.add_argument("--num-actors", type=int, default=None,
                    help=f"default: {defaults['num_actors'].default} on CPU, one per GPU with --device cuda")
    ap.add_argument("--cpus-per-actor", type=float, default=defaults["cpus_per_actor"].default)
    ap.add_argument("--cpus-per-task", type=float, default=defaults["cpus_per_task"].default)
    ap.add_argument("--num-gpus-per-actor", type=float, default=None, help="default: 1 with --device cuda, else 0")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="any other InferJobConfig field for the pipeline (YAML value), repeatable")
    ap.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="ray.init(num_cpus=...)")
    ap.add_argument("--model-only-images", type=int, default=320, help="images for the model-only rate")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of pipeline(N), model-only, plain loop, back to back; the best of each is kept")
    ap.add_argument("--workdir", default="/tmp/segray-bench", help="cached images, checkpoint, outputs")
    ap.add_argument("--default-malloc", action="store_true",
                    help="model-only and plain loop with glibc's default large-block unmapping (the pipeline's "
                         "predictor actors always start with segray.runtime.MODEL_PROCESS_ENV)")
    ap.add_argument("--sample-interval", type=float, default=0.25, help="psutil sampling period, s")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import ray
    import yaml

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU")
    gpus = args.num_gpus_per_actor if args.num_gpus_per_actor is not None else (1.0 if device.type == "cuda" else 0.0)
    if args.num_actors is None:
        args.num_actors = max(int(torch.cuda.device_count() / gpus), 1) if gpus else defaults["num_actors"].default
    n, n_small = args.num_images, max(args.num_images // 10, 1)
    workdir = Path(args.workdir)
    # The same allocator setting as segray's predictor actors, so the comparison is like for like.
    malloc = "glibc default" if args.default_malloc else f"keep freed memory: {keep_freed_memory()}"
    images = prepare_images(workdir, n, args.size)
    model_cfg = demo.model_copy(update={"depth": args.depth, "base_width": args.base_width})
    ckpt = make_checkpoint(workdir, model_cfg, images)
    cfg_kwargs = {"checkpoint": str(ckpt), "batch_size": args.batch_size, "num_actors": args.num_actors,
                  "cpus_per_actor": args.cpus_per_actor, "cpus_per_task": args.cpus_per_task,
                  "num_gpus_per_actor": gpus}
    for item in args.set:
        key, raw = item.split("=", 1)
        cfg_kwargs[key] = yaml.safe_load(raw)
    InferJobConfig(source=SourceConfig(images=str(images)), output="x", **cfg_kwargs)  # fail fast on a bad --set

    use_node_env(args.ray_cpus)  # the idle-worker limit segray gives the local Ray it starts
    ray.init(address="local", num_cpus=args.ray_cpus, num_gpus=torch.cuda.device_count() if gpus else 0,
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    console.print(f"N={n} images {args.size}x{args.size}, U-Net depth {args.depth} width {args.base_width}, "
                  f"batch {args.batch_size}, device {device}, model-only/plain loop allocator: {malloc}; pipeline: {json.dumps({k: v for k, v in cfg_kwargs.items() if k != 'checkpoint'})}")

    files = [s.image for s in list_samples(SourceConfig(images=str(images), limit=min(args.model_only_images, n)))]

    console.print(f"pipeline at N/10 = {n_small} ...")
    small = pipeline(cfg_kwargs, images, n_small, workdir / "out-pipeline-small", args.sample_interval)
    console.print(f"  {small['rate']:.2f} img/s")
    mo_runs, big_runs, plain_runs = [], [], []
    for r in range(args.repeat):
        # Pipeline first: the driver's peak RSS at N is then compared with N/10 on equal terms
        # (model-only preloads images in this process; freed memory stays in its RSS).
        console.print(f"pipeline at N = {n} (round {r + 1}/{args.repeat}) ...")
        big_runs.append(pipeline(cfg_kwargs, images, n, workdir / "out-pipeline", args.sample_interval))
        console.print(f"  {big_runs[-1]['rate']:.2f} img/s")
        console.print(f"model-only on {len(files)} preloaded images (round {r + 1}/{args.repeat}) ...")
        mo_runs.append(model_only(ckpt, files, args.batch_size, device, args.sample_interval))
        console.print(f"  {mo_runs[-1]['rate']:.2f} img/s")
        console.print(f"plain loop at N = {n} (round {r + 1}/{args.repeat}) ...")
        with ProcSampler(args.sample_interval) as s:
            plain_runs.append(plain_loop(ckpt, images, n, workdir / "out-plain", args.batch_size, device))
        plain_runs[-1].update(cpu=dict(s.cpu), sampled_s=s.wall)
        console.print(f"  {plain_runs[-1]['rate']:.2f} img/s")
    ray.shutdown()

    big = max(big_runs, key=lambda r: r["rate"])
    plain = max(plain_runs, key=lambda r: r["rate"])
    mo = max(mo_runs, key=lambda r: r["rate"])
    mem_first = big_runs[0]  # memory: the first N run, right after the N/10 one

    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    machine = f"{platform.node()}: {psutil.cpu_count()} CPU, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(device)}"
    table = Table(title=f"segray inference throughput - {when} - {machine}", title_justify="left")
    for col in ("measurement", "images", "wall s", "images/s", "vs plain loop", "vs model-only",
                "CPU ms/image", "others' load"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    for label, r in (("model-only", mo), ("plain loop", plain), ("pipeline N/10", small), ("pipeline N", big)):
        cpu = r.get("cpu", {})
        ours = sum(v for k, v in cpu.items() if k not in (ProcSampler.OTHERS, ProcSampler.SAMPLER)) * 1000 / r["images"]
        load = cpu.get(ProcSampler.OTHERS, 0.0) / r.get("sampled_s", 1.0)
        table.add_row(label, f"{r['images']}", f"{r['wall_s']:.1f}", f"{r['rate']:.2f}",
                      f"{r['rate'] / plain['rate']:.2f}x", f"{r['rate'] / mo['rate']:.2f}x",
                      f"{ours:.0f}" if cpu else "-", f"{load:.2f} cores" if cpu else "-")
    console.print(table)
    console.print(f"  model-only: forward + softmax/argmax, one process, {mo['torch_threads']} torch threads, "
                  f"batch {args.batch_size}" + _runs(mo_runs))
    console.print(f"  plain loop: {plain['torch_threads']} torch threads; ms/image "
                  + ", ".join(f"{k} {v:.1f}" for k, v in plain["stage_ms"].items()) + _runs(plain_runs))
    console.print(f"  pipeline N: end to end (listing, checkpoint, actors' start, summary); Ray Data part "
                  f"{big['job_wall_s']:.1f} s; ms/image inside the batch functions: read+decode "
                  f"{big['decode_ms']:.1f}, predict {big['predict_ms']:.1f}" + _runs(big_runs))

    mem = Table(title="peak memory of the pipeline", title_justify="left")
    for col in ("", f"N/10 = {n_small}", f"N = {n}", "ratio"):
        mem.add_column(col, justify="right" if col else "left")
    for label, key, fmt in (("driver RSS", "peak_driver", _mib), ("Ray workers, summed RSS", "peak_workers", _mib),
                            ("Ray workers, summed anonymous RSS", "peak_workers_anon", _mib),
                            ("Ray worker processes (at the RSS peak)", "peak_num_workers", str)):
        mem.add_row(label, fmt(small[key]), fmt(mem_first[key]), f"{mem_first[key] / max(small[key], 1):.2f}")
    console.print(mem)
    cores = psutil.cpu_count()
    console.print(_cpu_table(f"where the CPU went: pipeline N ({big['sampled_s']:.0f} s)", big["cpu"], big["sampled_s"], cores))
    console.print(_cpu_table(f"where the CPU went: plain loop ({plain['sampled_s']:.0f} s)", plain["cpu"], plain["sampled_s"], cores))

    ratio_plain, ratio_mo = big["rate"] / plain["rate"], big["rate"] / mo["rate"]
    if len(big_runs) > 1:  # rounds ran back to back: their ratios share the machine's load of the moment
        console.print("  pipeline / plain loop, round by round: "
                      + ", ".join(f"{b['rate'] / p['rate']:.2f}x" for b, p in zip(big_runs, plain_runs)))
    if device.type == "cpu":
        ok = ratio_plain >= PIPELINE_TARGET_CPU
        console.print(f"[bold]verdict CPU throughput: {'MET' if ok else 'NOT MET'}[/] - pipeline {big['rate']:.2f} img/s "
                      f"= {ratio_plain:.2f}x the plain loop ({plain['rate']:.2f} img/s); target >= {PIPELINE_TARGET_CPU:.2f}x "
                      f"(pipeline/model-only {ratio_mo:.2f}x)")
    else:
        ok = ratio_mo >= PIPELINE_TARGET_GPU
        console.print(f"[bold]verdict GPU throughput: {'MET' if ok else 'NOT MET'}[/] - pipeline {big['rate']:.2f} img/s "
                      f"= {ratio_mo:.2f}x model-only ({mo['rate']:.2f} img/s); target >= {PIPELINE_TARGET_GPU:.2f}x "
                      f"(pipeline/plain {ratio_plain:.2f}x)")
    rd = mem_first["peak_driver"] / small["peak_driver"]
    rw = mem_first["peak_workers"] / small["peak_workers"]
    flat = rd <= FLAT_MEMORY and rw <= FLAT_MEMORY
    console.print(f"[bold]verdict flat memory: {'MET' if flat else 'NOT MET'}[/] - peak RSS at N={n} vs N/10={n_small}: "
                  f"driver {_mib(mem_first['peak_driver'])} vs {_mib(small['peak_driver'])} ({rd:.2f}x), "
                  f"Ray workers {_mib(mem_first['peak_workers'])} vs {_mib(small['peak_workers'])} ({rw:.2f}x); "
                  f"flat = both <= {FLAT_MEMORY:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "when": when, "machine": machine, "args": vars(args), "pipeline_config": {k: v for k, v in cfg_kwargs.items() if k != "checkpoint"},
            "model_only": mo_runs, "plain": plain_runs, "pipeline_small": small, "pipeline": big_runs,
            "ratio_pipeline_plain": ratio_plain, "ratio_pipeline_model_only": ratio_mo,
            "memory_ratio_driver": rd, "memory_ratio_workers": rw}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
