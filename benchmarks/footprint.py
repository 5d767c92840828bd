"""Total memory: how small a memory cgroup each engine keeps its speed in (issue 20).

    python benchmarks/footprint.py [--limits 600,500,400,300,250,200,150] [--tokens 128] [--reps 3] [--json]
                                   [--timeout 60]

Edge boxes and laptops count total memory, not model bytes. Each engine decodes SmolLM2-135M Q4_1
(greedy, a 64-token prompt of held-out WikiText-2, `--tokens` tokens, context 512, 2 threads) in a
child process inside a cgroup v1 memory cgroup (benchmarks/_cgroup.py: the child joins it before it
execs, so every library it loads is charged; the page cache is dropped before each run), first
uncapped, then under each limit in `--limits` (MB, 10^6 bytes, as the issue's table) from the largest
down, `--reps` times each (median tok/s, largest peak: one run's speed varies by 10-20% on a small VM).
Total memory = what the cgroup charges: process memory plus the page cache it causes (the mapped
model, the libraries' files). Peak = the cgroup's memory.max_usage_in_bytes. An engine that fails a
limit (OOM-killed, or slower than `--timeout` s for the whole run) is not run at smaller ones.

Engines (the same children as benchmarks/offload.py):
  hetinfer dense      `generate`'s engine, everything in RAM (the model file mapped)
  hetinfer offloaded  the offload benchmark's SmolLM2 deployment at dense parts + KV + 50% of the FFN
                      (quality predictors), flash records read with O_DIRECT
  llama.cpp           llama-cpp-python as it runs by default (mmap, CPU repacking on: fastest)
  llama.cpp mmap      the same with repacking off, so the weights stay in the mapped file, which a limit
                      can reclaim (its smallest footprint; repacking copies them into anonymous memory)

Reported per engine: uncapped tok/s and peak, tok/s and peak at each limit, and the smallest limit at
which it keeps >= 90% of its reference speed (the median of its runs that no limit bound: the uncapped
one and those whose peak stayed below the limit); the target (issue 20) is hetinfer dense's smallest such
limit <= 1.5x llama.cpp's (the smaller of its two ways).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import offload as ob  # noqa: E402
from benchmarks._util import machine, table  # noqa: E402

MB = 1_000_000
KEEP = 0.9  # share of the reference speed (where no limit bound it) a limit must keep
UNBOUND_MARGIN = 1 << 20  # a run whose peak stayed this far below its limit was not bound by it
TARGET = 1.5  # hetinfer dense's smallest such limit against llama.cpp's


def specs(tokens: int, cache_dir: Path, threads: int) -> tuple[dict, list[str], dict]:
    """({engine: child spec}, files whose pages are dropped, {engine: note}): the three engines' children."""
    from hetinfer.loader import default_model_path, load_model

    path = default_model_path()
    model = load_model(path)
    settings = ob.Settings(threads=threads)
    cache = cache_dir / settings.artefacts
    predictors = ob.smollm2_predictors(cache, path, settings)
    key = ("quality", 0.5)
    budget = ob.model_budget(model, predictors["quality"], key[1])
    prompt = ob.prompt_ids(model.tokenizer, 64)
    base = {"model": path, "ctx": ob.CTX, "prompt": prompt, "config_dict": model.config.to_dict(),
            "tokens": tokens, "forced": None}
    del model  # its file stays mapped while it lives, and mapped pages escape the children's limits
    dep, window = ob.smollm2_deployments(cache, path, predictors, {key: budget}, replan=False)[key]
    out = {"hetinfer dense": {**base, "engine": "hetinfer", "config": "dense"},
           "hetinfer offloaded": {**base, "engine": "hetinfer", "config": "offload", "deploy": str(dep),
                                  "resident": "plan", "capacity": None, "select": "plan", "direct": None},
           "llama.cpp": {**base, "engine": "llama.cpp", "repack": True},
           "llama.cpp mmap": {**base, "engine": "llama.cpp", "repack": False}}
    notes = {"hetinfer offloaded": f"--ram {budget / MB:.0f} MB (dense parts + KV + 50% of the FFN), window {window}"}
    return out, [path, ob.store_path(dep)], notes


def series(runner: ob.Runner, label: str, spec: dict, limits: list[int], files: list[str], reps: int) -> list[dict]:
    """The engine uncapped, then at each limit (descending) until one fails: per limit the median tok/s
    and the largest peak of `reps` runs (one failed run fails the limit)."""
    rows = []
    for limit in [None, *sorted(limits, reverse=True)]:
        runs = []
        for _ in range(reps):
            runs.append(runner.run(f"{label} {'uncapped' if limit is None else f'{limit / MB:.0f} MB'}", spec, limit,
                                   files))
            if runs[-1].get("failed"):
                break
        failed = next((r["failed"] for r in runs if r.get("failed")), None)
        rows.append({"limit_bytes": limit, "tok_s": None if failed else float(np.median([r["tok_s"] for r in runs])),
                     "peak_bytes": max(r["peak_memory_bytes"] for r in runs), "failed": failed,
                     "runs_tok_s": [r.get("tok_s") for r in runs]})
        if failed:
            break
    return rows


