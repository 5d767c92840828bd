"""Hybrid GPU/CPU execution of a plan against the layer split `-ngl` makes, all on the CPU and all on
the GPU, side by side in one run (issue #16).

    python benchmarks/hybrid.py [--device cuda|cpu] [--shape llama2-7b] [--gpu-share 0.3] [--threads 8]
                                [--tokens 32] [--json]

A random-weight model of the shape (Q4_0, generated here: the benchmark measures bytes moved and
computed, not text) decodes `--tokens` tokens after a warm-up, its FFN active sets taken from the
synthetic ReLU-like trace (`hetinfer/offload/trace.py`: `--density` of neurons per token, 20% of
neurons serving 80% of activations, reuse across tokens), drawn before timing. The store is built
once, each layer's neurons hot to cold, so every configuration's GPU part is a prefix of positions:
The GPU budget holds the dense parts (output head, every layer's attention and KV cache, scratch) plus
`--gpu-share` of the FFN's bytes as the engine holds them (or `--gpu-mem` bytes):
- hybrid: the dense parts on the GPU as the cost model places them (head, then layers' attention while
  they fit: `place_dense`), then the hottest neurons of the whole model in the rest, the other neurons
  in RAM; hetinfer's TieredFFN + GPUExecutor, attention on the GPU (`model.place_layers`);
- layer split: the head, then whole layers (attention, KV cache and dense FFN in their stored bytes)
  on the GPU while they fit the same budget, the other layers dense on the CPU (what llama.cpp's -ngl
  does; its CUDA build is not available here, so hetinfer's own dense engine runs both sides);
- cpu only: the same sparse engine with everything in RAM;
- gpu only: everything on the GPU (uncapped; the upper bound).
Predictions are the placement cost model's (`placement.cost.evaluate`) for the same split, with the
hardware `hetinfer place` measures here (a what-if GPU with assumed speeds when there is no CUDA:
`--device cpu` runs the GPU side on the CPU stand-in, to check this script; its numbers say nothing
about a GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np
import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._util import machine, table  # noqa: E402
from hetinfer import kernels  # noqa: E402
from hetinfer.config import ModelConfig  # noqa: E402
from hetinfer.loader import Model  # noqa: E402
from hetinfer.model import LayerWeights, Transformer, Weights, place_layers, vec  # noqa: E402
from hetinfer.offload.deploy import tiered_ffn  # noqa: E402
from hetinfer.offload.gpu import GPUExecutor  # noqa: E402
from hetinfer.offload.store import build_store  # noqa: E402
from hetinfer.offload.trace import Trace, TraceConfig  # noqa: E402
from hetinfer.placement import probe  # noqa: E402
from hetinfer.placement.cost import GPU, RAM, build_problem, evaluate, place_dense, row_bytes, weight_sizes  # noqa: E402
from hetinfer.placement.hardware import Hardware, format_size  # noqa: E402
from hetinfer.tensors import BLOCK_FORMATS, QTensor  # noqa: E402

SHAPES = {  # layers, d_model, n_ff, heads, vocab
    "llama2-7b": (32, 4096, 11008, 32, 32000),
    "llama2-13b": (40, 5120, 13824, 40, 32000),
    "tiny": (4, 256, 1024, 4, 1000),  # checks the script in seconds
}
QTYPE = "q4_0"
CONFIGS = ("hybrid", "layer_split", "cpu_only", "gpu_only")


def shape_config(name: str) -> ModelConfig:
    n_layers, d, n_ff, heads, vocab = SHAPES[name]
    return ModelConfig(arch="llama", n_layers=n_layers, d_model=d, n_ff=n_ff, n_heads=heads, n_kv_heads=heads,
                       head_dim=d // heads, vocab_size=vocab, context_length=4096, name=f"{name}-shaped random")


def random_blocks(rng: np.random.Generator, rows: int, cols: int) -> QTensor:
    """A [rows, cols] QTYPE weight made as bytes (quantizing billions of random floats would take minutes):
    uniform random quants, every block's scale 1 / (8 sqrt(cols)) so products stay near unit size. Read-only,
    as a model file's mapped weights are, so that the CPU's dense layers run packed, their best way."""
    block, nbytes = BLOCK_FORMATS[QTYPE]
    data = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    data[..., :2] = np.array([1 / (8 * np.sqrt(cols))], np.float16).view(np.uint8)
    data.flags.writeable = False
    return QTensor(QTYPE, (rows, cols), data.reshape(rows, -1))


def random_model(cfg: ModelConfig, seed: int = 0) -> Model:
    rng = np.random.default_rng(seed)
    d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
    ones = vec(np.ones(d))
    layers = [LayerWeights(attn_norm=ones, wq=random_blocks(rng, d, d), wk=random_blocks(rng, kv, d),
                           wv=random_blocks(rng, kv, d), wo=random_blocks(rng, d, d), ffn_norm=ones,
                           gate=random_blocks(rng, cfg.n_ff, d), up=random_blocks(rng, cfg.n_ff, d),
                           down=random_blocks(rng, d, cfg.n_ff)) for _ in range(cfg.n_layers)]
    w = Weights(embed=random_blocks(rng, cfg.vocab_size, d), output_norm=ones,
                output=random_blocks(rng, cfg.vocab_size, d), layers=layers)
    return Model(cfg.name, cfg, w, None, Transformer(cfg, w), {}, f"random-{seed}")


def hottest(freq: np.ndarray, n: int) -> np.ndarray:
    """Neurons per layer among the model's n most frequently active (ties broken by layer, then id)."""
    flat = np.argsort(-freq, axis=None, kind="stable")[:n]
    return np.bincount(flat // freq.shape[1], minlength=freq.shape[0]).astype(np.int64)


class TimedDenseFFN:
    """The model's own dense FFN (`Transformer.dense_ffn`: a layer on the GPU there, the others on the CPU),
    timing each side (the GPU's synchronised)."""

    def __init__(self, tr: Transformer, device: torch.device):
        self.tr, self.sync = tr, (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self.gpu_s = self.cpu_s = 0.0

    def __call__(self, layer: int, h):
        t0 = time.perf_counter()
        y = self.tr.dense_ffn(layer, h)
        if type(h) is np.ndarray:
            self.cpu_s += time.perf_counter() - t0
        else:
            self.sync()
            self.gpu_s += time.perf_counter() - t0
        return y


def decode(model: Model, ffn, warm: int, tokens: int, on_start=lambda: None) -> float:
    """Seconds per token of `tokens` one-token decode steps after `warm` untimed ones."""
    tr, rng = model.transformer, np.random.default_rng(1)
    cache = tr.new_cache(warm + tokens + 1)
    ids = rng.integers(0, model.config.vocab_size, warm + tokens).tolist()
    for t in ids[:warm]:
        tr.forward([t], cache, ffn)
    on_start()
    t0 = time.perf_counter()
    for t in ids[warm:]:
        tr.forward([t], cache, ffn)
    return (time.perf_counter() - t0) / tokens


def predict(problem, tiers: np.ndarray) -> float:
    """tok/s the cost model expects for `tiers` (uint8 [n_layers, n_ff], in store positions)."""
    return 1.0 / evaluate(problem, tiers).seconds


@contextlib.contextmanager
def on_gpu(model: Model, device: torch.device, dense, ffn_layers: int = 0):
    """Place the head and the layers' attention that the dense placement puts on the GPU there, with the dense
    FFN of the first `ffn_layers` layers (`place_layers`); yields how many layers' attention moved, and puts the
    model back afterwards."""
    w = model.weights
    saved = ([dataclasses.replace(L) for L in w.layers], w.output, w.output_norm)
    attn = np.flatnonzero(dense.attn_on_gpu)
    try:
        if ffn_layers:
            place_layers(model.transformer, device, range(ffn_layers), ffn=True)
        place_layers(model.transformer, device, attn, head=dense.head_on_gpu)
        yield len(attn)
    finally:
        w.layers[:], w.output, w.output_norm = saved
        model.transformer.update_devices()


def run_shape(args: argparse.Namespace, device: torch.device, workdir: str) -> dict:
    cfg = shape_config(args.shape)
    L, n_ff, d = cfg.n_layers, cfg.n_ff, cfg.d_model
    t0 = time.perf_counter()
    model = random_model(cfg)
    trace = Trace(TraceConfig(L, n_ff, density=args.density))
    order = [np.argsort(-trace.freq[i], kind="stable") for i in range(L)]  # positions hot to cold
    freq = np.stack([trace.freq[i][order[i]] for i in range(L)]).astype(np.float64)  # by position
    store = build_store(model, os.path.join(workdir, f"{args.shape}.store"), np.ones((L, n_ff), np.uint8), order,
                        progress=not args.json)
    n = args.warm + args.tokens
    sets = [[trace.active(i, t) for i in range(L)] for t in range(n)]
    _log(args, f"model and store ready in {time.perf_counter() - t0:.0f} s")

    neuron = sum(row_bytes(d, q) for q in store.qtypes)  # as the engine holds it
    Lw = model.weights.layers[0]
    ffn_layer = Lw.gate.nbytes + Lw.up.nbytes + Lw.down.nbytes  # a layer's FFN as stored (layer split)
    sizes = weight_sizes(cfg, model.weights, n)
    reserved = sizes.scratch_bytes + sizes.gpu_decode_bytes
    attn_layer = int(sizes.layer_bytes[0]) + sizes.kv_bytes  # a layer's attention and its KV cache
    dense_bytes = reserved + sizes.head_bytes + L * attn_layer  # every dense part on the GPU
    budget = args.gpu_mem or int(dense_bytes + args.gpu_share * L * n_ff * neuron)
    t0 = time.perf_counter()
    # capacities only decide which tiers the cost model prices (gpu_only is uncapped): room for every neuron
    hw = probe.detect(gpu_mem=L * n_ff * neuron + dense_bytes, ram=psutil.virtual_memory().available, qtype=QTYPE,
                      d_model=d, config=cfg, attn_qtype=QTYPE)
    _log(args, f"hardware probed in {time.perf_counter() - t0:.0f} s ({', '.join(sorted(set(hw.sources.values())))})")

    def dense_with(gpu_bytes: int | None):  # the cost model's dense placement with that much GPU memory
        gpu = None if gpu_bytes is None else dataclasses.replace(hw.gpu, capacity_bytes=int(gpu_bytes))
        return place_dense(sizes, Hardware(ram=hw.ram, gpu=gpu))

    # hybrid: the dense parts first (head, then layers' attention while they fit), then the hottest neurons
    dense = {"hybrid": dense_with(budget), "cpu_only": dense_with(None), "gpu_only": dense_with(dense_bytes)}
    n_gpu = hottest(freq, max(0, budget - dense["hybrid"].gpu_bytes) // neuron)
    # layer split: the head, then whole layers (attention, KV cache and dense FFN) while they fit, as -ngl
    head = sizes.head_bytes if reserved + sizes.head_bytes <= budget else 0
    k = int(min(L, max(0, budget - reserved - head) // (attn_layer + ffn_layer)))
    dense["layer_split"] = dense_with(reserved + head + k * attn_layer)
    sparse = build_problem(freq, cfg, sizes, hw, 0)
    full = build_problem(np.ones((L, n_ff)), cfg, dataclasses.replace(sizes, neuron_bytes=np.full(L, ffn_layer // n_ff)),
                         hw, 0)
    split_at = lambda counts: np.where(np.arange(n_ff) < counts[:, None], GPU, RAM).astype(np.uint8)  # noqa: E731
    neurons = {"hybrid": n_gpu, "cpu_only": np.zeros(L, np.int64), "gpu_only": np.full(L, n_ff),
               "layer_split": np.where(np.arange(L) < k, n_ff, 0)}
    predicted = {}
    for name in CONFIGS:
        problem = full if name == "layer_split" else sparse
        problem.dense = dense[name]
        predicted[name] = predict(problem, split_at(neurons[name]))

    results = {}
    for name in CONFIGS:
        t1 = time.perf_counter()
        with on_gpu(model, device, dense[name], k if name == "layer_split" else 0) as attn_layers:
            if name == "layer_split":
                ffn = TimedDenseFFN(model.transformer, device)
                s = decode(model, ffn, args.warm, args.tokens,
                           lambda: setattr(ffn, "gpu_s", 0.0) or setattr(ffn, "cpu_s", 0.0))
                results[name] = {"tok_s": 1 / s, "ffn_gpu_ms": 1e3 * ffn.gpu_s / args.tokens,
                                 "ffn_cpu_ms": 1e3 * ffn.cpu_s / args.tokens, "transfer_ms": None, "overlap": None}
            else:
                g = neurons[name]
                ex = None
                if g.any() or attn_layers:
                    ex = GPUExecutor(store, g, device, cfg.activation, attention_layers=attn_layers)
                # a layer whose attention is on the GPU picks its set there, as its predictor would
                on_device = [[torch.from_numpy(a).to(device) for a in row] for row in sets] if attn_layers else None
                ffn = tiered_ffn(store, None, lambda layer, h: sets[max(ffn.token, 0)][layer], n_ff - g,
                                 np.zeros(L, np.int64), 0, cfg.activation, threads=2, lookahead=False, gpu=ex,
                                 device_select=(lambda layer, h: on_device[ffn.token][layer]) if attn_layers else None)
                s = decode(model, ffn, args.warm, args.tokens, ffn.reset_stats)
                r = ffn.report()
                results[name] = {"tok_s": 1 / s, "ffn_gpu_ms": 1e3 * r.get("gpu_s_per_token", 0.0),
                                 "ffn_cpu_ms": 1e3 * r.get("gpu_cpu_side_s_per_token", r["compute_s_per_token"]),
                                 "transfer_ms": 1e3 * r.get("transfer_s_per_token", 0.0),
                                 "overlap": r.get("gpu_overlap"), "ffn_density": r["ffn_density"]}
                if ex is not None:
                    ex.close()
        results[name].update(predicted_tok_s=predicted[name], gpu_attention_layers=attn_layers,
                             head_on_gpu=bool(dense[name].head_on_gpu))
        ffn = None
        _log(args, f"{name}: {results[name]['tok_s']:.2f} tok/s ({time.perf_counter() - t1:.0f} s)")

    return {
        "model": cfg.name, "qtype": QTYPE, "gpu_budget_bytes": budget,
        "tok_s": results["hybrid"]["tok_s"], "layer_split_tok_s": results["layer_split"]["tok_s"],
        "cpu_only_tok_s": results["cpu_only"]["tok_s"], "gpu_only_tok_s": results["gpu_only"]["tok_s"],
        "predicted_tok_s": predicted["hybrid"],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu stand-in (not GPU numbers)",
        "gpu_neurons": int(n_gpu.sum()), "gpu_layers_split": int(k), "density": args.density,
        "threads": args.threads, "tokens": args.tokens, "hardware_sources": hw.sources, "configs": results,
        "machine": machine(),
    }


def report(rec: dict) -> str:
    rows = []
    for name, r in rec["configs"].items():
        fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
        rows.append([name, fmt(r["tok_s"]), fmt(r["predicted_tok_s"]), f"{r['gpu_attention_layers']}"
                     f"{' + head' if r['head_on_gpu'] else ''}", fmt(r["ffn_gpu_ms"]), fmt(r["ffn_cpu_ms"]),
                     fmt(r["transfer_ms"], "{:.3f}"), fmt(r["overlap"], "{:.0%}")])
    head = (f"{rec['model']} {rec['qtype']} on {rec['device']}; GPU budget {format_size(rec['gpu_budget_bytes'])} "
            f"({rec['gpu_neurons']:,} hot neurons, or {rec['gpu_layers_split']} whole layers); density "
            f"{rec['density']:.0%}; {rec['threads']} CPU threads; {rec['tokens']} tokens\n{rec['machine']}")
    ratio = rec["tok_s"] / rec["layer_split_tok_s"]
    return (head + "\n" + table(["config", "tok/s", "predicted", "attention on GPU", "FFN GPU ms/tok", "FFN CPU ms/tok",
                                 "transfer ms/tok", "overlap"], rows) + f"\nhybrid / layer split: {ratio:.2f}x")


def _log(args: argparse.Namespace, msg: str) -> None:
    print(f"[{msg}]", file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu: the CPU stand-in, to check this script")
    p.add_argument("--shape", choices=SHAPES, default="llama2-7b")
    p.add_argument("--gpu-share", type=float, default=0.3, help="GPU budget as a share of the FFN's bytes (default 0.3)")
    p.add_argument("--gpu-mem", type=int, help="GPU budget in bytes instead of --gpu-share")
    p.add_argument("--density", type=float, default=0.1, help="share of neurons active per token (default 0.1)")
    p.add_argument("--threads", type=int, default=8, help="CPU threads (default 8)")
    p.add_argument("--tokens", type=int, default=32, help="timed decode tokens per configuration (default 32)")
    p.add_argument("--warm", type=int, default=4, help="untimed decode tokens first (default 4)")
    p.add_argument("--workdir", help="directory for the store (default: a temporary one, removed after)")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of the table")
    p.add_argument("--save", metavar="PATH", help="also write the JSON record to PATH")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run this on a machine with a GPU (or pass --device cpu to check the script)")
    kernels.set_threads(args.threads)
    torch.set_num_threads(args.threads)
    kernels.warmup()
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        rec = run_shape(args, device, workdir)
    if args.save:
        with open(args.save, "w") as f:
            f.write(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(rec) if args.json else report(rec))


if __name__ == "__main__":
    main()
