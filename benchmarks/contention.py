"""Decode speed beside busy cores: `hetinfer generate` with its default threads against fixed counts,
on an idle machine and with other processes keeping cores busy.

    python benchmarks/contention.py [--cores 2] [--busy 1] [--rounds 5] [--tokens 128] [--model PATH] [--json]

Each measurement is one `hetinfer generate` process (greedy, `--tokens` tokens of a counting
prompt; decode tok/s from its --stats-json), as a user runs it. It and the `--busy` spinning child
processes (a Python loop each, started before the run as a browser would be) are pinned to the
first `--cores` CPUs this process may use, so the experiment means the same on any machine.
Rounds interleave every (load, setting) pair, the settings' order rotating; medians are reported.

Targets (issue 17): busy, the default reaches >= 90% of the best fixed thread count; idle, it loses
<= 3% against `-t CORES`, all cores, which is what the default ran on an idle machine before.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._util import machine, table  # noqa: E402

PROMPT = "1, 2, 3, 4,"  # greedy decoding keeps counting: every run decodes all its tokens
LOADS = ("idle", "busy")


def spin(cores: list[int], n: int) -> list[subprocess.Popen]:
    """`n` processes that keep a core busy each, on `cores`."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    for p in procs:
        os.sched_setaffinity(p.pid, cores)
    return procs


def decode_rate(cores: list[int], threads: int | None, tokens: int, model: str | None) -> tuple[float, int]:
    """(decode tok/s, tokens decoded) of one `hetinfer generate` process on `cores`."""
    with tempfile.TemporaryDirectory() as tmp:
        stats = os.path.join(tmp, "stats.json")
        cmd = [sys.executable, "-m", "hetinfer.cli", "generate", "-p", PROMPT, "--temperature", "0",
               "-n", str(tokens), "--stats-json", stats]
        cmd += ["-t", str(threads)] if threads else []
        cmd += ["-m", model] if model else []
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env,
                       preexec_fn=lambda: os.sched_setaffinity(0, cores))
        with open(stats) as fh:
            s = json.load(fh)
    return s["gen_tok_s"], s["gen_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cores", type=int, default=2, help="CPUs the runs and the spinners share (default 2, a laptop's)")
    ap.add_argument("--busy", type=int, default=1, help="spinning processes in the busy runs (default 1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = ap.parse_args()
    if not hasattr(os, "sched_setaffinity"):
        sys.exit("error: this benchmark pins processes to CPUs (os.sched_setaffinity), which this OS lacks")
    mine = sorted(os.sched_getaffinity(0))
    if not 1 <= args.cores <= len(mine) or args.busy < 1:
        sys.exit(f"error: --cores must be 1..{len(mine)} (the CPUs this process may use) and --busy at least 1")
    cores = mine[: args.cores]
    settings: list[int | None] = [None, *range(1, args.cores + 1)]  # None: the default
    name = lambda t: "default" if t is None else f"-t {t}"  # noqa: E731
    decode_rate(cores, None, 8, args.model)  # untimed: kernels compiled or loaded, model file in the page cache
    rates: dict[str, dict[str, list[float]]] = {name(t): {load: [] for load in LOADS} for t in settings}
    short = []
    for r in range(args.rounds):
        for load in LOADS:
            spinners = spin(cores, args.busy) if load == "busy" else []
            try:
                time.sleep(0.5 if spinners else 0)
                for t in settings[r % len(settings):] + settings[: r % len(settings)]:
                    rate, n = decode_rate(cores, t, args.tokens, args.model)
                    rates[name(t)][load].append(rate)
                    short += [(name(t), load, n)] if n < args.tokens else []
            finally:
                for p in spinners:
                    p.kill()
                    p.wait()
    med = {s: {load: float(np.median(v)) for load, v in by.items()} for s, by in rates.items()}
    best = max((s for s in med if s != "default"), key=lambda s: med[s]["busy"])
    busy_ratio = med["default"]["busy"] / med[best]["busy"]
    idle_ratio = med["default"]["idle"] / med[f"-t {args.cores}"]["idle"]
    result = {"machine": machine(), "cores": cores, "busy_processes": args.busy, "tokens": args.tokens,
              "rounds": args.rounds, "tok_s": rates, "median_tok_s": med, "best_fixed_busy": best,
              "busy_default_vs_best_fixed": busy_ratio, "idle_default_vs_all_cores": idle_ratio,
              "runs_that_stopped_early": short}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['machine']}; runs on CPUs {cores}, busy = {args.busy} spinning process(es) on them, "
          f"{args.tokens} greedy tokens, median of {args.rounds} rounds")
    print(table(["threads", "idle tok/s", "busy tok/s", "busy, % of best fixed"],
                [[s, med[s]["idle"], med[s]["busy"], f"{med[s]['busy'] / med[best]['busy']:.0%}"] for s in med]))
    print(f"busy: default = {busy_ratio:.0%} of the best fixed count ({best}); target >= 90%")
    print(f"idle: default = {idle_ratio:.1%} of -t {args.cores} (all cores); target >= 97%")
    if short:
        print(f"warning: runs that decoded fewer than {args.tokens} tokens: {short}")


if __name__ == "__main__":
    main()
