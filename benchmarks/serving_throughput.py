"""Serving runtimes side by side, in one run on this machine:

* model-only   raw pixels -> logits -> class map on preloaded batches, one process, for
               eager PyTorch fp32, ONNX Runtime (CPUExecutionProvider, the `segray export` graph)
               and eager PyTorch under bf16 autocast (CPU); plus eager fp32 with TTA
               (hflip, vflip, rot90: 4 forward passes) to show its cost
* pipeline     the real `segray infer` pipeline (``run_inference``: list -> read+decode -> predictor
               actors -> PNG encode -> Parquet) with ``predictor: eager`` and ``predictor: onnxruntime``
               (``onnx_model`` exported once beforehand, so actor start-up is comparable)

for the house U-Net (the demo's depth and width) and one segmentation_models_pytorch model
(smp Unet on a random-init resnet18 encoder). The pipeline has no bf16 setting on CPU (AMP is
CUDA-only there), so bf16 is model-only.

    python benchmarks/serving_throughput.py                 # 64 images of 256x256 (~4 min on 2 cores)
    python benchmarks/serving_throughput.py --num-images 200 --models unet

Nothing here asserts: it prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from infer_throughput import console, prepare_images, save_random_checkpoint  # noqa: E402

from segray.config import DemoJobConfig, InferJobConfig, ModelConfig, SourceConfig  # noqa: E402
from segray.core.export import export_checkpoint  # noqa: E402
from segray.core.tta import tta_logits  # noqa: E402
from segray.demo.scenes import DEMO_CLASSES  # noqa: E402
from segray.infer.runtimes import EagerRuntime, OrtRuntime  # noqa: E402
from segray.infer.steps import open_checkpoint  # noqa: E402
from segray.io.images import decode_image  # noqa: E402
from segray.io.sources import list_samples  # noqa: E402
from segray.runtime import keep_freed_memory, use_node_env  # noqa: E402

TTA = ["hflip", "vflip", "rot90"]


def model_configs(names: list[str]) -> dict[str, ModelConfig]:
    from segray.core.models import MODELS

    demo = DemoJobConfig().model
    cfgs = {"unet": demo}
    if "smp" in MODELS:
        cfgs["smp-unet-resnet18"] = ModelConfig(name="smp", arch="Unet", encoder="resnet18",
                                                num_classes=demo.num_classes, in_channels=3)
    return {k: v for k, v in cfgs.items() if k.split("-")[0] in names}


def runtimes(ckpt_path: Path, onnx_path: Path) -> dict:
    """The runtimes to compare, built as the predictor actors build them (segray.infer.runtimes)."""
    from segray.core.models import build_model

    ckpt = open_checkpoint(str(ckpt_path))
    model = build_model(ckpt.model())
    model.load_state_dict(ckpt.model_state)
    mean, std = ckpt.normalization()
    cpu = torch.device("cpu")
    eager = EagerRuntime(model.eval(), mean, std, cpu, amp=False)
    return {"eager fp32": eager,
            "onnxruntime": OrtRuntime(onnx_path.read_bytes(), ckpt.id, torch.get_num_threads()),
            "eager fp32 + TTA x3": lambda x: tta_logits(eager, x, TTA),
            # last: on this CPU a bf16 run slows the fp32 runs measured after it in the same process
            "eager bf16 autocast": EagerRuntime(model, mean, std, cpu, amp=True)}


@torch.inference_mode()
def model_only(run, batches: list[torch.Tensor], rounds: int = 2, warm_up: bool = True) -> float:
    """images/s of logits -> argmax over the preloaded batches (one warm-up batch first; best round)."""
    if warm_up:
        run(batches[0]).argmax(1)
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        n = sum(run(b).argmax(1).shape[0] for b in batches)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def pipeline(ckpt: Path, images: Path, n: int, out: Path, args, **fields) -> float:
    from segray.infer.pipeline import run_inference

    cfg = InferJobConfig(source=SourceConfig(images=str(images), limit=n), checkpoint=str(ckpt), output=str(out),
                         overwrite=True, batch_size=args.batch_size, num_actors=args.num_actors,
                         cpus_per_actor=args.cpus_per_actor, **fields)
    t0 = time.perf_counter()
    summary = run_inference(cfg)
    assert summary["num_ok"] == n, summary
    return n / (time.perf_counter() - t0)


def measure(name: str, cfg: ModelConfig, images: Path, args) -> dict:
    workdir = Path(args.workdir)
    ckpt = save_random_checkpoint(workdir / f"serving-{name}.pt", cfg, DEMO_CLASSES, images)
    t0 = time.perf_counter()
    onnx_path = workdir / f"serving-{name}.onnx"
    onnx_path.write_bytes(export_checkpoint(open_checkpoint(str(ckpt)), "onnx"))
    export_s = time.perf_counter() - t0
    files = [s.image for s in list_samples(SourceConfig(images=str(images), limit=args.model_only_images))]
    pix = np.stack([decode_image(Path(f).read_bytes(), f) for f in files])
    batches = [torch.from_numpy(pix[i:i + args.batch_size]) for i in range(0, len(pix), args.batch_size)]
    res = {"export_s": export_s, "model_only": {}, "pipeline": {}}
    for label, run in runtimes(ckpt, onnx_path).items():
        # bf16 autocast on this CPU can be orders of magnitude slower (U-Net: ~50 s for 2 images):
        # one small batch, once, keeps the run bounded
        slow = "bf16" in label
        res["model_only"][label] = model_only(run, [batches[0][:2]] if slow else batches, rounds=1 if slow else 2,
                                              warm_up=not slow)
        console.print(f"  {name} model-only {label}: {res['model_only'][label]:.2f} img/s")
    for label, fields in (("eager fp32", {}),
                          ("onnxruntime", {"predictor": "onnxruntime", "onnx_model": str(onnx_path)})):
        res["pipeline"][label] = pipeline(ckpt, images, args.num_images, workdir / f"out-serving-{name}", args,
                                          **fields)
        console.print(f"  {name} pipeline {label}: {res['pipeline'][label]:.2f} img/s")
    return res


def report(results: dict, args, malloc: bool) -> None:
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    machine = f"{platform.node()}: {psutil.cpu_count()} CPU, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    table = Table(title=f"segray serving runtimes - {when} - {machine}", title_justify="left")
    for col in ("model", "runtime", "model-only img/s", "vs eager fp32", "pipeline img/s", "vs eager fp32"):
        table.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    for name, r in results.items():
        mo, pl = r["model_only"], r["pipeline"]
        for label, rate in mo.items():
            p = pl.get(label)
            table.add_row(name, label, f"{rate:.2f}", f"{rate / mo['eager fp32']:.2f}x",
                          f"{p:.2f}" if p else "-", f"{p / pl['eager fp32']:.2f}x" if p else "-")
    console.print(table)
    for name, r in results.items():
        mo = r["model_only"]
        console.print(f"  {name}: ONNX export {r['export_s']:.1f} s (each actor pays it at start without "
                      f"onnx_model:); TTA x3 costs {mo['eager fp32'] / mo['eager fp32 + TTA x3']:.2f}x "
                      f"(4 forward passes); onnxruntime/eager {mo['onnxruntime'] / mo['eager fp32']:.2f}x model-only, "
                      f"{r['pipeline']['onnxruntime'] / r['pipeline']['eager fp32']:.2f}x pipeline; "
                      f"bf16/fp32 {mo['eager bf16 autocast'] / mo['eager fp32']:.2f}x")
    console.print(f"  {args.num_images} images {args.size}x{args.size}, batch {args.batch_size}; model-only: "
                  f"{args.model_only_images} preloaded images, {torch.get_num_threads()} threads, best of 2 rounds; "
                  f"pipeline: {args.num_actors} actors of {args.cpus_per_actor} CPU; allocator: "
                  f"keep freed memory {malloc}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=64, help="pipeline images")
    ap.add_argument("--model-only-images", type=int, default=32)
    ap.add_argument("--size", type=int, default=256, help="square image side, px")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-actors", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=float, default=0.5,
                    help="2 actors of 0.5 leave a core for the read and encode tasks on 2 cores")
    ap.add_argument("--models", nargs="+", default=["unet", "smp"], help="unet and/or smp")
    ap.add_argument("--ray-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--workdir", default="/tmp/segray-bench")
    args = ap.parse_args(argv)
    # The allocator setting of segray's predictor actors (segray.runtime), so model-only is like for like.
    malloc = keep_freed_memory()

    import ray

    images = prepare_images(Path(args.workdir), max(args.num_images, args.model_only_images), args.size)
    cfgs = model_configs(args.models)
    if "smp" in args.models and not any(k.startswith("smp") for k in cfgs):
        console.print("smp is not registered in segray.core.models: only U-Net is measured")
    use_node_env(args.ray_cpus)  # the idle-worker limit segray gives the local Ray it starts
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    results = {}
    for name, cfg in cfgs.items():
        console.print(f"{name} ...")
        results[name] = measure(name, cfg, images, args)
    ray.shutdown()
    report(results, args, malloc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
