"""Peak memory per process and throughput of scene segmentation, at two scene sizes.

Generates a square 4-band uint16 COG of each ``--size`` (block by block, cached in --workdir),
segments it with a small random-init U-Net through ``segray.infer.scenes.run_scenes`` on a
fresh local Ray, and samples (psutil, in a thread) the RSS of the driver and of every process
Ray started. A worker process's role is read from its title while it works (``ray::stitch_scene``,
``ray::MapWorker(...TileProbabilities)``, ...), so peaks are attributed to what the process was
doing. The claim to check: the peaks do not grow with the scene (5,000² vs 20,000² = 16x pixels).
Each size runs once per ``--band-rows`` (rows per stitch band; 0 = the whole scene as one band,
one stitch task after the last tile), so banded and single stitching print side by side. The
intermediate data (tile blobs in the work area) is printed in bytes per scene pixel.

Throughput is put beside the model alone: the actors' own predictor (``TileProbabilities``) on
32 of the scene's tiles, read beforehand, on the same cores, extrapolated to the scene's tile
count. The last line prints ``scene pipeline/model-only: X.XX`` for the largest scene, so runs
compare by it.

    python benchmarks/scene_memory.py --size 5000                 # ~ minutes on 2 CPU cores
    python benchmarks/scene_memory.py --size 5000 --size 20000    # the 20,000² scene: 3.2 GB raw
    python benchmarks/scene_memory.py --size 20000 --num-gpus-per-actor 1 --batch-size 16   # on GPUs
    python benchmarks/scene_memory.py --size 20000 --band-rows 0 --band-rows 2048  # one band vs bands
    python benchmarks/scene_memory.py --size 5000 --scenes 4 --blend core          # 4 scenes in flight

RSS counts the pages of Ray's shared-memory object store a process has touched; the
"private" column (RSS - shared) is what the process itself holds. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import psutil

ROLES = (  # (title fragment, role), first match wins
    ("TileProbabilities", "read+predict actor"),
    ("read_tiles", "read+predict actor"),
    ("write_tiles", "write-tiles task"),
    ("stitch_band", "stitch band task"),
    ("assemble", "assemble task"),
    ("stitch_scene", "stitch task"),
    ("ray::IDLE", "idle worker"),
    ("ray::", "other ray worker"),
)


def role_of(p: psutil.Process) -> str:
    try:
        title = " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return "gone"
    for frag, role in ROLES:
        if frag in title:
            return role
    return "ray services (raylet, gcs, agents)"


class Sampler:
    """Peak RSS (and RSS - shared) per process and per role, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.driver = interval, psutil.Process()
        self.by_pid: dict[int, dict] = {}
        self.by_role: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _account(self, p: psutil.Process, role: str) -> None:
        try:
            mem = p.memory_info()
        except psutil.Error:
            return
        rss, private = mem.rss, mem.rss - getattr(mem, "shared", 0)
        rec = self.by_pid.setdefault(p.pid, {"rss": 0, "private": 0, "role": role})
        if rss > rec["rss"]:
            rec.update(rss=rss, role=role)
        rec["private"] = max(rec["private"], private)
        agg = self.by_role.setdefault(role, {"rss": 0, "private": 0, "pids": set()})
        agg["rss"], agg["private"] = max(agg["rss"], rss), max(agg["private"], private)
        agg["pids"].add(p.pid)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._account(self.driver, "driver")
            for p in self.driver.children(recursive=True):  # ray.init() started all of them
                role = role_of(p)
                if role != "gone":
                    self._account(p, role)
            self._stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def make_scene(workdir: Path, size: int) -> str:
    """The COG is generated in a child process, so GDAL's cache from writing it does not count
    against the driver measured later."""
    import subprocess

    path = workdir / f"scene_{size}.tif"
    if not path.exists():
        t0 = time.perf_counter()
        tmp = workdir / f"scene_{size}.partial.tif"
        code = ("import sys; from segray.testing.raster import make_test_cog; "
                "make_test_cog(sys.argv[1], int(sys.argv[2]), int(sys.argv[2]), 4, 'uint16', blocksize=512)")
        subprocess.run([sys.executable, "-c", code, str(tmp), str(size)], check=True)
        tmp.rename(path)
        print(f"generated {path} ({path.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - t0:,.0f} s",
              flush=True)
    return str(path)


