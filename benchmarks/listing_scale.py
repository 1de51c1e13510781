"""Listing at archive scale: a Parquet manifest of N objects (S3 Inventory style) -> Samples.

Measured, never asserted. For N objects (default 1,000,000) this writes one inventory-style
manifest (key, size, e_tag, last_modified_date), then, each in a fresh process so that peak
memory is its own:

- ``list_samples``: what every images job lists before it starts (``segray infer``, training);
- ``list_archive``: what ``segray nightly`` lists, size and version from the inventory's own
  columns (no request per object);
- the nightly diff: the archive against a committed set holding 90% of it.

It prints seconds, objects/s, peak RSS and bytes per listed object. The objects themselves
need not exist: listing a manifest reads the manifest only.

    .venv/bin/python benchmarks/listing_scale.py --num-objects 1000000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


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
    from segray.io.sources import list_archive, list_samples

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    source = SourceConfig(manifest=manifest)
    t = time.perf_counter()
    if what == "list_samples":
        n = len(list_samples(source))
    else:
        entries = list_archive(source)
        n = len(entries)
        if what == "nightly diff":
            from segray.infer.nightly import unprocessed
            from segray.infer.sinks import INPUTS_SCHEMA

            held = entries[: n * 9 // 10]  # what committed nights hold: their inputs tables, in Arrow
            done = pa.table({"source_path": [e.url for e in held], "image_id": [e.image_id for e in held],
                             "size": [e.size for e in held], "version": [e.version for e in held]},
                            schema=INPUTS_SCHEMA)
            del held
            t = time.perf_counter()  # the diff alone (its listing is the row above)
            n_todo = len(unprocessed(entries, [done]))
            assert n_todo == n - n * 9 // 10
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"what": what, "n": n, "wall_s": wall, "peak_rss": peak, "grown": peak - base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-objects", type=int, default=1_000_000)
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
        print(f"{'step':<14} {'objects':>10} {'seconds':>8} {'objects/s':>10} {'peak RSS':>9} {'bytes/object':>12}")
        for what in ("list_samples", "list_archive", "nightly diff"):
            out = subprocess.run([sys.executable, __file__, "--child", what, str(manifest)], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            print(f"{what:<14} {r['n']:>10,} {r['wall_s']:>8.1f} {r['n'] / r['wall_s']:>10,.0f} "
                  f"{r['peak_rss'] / 2**20:>7.0f}Mi {r['grown'] / r['n']:>12.0f}")


if __name__ == "__main__":
    main()
