"""Kernel throughput against this machine's memory bandwidth (measured in the same run).

    python benchmarks/kernels.py [--threads N] [--quick] [--json]

Tables (medians of repeated runs, compile time excluded and reported separately):
  1. dense GEMV per format and shape: GB/s of weight bytes read, % of copy bandwidth,
     1 thread vs N threads (target: >= 60% for q8_0/q4_0/q4_1 at 576x1536 and 4096x11008);
  2. sparse ops at 100/50/20% of rows (interleaved rounds, fresh random rows each): time vs the
     ideal density x time over all rows (target <= 1.2x);
  3. per-call overhead of the Python interface on a tiny matrix;
  4. one token's attention over a growing KV cache (SmolLM2's 9 query / 3 kv heads of 64), float32
     and float16 caches (`--kv`), against torch's fastest form of it here (grouped matmuls over a
     head-major float32 copy of the cache; faster than its scaled_dot_product_attention), which
     leaves out the rotary and cache write ours does.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numba
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._util import Report, copy_bandwidth, machine, median_seconds, timings  # noqa: E402
from hetinfer import kernels  # noqa: E402
from hetinfer.tensors import FORMATS, quantize  # noqa: E402

BLOCK = ("q8_0", "q4_0", "q4_1")

TORCH_KV = {"f32": torch.float32, "f16": torch.float16}  # the KV cache as torch holds it, for its reference point


def reps_for(nbytes: int) -> int:
    return int(min(400, max(15, 4e8 / max(nbytes, 1))))


def dense(shapes, formats, threads: int, bw: float) -> list[list]:
    rows_out = []
    rng = np.random.default_rng(0)
    for rows, cols in shapes:
        w = rng.standard_normal((rows, cols), dtype=np.float32)
        x = torch.from_numpy(rng.standard_normal((1, cols), dtype=np.float32))
        for qtype in formats:
            W = quantize(w, qtype)
            res = []
            for n in sorted({1, threads}):
                kernels.set_threads(n)
                ts = timings(lambda: kernels.linear(W, x), reps_for(W.nbytes))
                res.append((np.median(ts), W.nbytes / np.median(ts) / 1e9, W.nbytes / ts.min() / 1e9))
            kernels.set_threads(threads)
            (t1, g1, _), (tn, gn, best) = res[0], res[-1]
            target = "yes" if gn >= 0.6 * bw else "NO"
            rows_out.append([f"{rows}x{cols}", qtype, f"{W.nbytes / 2**20:.2f}", f"{t1 * 1e6:.1f}", f"{g1:.1f}",
                             f"{tn * 1e6:.1f}", f"{gn:.1f}", f"{100 * gn / bw:.0f}%",
                             target if qtype in BLOCK else "-", f"{best:.1f}"])
    return rows_out


def sparse(shapes, qtype: str, threads: int) -> list[list]:
    out = []
    rng = np.random.default_rng(1)
    densities = (1.0, 0.5, 0.2)
    for n_ff, d in shapes:
        Wg = quantize(rng.standard_normal((n_ff, d), dtype=np.float32), qtype)
        Wu = quantize(rng.standard_normal((n_ff, d), dtype=np.float32), qtype)
        Wd_t = quantize(rng.standard_normal((n_ff, d), dtype=np.float32), "q8_0")
        x = torch.from_numpy(rng.standard_normal((1, d), dtype=np.float32))
        y = torch.zeros(d)
        counts = {dn: int(round(dn * n_ff)) for dn in densities}
        coef = {k: torch.ones(k) for k in counts.values()}
        ops = {
            "gather_matvec": lambda r: kernels.gather_matvec(Wg, r, x),
            "scatter_axpy (q8_0)": lambda r: kernels.scatter_axpy(Wd_t, r, coef[len(r)], y),
            "sparse_ffn": lambda r: kernels.sparse_ffn(Wg, Wu, Wd_t, r, x, "silu"),
        }
        for n_thr in sorted({1, threads}):
            kernels.set_threads(n_thr)
            for name, op in ops.items():
                # Rounds interleave the densities, each with fresh random rows, so a change in the machine's
                # load during the run shifts all three alike instead of the ratios.
                ts = {dn: [] for dn in densities}
                for _ in range(reps_for(n_ff * Wg.row_bytes * 3)):
                    for dn in densities:
                        r = np.sort(rng.permutation(n_ff)[: counts[dn]])
                        ts[dn] += list(timings(lambda: op(r), 1, warm=1))
                base = np.median(ts[1.0]), min(ts[1.0])
                for dn in densities:
                    t, best = np.median(ts[dn]), min(ts[dn])
                    ratio = t / (dn * base[0])
                    out.append([f"{n_ff}x{d}", n_thr, name, f"{dn:.0%}", f"{t * 1e6:.1f}", f"{ratio:.2f}",
                                "-" if dn == 1.0 else ("yes" if ratio <= 1.2 else "NO"),
                                f"{best * 1e6:.1f}", f"{best / (dn * base[1]):.2f}"])
    kernels.set_threads(threads)
    return out


def overhead(threads: int) -> list[list]:
    kernels.set_threads(threads)
    W = quantize(np.ones((32, 64), np.float32), "q4_1")
    x = torch.ones(1, 64)
    rows = np.arange(8)
    y = torch.zeros(64)
    a = torch.ones(8)
    z = np.zeros(max(threads, 1))
    calls = {
        "linear": lambda: kernels.linear(W, x),
        "linears (3 matrices)": lambda: kernels.linears((W, W, W), x),
        "gate_up": lambda: kernels.gate_up(W, W, x, "silu"),
        "gather_matvec": lambda: kernels.gather_matvec(W, rows, x),
        "scatter_axpy": lambda: kernels.scatter_axpy(W, rows, a, y),
        "sparse_ffn": lambda: kernels.sparse_ffn(W, W, W, rows, x, "silu"),
        "torch: x * w + x (reference point)": lambda: x * x + x,
        "numba floor: empty call": lambda: _empty(z, 1),
        "numba floor: parallel region, 1 item": lambda: _empty_parallel(z, 1),
        f"numba floor: parallel region, {threads} items": lambda: _empty_parallel(z, threads),
    }
    return [[name, f"{median_seconds(fn, 3000) * 1e6:.1f}"] for name, fn in calls.items()]


@numba.njit
def _empty(a, n):
    """What calling a compiled function costs by itself."""
    for i in range(n):
        a[i] += 1.0


@numba.njit(parallel=True)
def _empty_parallel(a, n):
    """What numba's parallel launch costs by itself (the per-call floor of every multi-threaded kernel)."""
    for i in numba.prange(n):
        a[i] += 1.0