def make_checkpoint(workdir: Path, depth: int, base_width: int, calibrated: bool) -> str:
    """A random-init U-Net. Random init predicts one class almost everywhere; ``calibrated``
    sharpens the head and centres its bias on a sample window, so both classes occur all over
    the scene (the pattern's 16-px patches) and the polygon path is exercised too."""
    import torch

    from segray.testing.raster import scene_pattern

    from segray.config import ModelConfig
    from segray.core.checkpoint import make_payload, save_payload
    from segray.core.models import build_model

    path = workdir / f"unet_d{depth}_w{base_width}{'_cal' if calibrated else ''}.pt"
    torch.manual_seed(0)
    cfg = ModelConfig(in_channels=4, num_classes=2, depth=depth, base_width=base_width)
    model = build_model(cfg).eval()
    mean, std = [1500.0] * 4, [1000.0] * 4
    if calibrated:
        x = (torch.from_numpy(scene_pattern((0, 0, 512, 512), 4).astype("float32")) - 1500.0) / 1000.0
        with torch.no_grad():
            model.head.weight.mul_(30)
            model.head.bias.sub_(model(x[None])[0].flatten(1).median(dim=1).values)
    save_payload(make_payload(model, cfg.model_dump(mode="json"), ["background", "foreground"],
                              {"mean": mean, "std": std}), str(path))
    return str(path)


def model_only_tiles_per_s(checkpoint: str, scene: str, tile_size: int, overlap: int, batch_size: int,
                           num_tiles: int = 32, min_seconds: float = 10.0) -> float:
    """The model alone: the actors' own predictor (TileProbabilities) on ``num_tiles`` of the
    scene's tiles, read beforehand, batch after batch for at least ``min_seconds``; tiles/s."""
    import time as _time

    from segray.infer.scene_grid import grid_tiles
    from segray.infer.scene_steps import TileProbabilities
    from segray.io.raster import open_info, read_window

    info = open_info(scene)
    tiles = grid_tiles(info.height, info.width, tile_size, overlap)[:num_tiles]
    reads = [read_window(scene, t.window) for t in tiles]
    images, valid = [r[0] for r in reads], [r[1] for r in reads]
    predictor = TileProbabilities(checkpoint, max_batch=batch_size)
    predictor.probabilities(images[:batch_size], valid[:batch_size])  # warm-up
    done, t0 = 0, _time.perf_counter()
    while _time.perf_counter() - t0 < min_seconds:
        predictor.probabilities(images, valid)
        done += len(images)
    return done / (_time.perf_counter() - t0)


