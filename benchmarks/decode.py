"""End-to-end greedy decode: hetinfer's dense engine on the kernels vs llama.cpp, same GGUF, one run.

    python benchmarks/decode.py [--model PATH] [--threads 2] [--tokens 128] [--reps 3] [--weights native]
                                [--kv f32] [--prompt-tokens 64] [--profile PROFILE] [--predictors DIR] [--json]

A `--prompt-tokens` prompt (64; thousands to decode at a long context), then `--tokens` greedy
tokens; decode tok/s excludes the prompt (reported separately) and the kernels' compile time (warmup, reported
separately). Runs are interleaved (llama.cpp, then each hetinfer mode, each round starting one mode later)
and medians are reported.
The ratios are paired: each round's ratio of two modes run seconds apart, then the median over rounds (and
their range), so a machine whose speed drifts between rounds moves both sides of a ratio together.

hetinfer modes:
  dense            every FFN neuron (the engine's dense path)
  oracle 50%       per token and layer, only the half of the FFN neurons with the largest |act(g) * u| of
                   the dense run (recorded beforehand, so a perfect, free predictor); one fused sparse_ffn call
                   on gate/up rows plus the neuron-major q8_0 down copy.
  threshold 50%    the engine's threshold mode (`--sparsity 0.5 --profile`): per layer, neurons whose
                   |act(g) * u| passes the profiled threshold, one fused threshold_ffn call (every gate and up
                   row, the kept neurons' down rows). "(fused kernel)": on every layer; "(engine)": as
                   generate runs it, layers where this machine's probe finds the kernel slower than dense
                   stepped aside to dense_ffn (how many: the last column). Thresholds from --profile, or
                   from PROFILE_TOKENS tokens of WikiText-2 (the first 70% of valid.txt) profiled here.
  predictor        with --predictors DIR (from `hetinfer train-predictors`): the engine's predictor mode, the
                   rows its low-rank predictors pick (one predict_rows call per layer), then sparse_ffn;
                   "(every layer)" and "(engine)" as for threshold mode.
Sparse modes are teacher-forced on the dense run's tokens, so "top-1 = dense" is the per-step
agreement of their greedy choice with the dense engine (the quality cost of skipping).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._util import llama_cpp_build, machine, table  # noqa: E402
from hetinfer import heap, kernels  # noqa: E402
from hetinfer.errors import HetinferError  # noqa: E402
from hetinfer.loader import default_model_path, load_model  # noqa: E402
from hetinfer.data import calibration_sequences, parse_source  # noqa: E402
from hetinfer.profiler.artifact import load_profile  # noqa: E402
from hetinfer.profiler.collect import ProfileOptions, profile_sequences  # noqa: E402
from hetinfer.profiler.predictors import load_predictors  # noqa: E402
from hetinfer.sparse import predictor_ffn, threshold_density, threshold_ffn  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
PROFILE_TOKENS = 8192

PROMPT = ("Memory hierarchies trade capacity for speed: registers, caches, main memory and flash each hold more "
          "than the level above and answer more slowly. Large language models stress every level at once, "
          "because each generated token reads all of the weights. ")


def llama_decode(llm, prompt: list[int], n: int):
    """(prefill s, decode s, decode CPU s, tokens): greedy with argmax over llama.cpp's logits (no Python
    sampler)."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    logits = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))  # noqa: E731
    tok = int(np.argmax(logits()))
    t1, c1 = time.perf_counter(), time.process_time()
    out = [tok]
    for _ in range(n):
        llm.eval([tok])
        tok = int(np.argmax(logits()))
        out.append(tok)
    return t1 - t0, time.perf_counter() - t1, time.process_time() - c1, out


def _het_decode(tr, prompt: list[int], n: int, ffn=None, forced: list[int] | None = None, kv: str = "f32"):
    """(prefill s, decode s, decode CPU s, tokens), with a KV cache of element type `kv`. With `forced`, feed
    those tokens instead of our own argmax."""
    cache = tr.new_cache(len(prompt) + n + 1, kv)
    t0 = time.perf_counter()
    tok = int(tr.forward(prompt, cache).argmax())
    t1, c1 = time.perf_counter(), time.process_time()
    out = [tok]
    for i in range(n):
        feed = forced[i] if forced else tok
        tok = int(tr.forward([feed], cache, ffn=ffn).argmax())
        out.append(tok)
    return t1 - t0, time.perf_counter() - t1, time.process_time() - c1, out


