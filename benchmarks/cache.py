"""Cost of the window cache's bookkeeping per layer and token (issue 15).

    python benchmarks/cache.py [--tokens 512] [--reps 5] [--json]

One layer's flash neurons (SmolLM2's width: 1536 ids, 1336-byte records, the size of a Q4_1 neuron
with its q8_0 down column), active sets from the synthetic trace (`offload/trace.py`) at 10% and 80%
density, window 5, capacity for the whole window or for half of its mean size (LRU under pressure).
Times `step` alone and a look-ahead `admit` of the same set followed by its `step`; slot moves copy
their record bytes, reads are not simulated. The engine calls these once per layer per token.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._util import Report, machine  # noqa: E402
from hetinfer.offload.cache import WindowCache  # noqa: E402
from hetinfer.offload.trace import Trace, TraceConfig  # noqa: E402

N_IDS, RECORD, WINDOW = 1536, 1336, 5


def run(sets: list[np.ndarray], capacity: int, lookahead: bool) -> tuple[float, float, WindowCache]:
    """Wall and CPU seconds per token of one pass over `sets` through a fresh cache (CPU time leaves out
    the time this process waited for a core, which dominates wall time on a loaded machine)."""
    cache = WindowCache(N_IDS, capacity, WINDOW, np.zeros((capacity, RECORD), np.uint8))
    wall, cpu = time.perf_counter(), time.process_time()
    for t, ids in enumerate(sets):
        if lookahead:
            cache.admit(ids, t)
        cache.step(ids, t)
    return (time.perf_counter() - wall) / len(sets), (time.process_time() - cpu) / len(sets), cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print the table as JSON instead")
    args = ap.parse_args()
    out = Report(args.json)
    out.note(machine())
    rows = []
    # at 80% density 20% of the neurons can serve at most 25% of activations: the skew is nearly flat
    for density, hot_share in ((0.10, 0.80), (0.80, 0.24)):
        trace = Trace(TraceConfig(n_layers=1, n_ff=N_IDS, density=density, hot_share=hot_share))
        sets = [trace.active(0, t) for t in range(args.tokens)]
        in_window = np.mean([len(np.unique(np.concatenate(sets[t - WINDOW + 1:t + 1])))
                             for t in range(WINDOW, len(sets))])
        for capacity in (N_IDS, int(in_window / 2)):
            for lookahead in (False, True):
                runs = [run(sets, capacity, lookahead) for _ in range(args.reps)]
                wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
                rows.append([f"{density:.0%}", int(np.mean([len(s) for s in sets])), capacity,
                             "admit+step" if lookahead else "step", wall * 1e6, cpu * 1e6, runs[0][2].hit_rate])
    out.table(f"Window cache (window {WINDOW}), per layer and token",
              ["density", "ids/token", "capacity", "calls", "wall us/token", "CPU us/token", "hit rate"], rows)
    out.note("(best of --reps passes over the tokens; capacity below a token's set overflows: those ids count as misses)")
    out.close()


if __name__ == "__main__":
    main()
