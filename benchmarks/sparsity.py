"""What FFN sparsity costs in quality on held-out text: dense vs oracle top-k vs threshold vs predictors.

    python benchmarks/sparsity.py [--profile out/smollm2.profile] [--predictors out/smollm2.predictors ...]
                                  [--tokens 8192] [--json PATH]

Calibration: the first 70% of WikiText-2 valid plus MT-Bench through the chat template (100k
tokens). Evaluation: the last 30% of WikiText-2 valid, which neither the profile nor the
predictors saw. A missing profile or predictors directory is created first (and timed).
Also reported: frequency skew, and how many 16-neuron blocks one token touches in the
profile's co-activation order vs the natural and the hot-first orders (for the flash store).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._util import machine, table  # noqa: E402

from hetinfer import sparse  # noqa: E402
from hetinfer.data import calibration_sequences, parse_source  # noqa: E402
from hetinfer.loader import load_model  # noqa: E402
from hetinfer.profiler.runner import ACT  # noqa: E402
from hetinfer.profiler.artifact import load_profile  # noqa: E402
from hetinfer.profiler.collect import ProfileOptions, profile_sequences  # noqa: E402
from hetinfer.profiler.evaluate import eval_windows, evaluate  # noqa: E402
from hetinfer.profiler.predictors import TrainOptions, load_predictors  # noqa: E402
from hetinfer.profiler.train import train_predictors  # noqa: E402
from hetinfer.profiler.runner import FloatWeights, LayerRunner, Packed  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
BLOCK = 16


def ensure_profile(model, path: str) -> float | None:
    """Profile 100k calibration tokens into `path` unless it exists; returns the seconds it took."""
    if os.path.exists(path):
        return None
    text, chat = os.path.join(DATA, "wikitext-2", "valid.txt"), os.path.join(DATA, "mt_bench", "question.jsonl")
    seqs, sources = calibration_sequences([parse_source(f"{text}[:0.7]"), parse_source(chat)], model.tokenizer, 100_000)
    t0 = time.perf_counter()
    p = profile_sequences(model, seqs, ProfileOptions(), sources, progress=True)
    seconds = time.perf_counter() - t0
    p.manifest["seconds"] = round(seconds, 1)
    p.save(path)
    return seconds


def ensure_predictors(model, profile, path: str) -> float | None:
    if os.path.exists(path):
        return None
    t0 = time.perf_counter()
    preds, _ = train_predictors(model, profile, TrainOptions(), progress=True)
    preds.manifest["seconds"] = round(time.perf_counter() - t0, 1)
    preds.save(path)
    return time.perf_counter() - t0


def gate_topk_ffn(model, keep: float, w: FloatWeights) -> sparse.SparseFFN:
    """Each token keeps its `keep` fraction of neurons with the largest |act(gate h)| (CATS-style selection from the
    exact, full-rank gate; the up product is not consulted): what a predictor that learnt the gate perfectly gets."""
    k = max(1, round(keep * model.config.n_ff))
    act = ACT[model.config.activation]

    def rule(layer: int, h: torch.Tensor, _act) -> torch.Tensor:
        g = act(h @ w.layer(layer).gate.T).abs()
        return torch.zeros(g.shape, dtype=torch.bool).scatter_(1, g.topk(k, dim=1).indices, True)

    return sparse.SparseFFN(model, rule, True, "torch", w, f"gate top-{keep:g}")


def blocks_touched(model, profile, windows, n_tokens: int = 2048) -> dict[str, float]:
    """Mean number of BLOCK-neuron blocks holding at least one active neuron (50% level), per token and
    layer, for neurons stored in natural order, hottest first, or in the profile's co-activation order."""
    t = torch.from_numpy(profile.thresholds(0.5))
    w = FloatWeights(model)
    freq = profile.activation_frequency(0.5)
    orders = {"natural": [np.arange(profile.n_ff)] * profile.n_layers,
              "hot first": [np.argsort(-freq[i], kind="stable") for i in range(profile.n_layers)],
              "co-activation": [profile.neuron_order(i) for i in range(profile.n_layers)]}
    counts = {k: [] for k in orders}

    def record(layer: int, h: torch.Tensor) -> torch.Tensor:
        act = w.gate_up(layer, h)
        active = (act.abs() > t[layer]).numpy()
        for k, order in orders.items():
            blocks = active[:, order[layer]].reshape(len(active), -1, BLOCK).any(2)
            counts[k].append(blocks.sum(1).mean())
        return w.ffn_out(layer, act)

    picked, n = [], 0
    for win in windows:
        if n >= n_tokens:
            break
        picked.append(win.tokens)
        n += len(win.tokens)
    LayerRunner(model, Packed(picked), w).run(record)
    return {k: float(np.mean(v)) for k, v in counts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model")
    ap.add_argument("--profile", default="out/smollm2.profile")
    ap.add_argument("--predictors", nargs="+", default=["out/smollm2.predictors"])
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored (default 8192)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if not os.path.isdir(DATA):
        sys.exit(f"shared data not found at {DATA}: clone the project next to ../shared")
    print(machine(), file=sys.stderr)
    model = load_model(args.model)
    profile_s = ensure_profile(model, args.profile)
    profile = load_profile(args.profile, model)
    train_s = [ensure_predictors(model, profile, p) for p in args.predictors]
    predictors = {p: load_predictors(p, model) for p in args.predictors}

    w = FloatWeights(model)
    ffns = {"dense": None,
            "oracle top-50%": sparse.topk_ffn(model, 0.5, "torch", w),
            "oracle top-30%": sparse.topk_ffn(model, 0.3, "torch", w),
            "threshold 50%": sparse.threshold_ffn(model, profile, 0.5, "torch", w),
            "threshold 70%": sparse.threshold_ffn(model, profile, 0.7, "torch", w),
            "gate top-50%": gate_topk_ffn(model, 0.5, w)}
    for path, p in predictors.items():
        opts = p.manifest["options"]
        how = f"density {opts['density']:g}" if opts.get("density") is not None else f"recall {opts['recall']:g}"
        ffns[f"predictor ({how})"] = sparse.predictor_ffn(model, p, "torch", w)
    held_out = parse_source(os.path.join(DATA, "wikitext-2", "valid.txt") + "[0.7:]")
    windows = eval_windows([held_out], model.tokenizer, args.window, args.stride, args.tokens)
    t0 = time.perf_counter()
    results = evaluate(model, windows, ffns, w, progress=True)
    # the oracle at each predictor's achieved density: what a perfect predictor would cost at the same budget
    same = {f"oracle at {r.mode}'s density": sparse.topk_ffn(model, r.ffn_density, "torch", w)
            for r in results.values() if r.mode.startswith("predictor")}
    results.update(evaluate(model, windows, same, w, progress=True))
    eval_s = time.perf_counter() - t0

    rows = [[r.mode, f"{r.perplexity:.3f}", f"{r.perplexity / r.dense_perplexity:.4f}", f"{r.top1_agreement:.2%}",
             f"{r.kl:.4f}", f"{r.ffn_density:.3f}"] for r in results.values()]
    print(f"\nheld-out tokens scored: {next(iter(results.values())).tokens} (window {args.window}, stride {args.stride})")
    print(table(["mode", "perplexity", "x dense", "top-1 agreement", "KL(dense||sparse)", "FFN density"], rows))
    for path, p in predictors.items():
        s = p.manifest["summary"]
        print(f"{path}: median recall of activation mass {s['median_recall']:.3f}, validation density "
              f"{s['mean_density']:.3f}, parameters {s['param_ratio']:.1%} of FFN, FLOPs {s['flops_vs_saved']:.1%} "
              f"of the FFN FLOPs saved, ranks {sorted({r['rank'] for r in p.manifest['report']})}")
    summ = profile.manifest["summary"]
    print(f"profile: {profile.tokens} tokens" + (f", made in {profile_s:.0f} s" if profile_s else
                                                   f", made in {profile.manifest.get('seconds', float('nan')):.0f} s"))
    print("share of active neuron-tokens held by the 20% most frequently active neurons: "
          + ", ".join(f"{float(k):.0%} sparsity {v:.1%}" for k, v in summ["top20_share"].items()))
    touched = blocks_touched(model, profile, windows)
    print(f"{BLOCK}-neuron blocks touched per token and layer (of {profile.n_ff // BLOCK}): "
          + ", ".join(f"{k} {v:.1f}" for k, v in touched.items()))
    print(f"eval took {eval_s:.0f} s for {len(ffns)} modes", file=sys.stderr)
    if args.json:
        out = {"machine": machine(), "results": {k: r.to_dict() for k, r in results.items()},
               "profile_seconds": profile_s or profile.manifest.get("seconds"), "train_seconds": train_s,
               "predictors": {k: p.manifest["summary"] for k, p in predictors.items()},
               "top20_share": summ["top20_share"], "blocks_touched": touched}
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