def model_only(args, size: int, checkpoint: str) -> float:
    """``model_only_tiles_per_s`` in a fresh process with the model processes' allocator settings
    (as the actors get them), so that the driver's RSS and allocator stay out of it."""
    import multiprocessing
    import os

    from segray.runtime import MODEL_PROCESS_ENV

    saved = {k: os.environ.get(k) for k in MODEL_PROCESS_ENV}
    os.environ.update(MODEL_PROCESS_ENV)  # read by the allocator at process start: set before the spawn
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(model_only_tiles_per_s, (checkpoint, str(args.workdir / f"scene_{size}.tif"),
                                                       args.tile_size, args.overlap, args.batch_size))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_one(args, size: int, checkpoint: str, band_rows: int) -> dict:
    import ray

    from segray.config import SceneInferJobConfig, SourceConfig
    from segray.infer.scenes import run_scenes

    scene = make_scene(args.workdir, size)
    if args.scenes > 1:  # the same COG under several names: that many scenes in flight at once
        folder = args.workdir / f"scenes_{size}_x{args.scenes}"
        folder.mkdir(exist_ok=True)
        for i in range(args.scenes):
            link = folder / f"scene_{i}.tif"
            if not link.exists():
                link.symlink_to(Path(scene).resolve())
        scene = str(folder / "*.tif")
    pixels = args.scenes * size * size
    out = args.workdir / f"out_{size}"
    cfg = SceneInferJobConfig(
        source=SourceConfig(glob=scene), checkpoint=checkpoint, output=str(out), tile_size=args.tile_size,
        overlap=args.overlap, margin=args.margin, block_size=512, batch_size=args.batch_size,
        num_actors=args.num_actors, num_gpus_per_actor=args.num_gpus_per_actor, polygons=not args.no_polygons,
        min_polygon_pixels=64, overwrite=True, gdal_cache_mb=args.gdal_cache_mb, band_rows=band_rows,
        blend=args.blend, keep_work=True,  # to size the intermediate data; removed below
    )
    from segray.runtime import use_node_env

    use_node_env(args.num_cpus)  # the idle-worker limit segray gives the local Ray it starts
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with Sampler(args.sample_interval) as sampler:
            t0 = time.perf_counter()
            summary = run_scenes(cfg)
            wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    row = json.loads(json.dumps({k: v for k, v in summary.items()}, default=str))
    blobs = _folder_bytes(out / "_work" / "tiles")
    shutil.rmtree(out, ignore_errors=True)
    return {
        "size": size, "band_rows": band_rows, "blend": args.blend, "intermediate_bytes_per_px": blobs / pixels,
        "scenes": args.scenes, "megapixels": pixels / 1e6, "wall_s": wall, "tiles_done_s": summary["tiles_done_s"],
        "stitch_s": summary["stitch_s"],
        "megapixels_per_s": pixels / 1e6 / wall, "num_tiles": summary["num_tiles"],
        "num_polygons": summary["num_polygons"], "status": f"{summary['num_ok']} ok / {summary['num_error']} error",
        "roles": {r: {"peak_rss_mib": v["rss"] / 2**20, "peak_private_mib": v["private"] / 2**20,
                      "processes": len(v["pids"])} for r, v in sampler.by_role.items()},
        "processes": {str(pid): {"role_at_peak": v["role"], "peak_rss_mib": v["rss"] / 2**20,
                                 "peak_private_mib": v["private"] / 2**20} for pid, v in sampler.by_pid.items()},
        "summary": row,
    }