def attention(threads: int, quick: bool) -> list[list]:
    kernels.set_threads(threads)
    H, KV, hd = 9, 3, 64
    out = []
    for S, kv in ((S, kv) for S in (64, 512, 2048) + (() if quick else (8192,)) for kv in ("f32", "f16")):
        kc, vc = torch.randn(S, KV, hd).to(TORCH_KV[kv]), torch.randn(S, KV, hd).to(TORCH_KV[kv])
        q, k, v = torch.randn(1, H * hd), torch.randn(1, KV * hd), torch.randn(1, KV * hd)
        cos, sin = torch.ones(hd // 2), torch.zeros(hd // 2)
        ours = median_seconds(lambda: kernels.attention_decode(q, k, v, kc, vc, S - 1, cos, sin, False), 200)
        qg, kh, vh = (q.view(KV, H // KV, hd), kc.transpose(0, 1).float().contiguous(),
                      vc.transpose(0, 1).float().contiguous())
        base = median_seconds(lambda: torch.softmax(qg @ kh.transpose(1, 2) * hd**-0.5, -1) @ vh, 200)
        kv_bytes = kc.nbytes + vc.nbytes
        out.append([S, kv, f"{kv_bytes / 2**20:.2f}", f"{ours * 1e6:.1f}", f"{kv_bytes / ours / 1e9:.1f}",
                    f"{base * 1e6:.1f}", f"{base / ours:.2f}x"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="threads for the kernels (default: all available)")
    p.add_argument("--quick", action="store_true", help="SmolLM2 shapes only")
    p.add_argument("--json", action="store_true", help="print the tables as JSON instead")
    args = p.parse_args()
    threads = kernels.set_threads(args.threads)
    out = Report(args.json)
    t = time.perf_counter()
    compile_s = kernels.warmup()
    out.note(f"machine: {machine()}; kernels use {threads} threads")
    out.note(f"compile/load of all kernels (warmup): {compile_s:.2f} s (excluded below)")
    bw = copy_bandwidth()
    out.note(f"memory bandwidth (512 MiB numpy copy, read + write): {bw:.1f} GB/s; 60% = {0.6 * bw:.1f} GB/s\n")

    shapes = [(1536, 576), (576, 1536)] + ([] if args.quick else [(11008, 4096), (4096, 11008)])
    out.table("Dense GEMV (T = 1), GB/s of weight bytes",
              ["shape", "format", "MiB", "1 thr us", "1 thr GB/s", f"{threads} thr us", f"{threads} thr GB/s",
               "% of bw", ">= 60%", "best GB/s"], dense(shapes, FORMATS, threads, bw))
    out.note("(medians; 'best' is the fastest run, what an otherwise idle machine gives: on a shared machine a "
             "multi-threaded call waits for its slowest, possibly descheduled, thread)")
    out.note()
    sshapes = [(1536, 576)] + ([] if args.quick else [(11008, 4096)])
    out.table(f"Sparse ops vs density (gate/up q4_1, down neuron-major q8_0, {threads} threads); "
              "ratio = time / (density x time at 100%)",
              ["n_ff x d", "threads", "op", "rows", "us", "ratio", "<= 1.2x", "best us", "best ratio"],
              sparse(sshapes, "q4_1", threads))
    out.note()
    calls = overhead(threads)
    out.table(f"Per-call overhead, tiny 32x64 q4_1 matrix ({threads} threads; numba threading layer "
              f"{numba.threading_layer()}), us", ["call", "us"], calls)
    out.note()
    out.table(f"Attention of one token over S cached positions (9 query / 3 kv heads of 64, {threads} threads)",
              ["S", "KV", "KV MiB", "us", "KV GB/s", "torch us", "torch / ours"], attention(threads, args.quick))
    out.note(f"\ntotal {time.perf_counter() - t:.0f} s; load average at end {os.getloadavg()[0]:.2f}")
    out.close()

if __name__ == "__main__":
    main()