class OracleFFN:
    """Records (dense run) or replays (sparse run) the top `keep` fraction of neurons per token and layer."""

    def __init__(self, tr, keep: float):
        self.tr, self.keep, self.sets, self.i = tr, keep, [], 0
        self.down_t = [kernels.transpose_down(L.down) for L in tr.w.layers]
        self.act = tr.cfg.activation

    def record(self, layer: int, h: np.ndarray) -> np.ndarray:
        L = self.tr.w.layers[layer]
        a = kernels.gate_up(L.gate, L.up, h, self.act)
        k = int(round(self.keep * a.shape[1]))
        self.sets.append(np.sort(np.argpartition(-np.abs(a[0]), k)[:k]))
        return kernels.linear(L.down, a)

    def replay(self, layer: int, h: np.ndarray) -> np.ndarray:
        L = self.tr.w.layers[layer]
        rows = self.sets[self.i]
        self.i += 1
        return kernels.sparse_ffn(L.gate, L.up, self.down_t[layer], rows, h, self.act)


def quick_profile(model):
    """Thresholds for threshold mode when no --profile is given: PROFILE_TOKENS calibration tokens."""
    text = os.path.join(DATA, "wikitext-2", "valid.txt")
    if not os.path.exists(text):
        sys.exit(f"shared data not found at {text}: pass --profile PROFILE, or clone the project next to ../shared")
    seqs, sources = calibration_sequences([parse_source(f"{text}[:0.7]")], model.tokenizer, PROFILE_TOKENS)
    return profile_sequences(model, seqs, ProfileOptions(samples=256), sources)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--weights", default="native", choices=["native", "f16", "f32"])
    p.add_argument("--kv", default="f32", choices=["f32", "f16"],
                   help="hetinfer's KV-cache element type (llama.cpp's cache is f16, its default)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length: decode starts at this position")
    p.add_argument("--profile", metavar="PROFILE", help="threshold mode's per-layer thresholds (default: profiled here)")
    p.add_argument("--predictors", metavar="DIR", help="also time predictor mode with these predictors")
    p.add_argument("--json", action="store_true", help="print one record per mode as JSON instead of the table")
    args = p.parse_args()
    path = args.model or default_model_path()
    host = machine()  # with the load average at the start

    kernels.set_threads(args.threads)
    compile_s = kernels.warmup()
    model = load_model(path, weights=args.weights)
    heap.freeze()  # as `hetinfer generate` does once the model is loaded
    tr = model.transformer
    n_prompt = args.prompt_tokens
    prompt = model.tokenizer.encode(PROMPT * (n_prompt // 40 + 2))[:n_prompt]
    assert len(prompt) == n_prompt

    from llama_cpp import Llama

    llm = Llama(model_path=path, n_threads=args.threads, n_ctx=max(512, n_prompt + args.tokens + 8), verbose=False)

    oracle = OracleFFN(tr, 0.5)
    het_decode = functools.partial(_het_decode, kv=args.kv)
    het_decode(tr, prompt, 8)  # first-call effects (page-in, allocator) outside the timed runs
    dense_tokens = het_decode(tr, prompt, args.tokens, ffn=oracle.record)[-1]  # records the oracle sets
    profile = load_profile(args.profile) if args.profile else quick_profile(model)
    fused = threshold_ffn(model, profile, 0.5)
    engine_thresh = threshold_ffn(model, profile, 0.5)
    engine_thresh.step_aside(threshold_density(profile, 0.5), "threshold")  # as engine_ffn does, probe included
    forced = dense_tokens[:-1]  # sparse modes are teacher-forced on the dense tokens: top-1 agreement per step

    def oracle_run():
        oracle.i = 0
        return het_decode(tr, prompt, args.tokens, oracle.replay, forced)

    dense_mode = f"hetinfer dense ({args.weights}, kv {args.kv})"
    modes = {
        "llama.cpp": lambda: llama_decode(llm, prompt, args.tokens),
        dense_mode: lambda: het_decode(tr, prompt, args.tokens),
        "hetinfer oracle 50%": oracle_run,
        "hetinfer threshold 50% (fused kernel)": lambda: het_decode(tr, prompt, args.tokens, fused, forced),
        "hetinfer threshold 50% (engine)": lambda: het_decode(tr, prompt, args.tokens, engine_thresh, forced),
    }
    stepped = {"hetinfer threshold 50% (fused kernel)": fused, "hetinfer threshold 50% (engine)": engine_thresh}
    if args.predictors:
        preds = load_predictors(args.predictors, model)
        predicted = predictor_ffn(model, preds)
        engine_pred = predictor_ffn(model, preds)
        engine_pred.step_aside(preds.density(), "sparse", [w.shape[0] for w in preds.w1])
        modes["hetinfer predictor (every layer)"] = lambda: het_decode(tr, prompt, args.tokens, predicted, forced)
        modes["hetinfer predictor (engine)"] = lambda: het_decode(tr, prompt, args.tokens, engine_pred, forced)
        stepped.update({"hetinfer predictor (every layer)": predicted, "hetinfer predictor (engine)": engine_pred})
    times = {m: [] for m in modes}
    tokens = {}
    names = list(modes)
    for r in range(args.reps):  # each round starts one mode later, so no mode always runs first or last
        for m in names[r % len(names):] + names[: r % len(names)]:
            pre, dec, cpu, toks = modes[m]()
            times[m].append((pre, dec, cpu))
            tokens[m] = toks

    t = {m: np.array(v) for m, v in times.items()}  # [reps, (prefill, decode, decode CPU)] s
    dense_mode_runs, llama_runs = t[dense_mode], t["llama.cpp"]
    records = []
    for m in modes:
        pre, dec, cpu = np.median(t[m], axis=0)
        vs_llama, vs_dense = llama_runs[:, 1] / t[m][:, 1], dense_mode_runs[:, 1] / t[m][:, 1]  # paired, per round
        ffn = stepped.get(m)
        records.append({
            "mode": m, "prefill_tok_s": n_prompt / pre, "tok_s": args.tokens / dec,
            "vs_llamacpp": float(np.median(vs_llama)), "vs_llamacpp_range": [float(vs_llama.min()), float(vs_llama.max())],
            "vs_dense": float(np.median(vs_dense)), "vs_dense_range": [float(vs_dense.min()), float(vs_dense.max())],
            "cpu_ms_per_token": 1e3 * cpu / args.tokens, "vs_llamacpp_cpu": float(np.median(llama_runs[:, 2] / t[m][:, 2])),
            "top1_equal_dense": (float(np.mean(np.array(tokens[m][1:]) == np.array(dense_tokens[1:])))
                                 if m.startswith("hetinfer") else None),
            "ffn_density": None if ffn is None else ffn.meter.overall(),
            "layers_dense": None if ffn is None else ffn.stepped_aside, "layers": None if ffn is None else len(ffn.dense),
            "reps": args.reps, "tokens": args.tokens, "prompt_tokens": n_prompt, "threads": args.threads,
            "weights": args.weights, "kv": args.kv, "model": os.path.basename(path), "machine": host,
            "llama_cpp": llama_cpp_build()})
    if args.json:
        print(json.dumps(records, indent=1))
        return
    print(f"machine: {host}")
    print(f"model: {os.path.basename(path)}; weights {args.weights}; KV cache {args.kv}; {args.threads} threads; "
          f"greedy, {n_prompt}-token prompt, {args.tokens} tokens; median of {args.reps} interleaved runs; "
          f"kernel compile/load {compile_s:.2f} s (excluded)")
    print(f"llama.cpp: {llama_cpp_build()}")
    ratio = lambda r, k: f"{r[k]:.2f}x ({r[k + '_range'][0]:.2f}-{r[k + '_range'][1]:.2f})"  # noqa: E731
    pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
    rows = [[r["mode"], f"{r['prefill_tok_s']:.0f}", f"{r['tok_s']:.1f}", ratio(r, "vs_llamacpp"), ratio(r, "vs_dense"),
             f"{r['cpu_ms_per_token']:.2f}", f"{r['vs_llamacpp_cpu']:.2f}x", pct(r["top1_equal_dense"]),
             pct(r["ffn_density"]), "-" if r["layers"] is None else f"{r['layers_dense']}/{r['layers']}"] for r in records]
    print(table(["engine", "prefill tok/s", "decode tok/s", "vs llama.cpp (range)", "vs dense (range)", "CPU ms/token",
                 "vs llama.cpp (CPU)", "top-1 = dense", "FFN density", "layers dense"], rows))
    print("ratios: per round (the two runs seconds apart), median and range over the rounds; CPU ms/token: process "
          "CPU time (all threads) per decoded token; with 1 thread it is insensitive to other load on the machine, "
          "with more it also counts spin-waiting threads")
    print("targets: dense >= 0.80x, 50% of FFN neurons skipped >= 1.20x llama.cpp; threshold 50% >= 1.05x dense, "
          "predictor (engine) >= 1.00x dense (issue 18)")
    print(f"thresholds: {args.profile or f'{PROFILE_TOKENS} WikiText-2 tokens profiled here'}"
          + (f"; predictors: {args.predictors}" if args.predictors else ""))
    print(f"llama.cpp greedy tokens equal hetinfer dense: {np.mean(np.array(tokens['llama.cpp']) == np.array(dense_tokens)):.0%}"
          f"; load average at end {os.getloadavg()[0]:.2f}")

if __name__ == "__main__":
    try:
        main()
    except HetinferError as e:  # a missing or unusable model, profile or predictors: one line, not a traceback
        print(f"decode.py: {e}", file=sys.stderr)
        sys.exit(2)
