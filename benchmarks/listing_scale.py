"""Listing at archive scale: a Parquet manifest of N objects (S3 Inventory style) -> Samples.

Measured, never asserted. For N objects (default 1,000,000) this writes one inventory-style
manifest (key, size, e_tag, last_modified_date), then, each in a fresh process so that peak
memory is its own:

- ``listing``: what ``segray infer`` lists before it starts: an Arrow table, handed to Ray Data
  as it is;
- ``list_samples``: the same as ``Sample`` objects (training, scenes: a Python object per row);
- ``list_archive``: what ``segray nightly`` lists, size and version from the inventory's own
  columns (no request per object), in Arrow columns;
- the nightly diff: the archive against a committed set holding 90% of it (an Arrow anti-join).

It prints seconds, objects/s, peak RSS, the peak's growth per listed object and what the result
itself holds per object. The objects themselves need not exist: listing a manifest reads the
manifest only. ``--first-predictions`` then runs ``segray infer`` on such a manifest (its first
objects real PNGs, the rest absent: error rows) and prints the seconds until the first
predictions are in storage and the driver's peak RSS per listed object.

    .venv/bin/python benchmarks/listing_scale.py --num-objects 1000000 [--first-predictions]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # infer_throughput's data and checkpoint


def write_inventory(path: Path, n: int) -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    pq.write_table(pa.table({
        "key": [f"archive/{i // 10_000:03d}/scene_{i:07d}.tif" for i in range(n)],
        "size": pa.array(range(100_000, 100_000 + n), pa.int64()),
        "e_tag": [f"{i:032x}" for i in range(n)],
        "last_modified_date": pa.array([start + dt.timedelta(seconds=i) for i in range(n)], pa.timestamp("ms", "UTC")),
    }), path)


def _child(what: str, manifest: str) -> None:
    from segray.config import SourceConfig
    from segray.io.sources import list_archive, list_samples, listing

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    source = SourceConfig(manifest=manifest)
    t = time.perf_counter()
    held = 0
    if what == "listing":
        table = listing(source)
        n, held = table.num_rows, table.nbytes
    elif what == "list_samples":
        n = len(list_samples(source))
    else:
        entries = list_archive(source)
        n, held = len(entries), entries.table.nbytes
        if what == "nightly diff":
            from segray.infer.sinks import INPUTS_SCHEMA

            # What committed nights hold: their inputs tables, 90% of the archive.
            done = entries.table.slice(0, n * 9 // 10).select(INPUTS_SCHEMA.names).cast(INPUTS_SCHEMA)
            t = time.perf_counter()  # the diff alone (its listing is the row above)
            n_todo = len(entries.not_in([done]))
            assert n_todo == n - n * 9 // 10
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"what": what, "n": n, "wall_s": wall, "peak_rss": peak, "grown": peak - base, "held": held}))


def _first_predictions(workdir: Path, n: int, real: int) -> dict:
    """Runs ``jobs/infer.py`` on a manifest of ``n`` entries (the first ``real`` of them PNGs on
    disk), which starts a local Ray; stops it once a finished part file of predictions is in the
    output. Returns the seconds to it and the driver's peak RSS and heap until then."""
    import psutil

    from infer_throughput import make_checkpoint, prepare_images
    from segray.config import ModelConfig

    images = prepare_images(workdir, real, size=64)
    ckpt = make_checkpoint(workdir, ModelConfig(num_classes=5, depth=2, base_width=8), images)
    paths = [str(p) for p in sorted(images.glob("*.png"))[:real]]
    manifest = workdir / f"manifest-{n}.parquet"
    pq.write_table(pa.table({"image": paths + [f"{images}/absent/{i:07d}.png" for i in range(n - len(paths))]}),
                   manifest)
    out = workdir / f"out-{n}"
    config = workdir / f"infer-{n}.yaml"
    config.write_text(json.dumps({"source": {"manifest": str(manifest)}, "checkpoint": str(ckpt), "output": str(out),
                                  "batch_size": 8, "num_actors": 1, "overwrite": True}))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "infer.py"), str(config)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    rss = anon = 0
    try:
        driver = psutil.Process(proc.pid)
        while proc.poll() is None and time.perf_counter() - t0 < 600:
            rss, anon = max(rss, driver.memory_info().rss), max(anon, _rss_anon(proc.pid))
            if _a_finished_part(out / "predictions"):
                break
            time.sleep(0.1)
        first = time.perf_counter() - t0
    finally:
        if proc.poll() is None:  # Ctrl-C: the driver shuts down the local Ray it started
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return {"n": n, "first_s": first, "rss": rss, "anon": anon}


def _rss_anon(pid: int) -> int:
    """The process's own heap (RssAnon): RSS less mapped files and the object store's shared pages."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _a_finished_part(folder: Path) -> bool:
    for part in folder.glob("*.parquet") if folder.exists() else ():
        try:
            return pq.read_metadata(part).num_rows > 0  # readable once its footer is written
        except Exception:
            continue
    return False


def first_predictions(n: int, real: int) -> None:
    os.environ.pop("RAY_ADDRESS", None)  # each driver starts its own local Ray, as `segray infer` does
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        small, big = (_first_predictions(Path(tmp), k, real) for k in (real, n))
    print(f"\nsegray infer on a manifest of {n:,} (first {real:,} real PNGs), Ray start included, driver process:")
    print(f"{'manifest rows':>14} {'s to first predictions':>23} {'peak RSS':>9} {'peak heap':>10}")
    for r in (small, big):
        print(f"{r['n']:>14,} {r['first_s']:>23.1f} {r['rss'] / 2**20:>7.0f}Mi {r['anon'] / 2**20:>8.0f}Mi")
    print(f"driver bytes per listed object (growth from {real:,} to {n:,} rows): "
          f"RSS {(big['rss'] - small['rss']) / (n - real):.0f}, heap (RssAnon) {(big['anon'] - small['anon']) / (n - real):.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-objects", type=int, default=1_000_000)
    ap.add_argument("--first-predictions", action="store_true",
                    help="also run segray infer on such a manifest to its first predictions (each run starts its "
                         "own local Ray: run it on a quiet machine)")
    ap.add_argument("--real", type=int, default=2000, help="real images at the head of that manifest")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(*args.child)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "inventory.parquet"
        t = time.perf_counter()
        write_inventory(manifest, args.num_objects)
        print(f"inventory of {args.num_objects:,} objects: {manifest.stat().st_size / 1e6:.1f} MB "
              f"(written in {time.perf_counter() - t:.1f} s)")
        print(f"{'step':<14} {'objects':>10} {'seconds':>8} {'objects/s':>10} {'peak RSS':>9} {'peak B/object':>13} "
              f"{'held B/object':>13}")
        for what in ("listing", "list_samples", "list_archive", "nightly diff"):
            out = subprocess.run([sys.executable, __file__, "--child", what, str(manifest)], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            print(f"{what:<14} {r['n']:>10,} {r['wall_s']:>8.1f} {r['n'] / r['wall_s']:>10,.0f} "
                  f"{r['peak_rss'] / 2**20:>7.0f}Mi {r['grown'] / r['n']:>13.0f} "
                  f"{(r['held'] / r['n'] if r['held'] else float('nan')):>13.0f}")
    if args.first_predictions:
        first_predictions(args.num_objects, args.real)


if __name__ == "__main__":
    main()