def report(res: dict, tiles_per_s: float) -> None:
    res["model_only_megapixels_per_s"] = res["megapixels"] / (res["num_tiles"] / tiles_per_s)
    res["pipeline_over_model_only"] = res["megapixels_per_s"] / res["model_only_megapixels_per_s"]
    print(f"\n== {res['scenes']} x {res['size']:,} x {res['size']:,} px, 4-band uint16: {res['megapixels']:,.0f} MP, "
          f"{res['num_tiles']:,} tiles, band_rows {res['band_rows']}, blend {res['blend']}, {res['status']}, "
          f"{res['num_polygons']:,} polygons", flush=True)
    print(f"   wall {res['wall_s']:,.1f} s (last tile written at {res['tiles_done_s']:,.1f} s, stitch "
          f"{res['stitch_s']:,.1f} s summed over stitch tasks): {res['megapixels_per_s']:.2f} megapixels/s; intermediate "
          f"{res['intermediate_bytes_per_px']:.2f} bytes per scene pixel")
    print(f"   model only (the same tiles, preloaded, {tiles_per_s:.2f} tiles/s): "
          f"{res['model_only_megapixels_per_s']:.2f} megapixels/s; pipeline/model-only "
          f"{res['pipeline_over_model_only']:.2f}")
    print(f"   {'role':36s} {'procs':>5s} {'peak RSS MiB':>13s} {'peak RSS-shared MiB':>20s}")
    for role, v in sorted(res["roles"].items()):
        print(f"   {role:36s} {v['processes']:5d} {v['peak_rss_mib']:13,.0f} {v['peak_private_mib']:20,.0f}")
    print("   per process (peak RSS MiB, role at the peak): " + ", ".join(
        f"{pid}:{v['peak_rss_mib']:,.0f} {v['role_at_peak']}" for pid, v in sorted(
            res["processes"].items(), key=lambda kv: -kv[1]["peak_rss_mib"])[:12]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, action="append", help="scene side in pixels (repeatable; default 5000)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/segray-scene-bench"))
    ap.add_argument("--tile-size", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--margin", type=int, default=48, help="U-Net depth 3: radius 46 px")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--base-width", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--num-actors", type=int, default=2)
    ap.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    ap.add_argument("--num-cpus", type=int, default=psutil.cpu_count())
    ap.add_argument("--gdal-cache-mb", type=int, default=64)
    ap.add_argument("--band-rows", type=int, action="append",
                    help="rows per stitch band, repeatable (default 2048; 0 = one band per scene)")
    ap.add_argument("--scenes", type=int, default=1, help="scenes of each size in one run (in flight together)")
    ap.add_argument("--blend", default="cosine", help="cosine | linear | core (tiles pass on core class maps)")
    ap.add_argument("--no-polygons", action="store_true")
    ap.add_argument("--calibrated", action="store_true", help="a model whose prediction varies: many polygons")
    ap.add_argument("--sample-interval", type=float, default=0.2)
    ap.add_argument("--keep-scenes", action="store_true", help="keep the generated COGs for the next run")
    args = ap.parse_args()
    sizes = args.size or [5000]
    args.workdir.mkdir(parents=True, exist_ok=True)
    need = sum(s * s * 4 * 2 for s in sizes)  # raw scene bytes; the COG and temporaries are smaller
    free = shutil.disk_usage(args.workdir).free
    print(f"{platform.node()}: {psutil.cpu_count()} CPU, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
          f"{free / 2**30:,.0f} GiB free in {args.workdir} (scenes ~{need / 2**30:,.1f} GiB raw)", flush=True)
    # in a child process: torch's allocations for calibrating would stay in the driver's RSS
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        checkpoint = pool.apply(make_checkpoint, (args.workdir, args.depth, args.base_width, args.calibrated))
    results = []
    for size in sizes:
        tiles_per_s = None
        for band_rows in args.band_rows or [2048]:
            res = run_one(args, size, checkpoint, band_rows)
            if tiles_per_s is None:  # the same tiles' forward, preloaded, same cores
                tiles_per_s = model_only(args, size, checkpoint)
            report(res, tiles_per_s)
            results.append(res)
        if not args.keep_scenes:
            Path(args.workdir / f"scene_{size}.tif").unlink(missing_ok=True)  # after model_only read it
    if len(sizes) > 1:  # the smallest vs the largest scene, same band_rows
        a, b = results[-1 - len(args.band_rows or [0]) * (len(sizes) - 1)], results[-1]
        print(f"\n{b['size']:,}² vs {a['size']:,}²: {b['megapixels'] / a['megapixels']:.0f}x pixels")
        for role in sorted(set(a["roles"]) & set(b["roles"])):
            ra, rb = a["roles"][role]["peak_rss_mib"], b["roles"][role]["peak_rss_mib"]
            print(f"   {role:36s} peak RSS {ra:7,.0f} -> {rb:7,.0f} MiB ({rb / ra:4.2f}x)")
    out = args.workdir / "results.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {out}")
    # last, so that runs compare by their last line: the largest scene's ratio (the last band_rows)
    print(f"scene pipeline/model-only: {results[-1]['pipeline_over_model_only']:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
