"""One token's FFN on the model's own layers as decode meets them, and what threshold mode could gain at most.

    python benchmarks/ffn_layers.py [--model GGUF] [--profile PROFILE] [--sparsity 0.5] [--threads 2] [--json]

Every layer's bound call runs in turn (`dense_ffn_step`, `threshold_ffn_step`, `sparse_ffn`), so each
finds its weights evicted from L2 as a decode token does; repeating one layer instead keeps it in L2 and
hides most of the differences. Inputs are the model's own FFN inputs at STEPS decode steps, a sweep of
all layers taking one step's. Interleaved rounds of sweeps, medians; us per layer.

The bound (issue 18): threshold mode reads every gate and up row, then the kept neurons' rows of the
neuron-major down copy. At the dense kernels' bandwidth the most it gains is the bytes it does not read;
the table gives that bound per token, for the copy `transpose_down` makes, for an exact 4-bit layout
(the weights' own nibbles, the scales shared by a 32-neuron block) and for the kept share of the stored
down bytes, scales included, which no neuron-major layout reaches.
The FFN's share of a token is the dense FFN's time here over a decode step's (timed in the same run).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._util import Report, machine  # noqa: E402
from benchmarks.decode import PROMPT, quick_profile  # noqa: E402
from hetinfer import kernels  # noqa: E402
from hetinfer.loader import load_model  # noqa: E402
from hetinfer.profiler.artifact import load_profile  # noqa: E402

STEPS = 16  # decode steps whose FFN inputs the calls take


def sweep_us(calls: dict, n_layers: int, sweeps: int, rounds: int) -> dict:
    """Median us per layer of each call (name -> fn(layer, sweep)), over `rounds` interleaved rounds of
    `sweeps` passes over every layer."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t = time.perf_counter()
            for s in range(sweeps):
                for i in range(n_layers):
                    call(i, s)
            times[name].append((time.perf_counter() - t) / (sweeps * n_layers) * 1e6)
    return {name: float(np.median(v)) for name, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--profile", help="thresholds for --sparsity (default: profiled here, as decode.py does)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sweeps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    out = Report(args.json)
    model = load_model(args.model)
    kernels.set_threads(args.threads)
    kernels.warmup()
    profile = load_profile(args.profile) if args.profile else quick_profile(model)
    tr, cfg, layers = model.transformer, model.config, model.weights.layers
    act = cfg.activation
    thresholds = profile.thresholds(args.sparsity)
    h: list[list[np.ndarray]] = [[] for _ in layers]  # per layer, its input at each decode step

    def record(layer: int, x: np.ndarray) -> np.ndarray:
        h[layer].append(x.copy())
        return tr.dense_ffn(layer, x)

    prompt = model.tokenizer.encode(PROMPT)
    cache = tr.new_cache(len(prompt) + STEPS)
    tok = int(tr.forward(prompt, cache).argmax())
    for _ in range(STEPS):
        tok = int(tr.forward([tok], cache, record).argmax())
    down_t = [kernels.transpose_down(L.down) for L in layers]
    n, n_ff = len(layers), cfg.n_ff
    every, half = np.arange(n_ff), np.sort(np.random.default_rng(0).choice(n_ff, n_ff // 2, replace=False))
    dense = [kernels.dense_ffn_step(L.gate, L.up, L.down, act) for L in layers]
    steps = {name: [kernels.threshold_ffn_step(L.gate, L.up, d, act, t)
                    for L, d, t in zip(layers, down_t, ts)]
             for name, ts in (("none", [1e30] * n), ("level", thresholds), ("all", [-1.0] * n))}
    kept = sum(steps["level"][i](xi)[1] for i in range(n) for xi in h[i]) / (n * STEPS * n_ff)
    x = lambda i, s: h[i][s % STEPS]  # noqa: E731  (layer i's input in sweep s)
    calls = {
        "dense (dense_ffn_step)": lambda i, s: dense[i](x(i, s)),
        "threshold kernel keeping none (gate and up only)": lambda i, s: steps["none"][i](x(i, s)),
        f"threshold kernel at the {args.sparsity:g} level ({kept:.1%} kept)": lambda i, s: steps["level"][i](x(i, s)),
        "threshold kernel keeping every neuron": lambda i, s: steps["all"][i](x(i, s)),
        "sparse_ffn, every neuron": lambda i, s: kernels.sparse_ffn(layers[i].gate, layers[i].up, down_t[i], every,
                                                                   x(i, s), act),
        "sparse_ffn, half the neurons": lambda i, s: kernels.sparse_ffn(layers[i].gate, layers[i].up, down_t[i], half,
                                                                       x(i, s), act),
    }
    us = sweep_us(calls, n, args.sweeps, args.rounds)

    def token_ms() -> float:
        c = tr.new_cache(len(prompt) + 40)
        tr.forward(prompt, c)
        t = time.perf_counter()
        for t_id in prompt[:32]:
            tr.forward([t_id], c)
        return (time.perf_counter() - t) / 32 * 1e3

    token = float(np.median([token_ms() for _ in range(5)]))
    out.note(f"machine: {machine()}; {args.threads} threads")
    out.table("one token's FFN, every layer in turn (us a layer)", ["call", "us"], [[k, round(v, 2)] for k, v in us.items()])
    L = layers[0]
    gate_up = (L.gate.nbytes + L.up.nbytes) / 1e6
    dn = L.down.nbytes / 1e6
    share = n * us["dense (dense_ffn_step)"] / 1e3 / token
    layouts = [(f"{down_t[0].qtype} rows (transpose_down)", kept * n_ff * down_t[0].row_bytes / 1e6)]
    scales = {"q4_1": 4, "q4_0": 2}.get(L.down.qtype)  # bytes of a block's scales (d, m) in the stored down
    if scales:  # the weights' own nibbles, neuron-major; a block's scales serve its 32 neurons
        layouts.append(("exact 4-bit: the nibbles, scales shared by 32 neurons",
                        (kept * n_ff * cfg.d_model / 2 + n_ff // 32 * cfg.d_model * scales) / 1e6))
    layouts.append(("the kept share of the stored down bytes (no layout reaches it)", kept * dn))
    rows = []
    for name, b in layouts:
        f = (gate_up + b) / (gate_up + dn)
        rows.append([name, round(b, 3), round(f, 3), f"{1 / (1 - share * (1 - f)):.3f}x"])
    out.note(f"dense FFN {gate_up + dn:.3f} MB a layer (gate and up {gate_up:.3f}, down {dn:.3f}); a decode token "
             f"{token:.2f} ms, the dense FFN {share:.0%} of it")
    out.table("threshold mode's bound at that level", ["neuron-major down", "MB a layer", "FFN bytes vs dense",
                                                       "token bound"], rows)
    out.close()


if __name__ == "__main__":
    main()
