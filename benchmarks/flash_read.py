"""Flash reads: the disk's measured read curve, and what FlashReader achieves on it (issue 15).

    python benchmarks/flash_read.py [--dir DIR] [--record-bytes 1336] [--records 1536] [--layers 64]
                                    [--calls 40] [--max-read 1MiB] [--io threads,uring] [--json PATH]

First the flash probe (`placement.probe.probe_flash`, measured afresh, not the cached copy) reads a
scratch file in DIR at each read size and depth: the curve plans and costs are made from. Then a
scratch file of `--layers` layer sections (`--records` records of `--record-bytes` each; the default
is one SmolLM2 Q4_1 layer: 1536 neurons of 360 + 360 + 612 bytes, padded to 8) is read with
`FlashReader.read_into` at record densities 5-100%, each call a fresh random set in the next
layer's section, once with each way the reader issues requests (`--io`: a pool of threads, and
io_uring where the kernel allows it). Per density: the plan (requests, bytes read per byte asked),
the median call, the process CPU time per call (what the reads take from the cores the model computes on),
the asked record bytes per second it achieves, and the bound the curve puts on the same plan (the
sum of `read_seconds` over its requests, i.e. every read at the best measured depth) and on reading
the whole section instead. DIR should be on the disk the store will live on (default: this one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._util import machine, table, timings  # noqa: E402

from hetinfer.offload.reader import FlashReader, FlashReadError, plan_reads  # noqa: E402
from hetinfer.offload.uring import DEPTH as URING_DEPTH  # noqa: E402
from hetinfer.placement.hardware import FLASH_BLOCK, FlashTier, format_size, parse_size  # noqa: E402
from hetinfer.placement.probe import probe_flash  # noqa: E402

DENSITIES = (0.05, 0.2, 0.5, 0.8, 1.0)


def curve_table(curve: FlashTier) -> str:
    rows = [[format_size(size)] + [f"{b / 1e6:.0f}" for b in row]
            for size, row in zip(curve.read_sizes, curve.bytes_per_s)]
    return table(["read size"] + [f"MB/s @ {c} in flight" for c in curve.concurrency], rows)


def write_layers(path: Path, nbytes: int) -> None:
    chunk = 1 << 20
    with open(path, "wb") as f:
        for _ in range(-(-nbytes // chunk)):
            f.write(os.urandom(chunk))
        f.flush()
        os.fsync(f.fileno())


def run_density(reader: FlashReader, curve: FlashTier, density: float, record_bytes: int, records: int,
                section: int, layers: int, calls: int, rng: np.random.Generator) -> dict:
    n = max(1, round(density * records))
    sets = [np.sort(rng.choice(records, n, replace=False)) for _ in range(calls + 2)]
    dst = np.empty((n, record_bytes), np.uint8)
    rows = np.arange(n)
    call = iter(range(calls + 2))

    def read() -> None:
        k = next(call)
        reader.read_into((k % layers) * section, record_bytes, sets[k], dst, rows)

    plan_s = float(np.median(timings(lambda: plan_reads(sets[0], record_bytes, 0, curve, reader.max_read), 20)))
    before = reader.snapshot()
    cpu = time.process_time()
    seconds = float(np.median(timings(read, calls, warm=2)))
    cpu = (time.process_time() - cpu) / (calls + 2)
    done = reader.snapshot() - before
    asked = n * record_bytes
    bound = float(np.mean([curve.read_seconds(np.array([size for _, size in plan_reads(
        s, record_bytes, 0, curve, reader.max_read)])).sum() for s in sets]))
    span = -(-records * record_bytes // FLASH_BLOCK) * FLASH_BLOCK
    whole = float(curve.read_seconds(np.minimum(reader.max_read, span - np.arange(0, span, reader.max_read))).sum())
    return {"io": reader.io, "density": density, "records": n, "cpu_ms": cpu * 1e3, "requests_per_call": done.requests / (calls + 2),
            "read_per_asked": done.bytes / done.requested_bytes, "plan_us": plan_s * 1e6, "call_ms": seconds * 1e3,
            "asked_mb_s": asked / seconds / 1e6, "read_mb_s": done.bytes / (calls + 2) / seconds / 1e6,
            "bound_ms": bound * 1e3, "of_bound": bound / seconds, "whole_section_ms": whole * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=".", help="a directory on the disk to measure (scratch files are removed)")
    ap.add_argument("--record-bytes", type=int, default=1336)
    ap.add_argument("--records", type=int, default=1536, help="records per layer section")
    ap.add_argument("--layers", type=int, default=64, help="layer sections in the scratch file")
    ap.add_argument("--calls", type=int, default=40, help="timed read_into calls per density")
    ap.add_argument("--max-read", type=parse_size, default=1 << 20, help="FlashReader's cap on one read")
    ap.add_argument("--io", default="threads,uring", help="how the reader issues requests, comma-separated")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args()
    print(f"# Flash reads ({machine()}); {args.dir}")
    t = time.perf_counter()
    curve = FlashTier(0, str(Path(args.dir).resolve()), **probe_flash(Path(args.dir)))
    print(f"\nRead curve ({curve.method}, probed in {time.perf_counter() - t:.0f} s): aggregate MB/s of random "
          f"aligned reads\n\n{curve_table(curve)}\n")
    section = -(-args.records * args.record_bytes // FLASH_BLOCK) * FLASH_BLOCK
    fd, name = tempfile.mkstemp(dir=args.dir, prefix=".hetinfer-flash-read-")
    os.close(fd)
    path = Path(name)
    results = []
    try:
        write_layers(path, section * args.layers)
        readers = {}
        for io in args.io.split(","):
            try:
                readers[io] = FlashReader(str(path), curve, max_read=args.max_read, io=io)
            except FlashReadError as e:
                print(f"skipped --io {io}: {e}")
        try:
            for density in DENSITIES:  # the ways interleaved, on the same random sets
                for io, reader in readers.items():
                    results.append(run_density(reader, curve, density, args.record_bytes, args.records, section,
                                               args.layers, args.calls, np.random.default_rng(int(density * 100))))
            for io, reader in readers.items():
                print(f"FlashReader --io {io} ({reader.method}, " + (f"{reader.threads} threads" if reader.io == "threads"
                      else f"io_uring, {URING_DEPTH} queued") + f", max_read {format_size(reader.max_read)})")
            print(f"random record sets in a {format_size(section)} section of {args.records} records of "
                  f"{args.record_bytes} B; median of {args.calls} calls\n")
        finally:
            for reader in readers.values():
                reader.close()
    finally:
        path.unlink(missing_ok=True)
    header = ["density", "io", "records", "reads/call", "read/asked", "plan us", "call ms", "CPU ms/call", "asked MB/s",
              "read MB/s", "curve bound ms", "bound/achieved", "whole section ms"]
    print(table(header, [[f"{r['density']:.0%}", r["io"], r["records"], f"{r['requests_per_call']:.1f}",
                          r["read_per_asked"], f"{r['plan_us']:.0f}", f"{r['call_ms']:.3f}", f"{r['cpu_ms']:.3f}",
                          f"{r['asked_mb_s']:.0f}",
                          f"{r['read_mb_s']:.0f}", f"{r['bound_ms']:.3f}", r["of_bound"],
                          f"{r['whole_section_ms']:.3f}"] for r in results]))
    if args.json:
        out = {"machine": machine(), "dir": curve.dir, "curve": {k: getattr(curve, k) for k in
                                                                ("method", "read_sizes", "concurrency", "bytes_per_s")},
               "record_bytes": args.record_bytes, "records": args.records, "layers": args.layers,
               "calls": args.calls, "max_read": args.max_read, "results": results}
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
