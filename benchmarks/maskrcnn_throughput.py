"""Mask R-CNN inference throughput, side by side on the same images, in one run (the U-Net
benchmark's rules, benchmarks/infer_throughput.py):

* model-only   the forward pass (+ mask threshold) on preloaded, normalised tensors, after a
               warm-up: an upper bound
* pipeline     segray's Ray Data job (``run_inference`` with an instance checkpoint: list ->
               read+decode -> predictor actors -> RLE/Arrow encode -> Parquet), timed end to end

The checkpoint is a randomly initialised Mask R-CNN (nothing is downloaded) with a fixed score
threshold and detection cap, so every image carries the same number of instances through the
pipeline (RLE encoding and Parquet rows cost what they would with a trained model).

    python benchmarks/maskrcnn_throughput.py                          # CPU, 48 scenes of 256x256
    python benchmarks/maskrcnn_throughput.py --num-images 16 --size 192   # quicker
    python benchmarks/maskrcnn_throughput.py --device cuda --num-gpus-per-actor 1 --batch-size 8

Nothing here asserts: it prints a table and the pipeline / model-only ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from segray.config import InferJobConfig, ModelConfig, SourceConfig
from segray.demo.instance_scenes import INSTANCE_DEMO_CLASSES, make_instance_scene
from segray.infer.instance import InstancePredictor
from segray.io.sources import list_samples
from segray.io.images import decode_image
from segray.runtime import use_node_env

sys.path.insert(0, str(Path(__file__).parent))  # the U-Net benchmark's helpers
from infer_throughput import save_random_checkpoint  # noqa: E402

console = Console() if sys.stdout.isatty() else Console(width=120)


def prepare_images(workdir: Path, n: int, size: int, seed: int = 0) -> Path:
    """``workdir/instance-images-<size>/scene_NNNNN.png`` (cached across runs)."""
    folder = workdir / f"instance-images-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"scene_{i:05d}.png"
        if not path.exists():
            img, _, _ = make_instance_scene(size, np.random.default_rng([seed, i, 1]))
            Image.fromarray(img).save(path)
    return folder


def make_checkpoint(workdir: Path, cfg: ModelConfig, images: Path) -> Path:
    path = workdir / f"maskrcnn-{cfg.name}-{cfg.min_size}.pt"
    return save_random_checkpoint(path, cfg, INSTANCE_DEMO_CLASSES, images, sample=16, task="instance")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def model_only(ckpt: Path, files: list[str], batch: int, device: torch.device) -> dict:
    """Forward + mask threshold on preloaded, normalised images already on the device."""
    pred = InstancePredictor(str(ckpt), device=str(device), max_batch=batch)
    x = [pred.normalize(decode_image(Path(f).read_bytes(), f)).to(device) for f in files]
    batches = [x[i:i + batch] for i in range(0, len(x), batch)]
    with torch.autocast(device.type, enabled=device.type == "cuda"):
        pred.model(batches[0])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    detections = 0
    for b in batches:
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            outs = pred.model(b)
        for o in outs:
            masks = o["masks"][:, 0] > pred.mask_threshold
            detections += int(masks.shape[0])
    _sync(device)
    wall = time.perf_counter() - t0
    return {"images": len(x), "wall_s": wall, "rate": len(x) / wall, "detections": detections,
            "torch_threads": torch.get_num_threads()}


def pipeline(cfg_kwargs: dict, images: Path, n: int, out: Path) -> dict:
    from segray.infer.pipeline import run_inference

    cfg = InferJobConfig(source=SourceConfig(images=str(images), limit=n), output=str(out), overwrite=True, **cfg_kwargs)
    t0 = time.perf_counter()
    summary = run_inference(cfg)
    wall = time.perf_counter() - t0
    return {"images": n, "wall_s": wall, "rate": n / wall, "job_wall_s": summary["wall_s"],
            "ok": summary["num_ok"], "instances": summary["num_instances"],
            "decode_ms": summary["mean_decode_ms"], "predict_ms": summary["mean_predict_ms"]}


def main(argv: list[str] | None = None) -> int:
    defaults = InferJobConfig.model_fields
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=48)
    ap.add_argument("--size", type=int, default=256, help="square scene side, px")
    ap.add_argument("--model", default="maskrcnn_resnet50_fpn", choices=["maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"])
    ap.add_argument("--min-size", type=int, default=None, help="model.min_size (default: --size)")
    ap.add_argument("--detections", type=int, default=20, help="instances per image (score threshold 0)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--num-actors", type=int, default=defaults["num_actors"].default)
    ap.add_argument("--cpus-per-actor", type=float, default=defaults["cpus_per_actor"].default)
    ap.add_argument("--cpus-per-task", type=float, default=defaults["cpus_per_task"].default)
    ap.add_argument("--num-gpus-per-actor", type=float, default=None, help="default: 1 with --device cuda, else 0")
    ap.add_argument("--ray-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--workdir", default="/tmp/segray-bench")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import ray

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU")
    gpus = args.num_gpus_per_actor if args.num_gpus_per_actor is not None else (1.0 if device.type == "cuda" else 0.0)
    workdir = Path(args.workdir)
    images = prepare_images(workdir, args.num_images, args.size)
    min_size = args.min_size or args.size
    cfg = ModelConfig(name=args.model, num_classes=len(INSTANCE_DEMO_CLASSES), min_size=min_size,
                      max_size=max(min_size, args.size), box_score_thresh=0.0,
                      box_detections_per_img=args.detections, anchor_sizes=[8, 16, 32, 64, 128])
    ckpt = make_checkpoint(workdir, cfg, images)
    cfg_kwargs = {"checkpoint": str(ckpt), "batch_size": args.batch_size, "num_actors": args.num_actors,
                  "cpus_per_actor": args.cpus_per_actor, "cpus_per_task": args.cpus_per_task,
                  "num_gpus_per_actor": gpus}
    console.print(f"N={args.num_images} scenes {args.size}x{args.size}, {args.model} (min_size {min_size}), "
                  f"{args.detections} instances/image, batch {args.batch_size}, device {device}")

    files = [s.image for s in list_samples(SourceConfig(images=str(images), limit=args.num_images))]
    console.print("model-only ...")
    mo = model_only(ckpt, files, args.batch_size, device)
    console.print(f"  {mo['rate']:.3f} img/s")
    use_node_env(args.ray_cpus)  # the idle-worker limit segray gives the local Ray it starts
    ray.init(address="local", num_cpus=args.ray_cpus, num_gpus=torch.cuda.device_count() if gpus else 0,
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    console.print("pipeline ...")
    pl = pipeline(cfg_kwargs, images, args.num_images, workdir / "out-maskrcnn")
    console.print(f"  {pl['rate']:.3f} img/s")
    ray.shutdown()

    table = Table(title="Mask R-CNN inference throughput", title_justify="left")
    for col in ("measurement", "images", "wall s", "images/s", "notes"):
        table.add_column(col, justify="left" if col in ("measurement", "notes") else "right")
    table.add_row("model-only", str(mo["images"]), f"{mo['wall_s']:.1f}", f"{mo['rate']:.3f}",
                  f"torch threads {mo['torch_threads']}, {mo['detections']} detections")
    table.add_row("pipeline", str(pl["images"]), f"{pl['wall_s']:.1f}", f"{pl['rate']:.3f}",
                  f"{args.num_actors} actors; decode {pl['decode_ms']:.0f} ms, predict {pl['predict_ms']:.0f} ms "
                  f"per image; {pl['instances']} instances written")
    console.print(table)
    console.print(f"pipeline / model-only = {pl['rate'] / mo['rate']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "when": dt.datetime.now(dt.timezone.utc).isoformat(), "host": platform.node(), "cpus": os.cpu_count(),
            "args": vars(args), "model_only": mo, "pipeline": pl}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