def reference_speed(rows: list[dict]) -> float | None:
    """The engine's speed where no limit bound it: the median over the uncapped run and the runs whose peak
    stayed below their limit (a single run's tok/s varies by ~10-20% on this VM)."""
    free = [r["tok_s"] for r in rows if r["tok_s"]
            and (r["limit_bytes"] is None or r["peak_bytes"] < r["limit_bytes"] - UNBOUND_MARGIN)]
    return float(np.median(free)) if free else None


def smallest_kept(rows: list[dict]) -> int | None:
    """The smallest limit at which the engine kept KEEP of its reference speed (None: at no limit)."""
    ref = reference_speed(rows)
    ok = [r["limit_bytes"] for r in rows if r["limit_bytes"] and r["tok_s"] and ref and r["tok_s"] >= KEEP * ref]
    return min(ok) if ok else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limits", default="600,500,400,300,250,200,150",
                   help="memory limits in MB (10^6 bytes), comma-separated (default 600,500,400,300,250,200,150)")
    p.add_argument("--tokens", type=int, default=128, help="greedy tokens per run (default 128)")
    p.add_argument("--reps", type=int, default=3, help="runs per engine and limit, median tok/s (default 3)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a run may take before it counts as failed (default 60)")
    p.add_argument("--json", action="store_true", help="print the records as JSON instead of tables")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "hetinfer" / "bench-offload",
                   help="the offload benchmark's artefacts (profile, predictors, deployment), made if absent")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    try:
        limits = [int(float(x) * MB) for x in args.limits.split(",") if x.strip()]
    except ValueError:
        p.error(f"--limits must be numbers of MB separated by commas, got {args.limits!r}")
    if not limits or min(limits) <= 0 or args.tokens < 1 or args.reps < 1 or args.timeout <= 0:
        p.error("--limits must be positive MB, --tokens and --reps at least 1 and --timeout positive")
    if not ob.DATA.exists():
        print(f"skipped: {ob.DATA} not found (the benchmark's prompt text)", file=sys.stderr)
        return
    from hetinfer import kernels

    t0 = time.perf_counter()
    kernels.warmup()  # compiled here if the cache is cold, so every child only loads them
    runner = ob.Runner(ob.Settings(threads=args.threads, timeout_s=args.timeout), args.cache_dir)
    if runner.cgroup_problem:
        print(f"NO MEMORY LIMITS: {runner.cgroup_problem}; the footprint needs cgroup v1 memory limits (root)",
              file=sys.stderr)
        return
    engines, files, notes = specs(args.tokens, args.cache_dir, args.threads)
    records = []
    for label, spec in engines.items():
        rows = series(runner, label, spec, limits, files, args.reps)
        kept = smallest_kept(rows)
        records.append({"engine": label, "tokens": args.tokens, "reps": args.reps, "uncapped_tok_s": rows[0]["tok_s"],
                        "reference_tok_s": reference_speed(rows),
                        "uncapped_peak_bytes": rows[0]["peak_bytes"], "smallest_limit_kept_bytes": kept,
                        "note": notes.get(label, ""), "runs": rows})
    elapsed = time.perf_counter() - t0
    dense = records[0]["smallest_limit_kept_bytes"]
    llama = min((r["smallest_limit_kept_bytes"] for r in records if r["engine"].startswith("llama.cpp")
                 and r["smallest_limit_kept_bytes"]), default=None)
    ratio = dense / llama if dense and llama else None
    summary = {"hetinfer_dense_vs_llamacpp_smallest_limit": ratio, "target": TARGET,
               "met": ratio is not None and ratio <= TARGET}
    if args.json:
        print(json.dumps({"records": records, **summary}, indent=1))
        return
    print(f"machine: {machine()}")
    print(f"SmolLM2-135M-Instruct Q4_1, {args.tokens} greedy tokens after a 64-token prompt, context {ob.CTX}, "
          f"median of {args.reps} runs per cell, "
          f"{args.threads} threads; cgroup v1 limits, page cache dropped before each run "
          f"({runner.drop_method}); {elapsed / 60:.1f} min in all")
    cols = ["uncapped"] + [f"{x / MB:.0f} MB" for x in sorted(limits, reverse=True)]
    out = []
    for r in records:
        cells = {("uncapped" if run["limit_bytes"] is None else f"{run['limit_bytes'] / MB:.0f} MB"):
                 (f"{run['tok_s']:.1f} tok/s, peak {run['peak_bytes'] / MB:.0f} MB" if run["tok_s"]
                  else f"{run['failed']}") for run in r["runs"]}
        kept = r["smallest_limit_kept_bytes"]
        ref = r["reference_tok_s"]
        out.append([r["engine"], *[cells.get(c, "-") for c in cols], "-" if ref is None else f"{ref:.1f}",
                    f"{kept / MB:.0f} MB" if kept else "none"])
    print(table(["engine", *cols, "reference tok/s", f">= {KEEP:.0%} of it down to"], out))
    for r in records:
        if r["note"]:
            print(f"{r['engine']}: {r['note']}")
    verdict = "no ratio" if ratio is None else f"{ratio:.2f}x"
    print(f"\ntarget (issue 20): hetinfer dense's smallest limit keeping {KEEP:.0%} of its speed <= {TARGET}x "
          f"llama.cpp's: {verdict} ({'met' if summary['met'] else 'not met'})")


if __name__ == "__main__":
    main()
