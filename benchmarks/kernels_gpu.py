"""GPU kernels (`hetinfer/kernels/cuda.py`) against the device's memory bandwidth, measured in the same run.

    python benchmarks/kernels_gpu.py [--device cuda] [--quick] [--json]

Weights sit on the device in their stored format (`kernels.to_cuda`); each call decodes the rows it
uses and multiplies them in float16 (block formats) or the stored dtype. Tables, medians of repeated
runs, each timed call synchronized:
  1. dense GEMV per format and shape: GB/s of stored weight bytes, % of the device copy bandwidth;
  2. sparse ops at 100/50/20% of rows (interleaved rounds, fresh random rows each): time vs the
     ideal density x time over all rows.
  3. one decode token's attention (`kernels.device_attention`: RoPE, cache write, softmax over the
     cache) at several positions: time against the cache's bytes at the copy bandwidth, the only term
     the placement cost model prices for attention on a GPU (the rest is the per-layer fixed cost).
`--device cpu` runs the same torch code on the CPU, to check this script where there is no GPU;
its numbers say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._util import Report, timings as _timings  # noqa: E402
from hetinfer import kernels  # noqa: E402
from hetinfer.tensors import FORMATS, quantize  # noqa: E402


def timings(fn, device: torch.device, reps: int, warm: int = 2) -> np.ndarray:
    """Wall times of `reps` runs of `fn()`, each until the device has finished it."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return _timings(fn, reps, warm, sync)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device memory bandwidth in GB/s from a large copy, bytes read plus written."""
    a = torch.ones(nbytes // 4, device=device)
    b = torch.empty_like(a)
    return 2 * nbytes / float(np.median(timings(lambda: b.copy_(a), device, 10))) / 1e9


def random_weight(rng, shape, qtype: str, device: torch.device):
    return kernels.to_cuda(quantize(rng.standard_normal(shape, dtype=np.float32), qtype), device)


def dense(shapes, device: torch.device, bw: float, reps: int) -> list[list]:
    out = []
    rng = np.random.default_rng(0)
    for rows, cols in shapes:
        x = torch.randn(1, cols, device=device)
        for qtype in FORMATS:
            W = random_weight(rng, (rows, cols), qtype, device)
            nbytes = W.data.numel() * W.data.element_size()
            ts = timings(lambda: kernels.linear(W, x), device, reps)
            t = float(np.median(ts))
            out.append([f"{rows}x{cols}", qtype, f"{nbytes / 2**20:.2f}", f"{t * 1e6:.1f}", f"{nbytes / t / 1e9:.1f}",
                        f"{100 * nbytes / t / 1e9 / bw:.0f}%", f"{nbytes / ts.min() / 1e9:.1f}"])
            W = None  # free this format's copy before the next one is made
    return out


def sparse(shapes, device: torch.device, reps: int) -> list[list]:
    out = []
    rng = np.random.default_rng(1)
    densities = (1.0, 0.5, 0.2)
    for n_ff, d in shapes:
        Wg, Wu = (random_weight(rng, (n_ff, d), "q4_1", device) for _ in range(2))
        Wd_t = random_weight(rng, (n_ff, d), "q8_0", device)
        x, y = torch.randn(1, d, device=device), torch.zeros(d, device=device)
        counts = {dn: int(round(dn * n_ff)) for dn in densities}
        coef = {k: torch.ones(k, device=device) for k in counts.values()}
        ops = {
            "gather_matvec": lambda r: kernels.gather_matvec(Wg, r, x),
            "scatter_axpy (q8_0)": lambda r: kernels.scatter_axpy(Wd_t, r, coef[len(r)], y),
            "sparse_ffn": lambda r: kernels.sparse_ffn(Wg, Wu, Wd_t, r, x, "silu"),
        }
        for name, op in ops.items():
            ts = {dn: [] for dn in densities}
            for _ in range(reps):
                for dn in densities:
                    r = torch.from_numpy(np.sort(rng.permutation(n_ff)[: counts[dn]])).to(device)
                    ts[dn] += list(timings(lambda: op(r), device, 1, warm=1))
            base = float(np.median(ts[1.0]))
            for dn in densities:
                t = float(np.median(ts[dn]))
                out.append([f"{n_ff}x{d}", name, f"{dn:.0%}", f"{t * 1e6:.1f}", f"{t / (dn * base):.2f}"])
    return out


def attention(heads: int, kv_heads: int, hd: int, positions, device: torch.device, bw: float, reps: int
              ) -> list[list]:
    """One token's attention at each position, float32 and float16 caches: us, and the cache's bytes read at
    the copy bandwidth (bw counts read + write, so a read alone takes bytes / (bw / 2))."""
    out = []
    n_ctx = max(positions) + 1
    ang = torch.rand(hd // 2).numpy()
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    q, k, v = (torch.randn(1, n * hd, device=device) for n in (heads, kv_heads, kv_heads))
    for dtype in (torch.float32, torch.float16):
        kc, vc = (torch.randn(n_ctx, kv_heads, hd, device=device).to(dtype) for _ in range(2))
        for pos in positions:
            t = float(np.median(timings(lambda: kernels.device_attention(q, k, v, kc, vc, pos, cos, sin, False),
                                        device, reps)))
            nbytes = 2 * (pos + 1) * kv_heads * hd * kc.element_size()
            out.append([f"{heads}/{kv_heads}x{hd}", str(dtype).replace("torch.", ""), str(pos), f"{t * 1e6:.1f}",
                        f"{nbytes / (bw / 2 * 1e9) * 1e6:.1f}"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="torch device (default cuda; cpu only checks this script)")
    p.add_argument("--quick", action="store_true", help="small shapes and few repetitions")
    p.add_argument("--json", action="store_true", help="print the tables as JSON instead")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run this on a machine with a GPU (or pass --device cpu to check the script)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (torch path; not GPU numbers)"
    quick = args.quick
    out = Report(args.json)
    bw = copy_bandwidth(device, (64 if quick else 1024) << 20)
    out.note(f"device: {name}; torch {torch.__version__}")
    out.note(f"device memory bandwidth (copy, read + write): {bw:.0f} GB/s\n")
    shapes = [(1536, 576), (576, 1536)] + ([] if quick else [(11008, 4096), (4096, 11008), (28672, 8192)])
    out.table("Dense GEMV (T = 1), GB/s of stored weight bytes", ["shape", "format", "MiB", "us", "GB/s", "% of bw", "best GB/s"],
              dense(shapes, device, bw, 5 if quick else 50))
    out.note()
    sshapes = [(1536, 576)] + ([] if quick else [(11008, 4096), (28672, 8192)])
    out.table("Sparse ops vs density (gate/up q4_1, down neuron-major q8_0); ratio = time / (density x time at 100%)",
              ["n_ff x d", "op", "rows", "us", "ratio"], sparse(sshapes, device, 3 if quick else 30))
    out.note()
    heads = (9, 3, 64) if quick else (32, 32, 128)  # SmolLM2's, or Llama-2-7B's
    out.table("Decode attention (one token, one layer) vs the cache's bytes at the copy bandwidth",
              ["heads/kv x hd", "cache", "position", "us", "bytes-bound us"],
              attention(*heads, (63, 511) if quick else (63, 511, 2047), device, bw, 5 if quick else 50))
    out.close()

if __name__ == "__main__":
    main()
