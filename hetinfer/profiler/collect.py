"""`hetinfer profile`: activation statistics of every FFN neuron over calibration sequences.

Per layer (all sequences go through one layer before the next, see runner.py):
1. A fixed random subset R of the calibration tokens (the samples) gives the layer's |act|
   distribution: 2^21 (token, neuron) values drawn from R give the thresholds for target
   sparsities 0.1 .. 0.9 (TEAL/CATS quantiles; for ReLU models never below 0) and a log-spaced
   histogram; co-activation is counted over a subset of R; R's FFN inputs are stored for
   predictor training.
2. Every token then passes through the dense FFN while per-neuron counts above each threshold,
   nonzero counts and |act| sums accumulate (a numba kernel; one pass over the activations).
"""
from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

import hetinfer
from hetinfer.profiler.artifact import HIST_EDGES, LEVELS, PROFILE_VERSION, Profile
from hetinfer.profiler.runner import DTYPES, FloatWeights, LayerRunner, Packed

F16_SAFE = 30000.0  # inputs are stored as float16, scaled down per layer if larger than this
MAX_VALUES = 1 << 21  # (token, neuron) |act| values drawn from the samples for thresholds and histogram


@dataclass
class ProfileOptions:
    samples: int = 8192  # calibration tokens whose FFN inputs are kept (thresholds, co-activation, predictors)
    coact_tokens: int = 4096  # of the samples, tokens used for co-activation
    coact_neighbors: int = 16  # most co-active neurons kept per neuron
    coact_level: float = 0.5  # sparsity level whose threshold defines "active" for co-activation
    dtype: str = "bfloat16"  # GEMM precision (float32 residual stream and statistics either way)
    chunk: int = 8192  # tokens per FFN call
    seed: int = 0


def _row(a, r):
    """Row r of a float32 array, or of bfloat16 bits (uint16) widened to float32."""


@overload(_row)
def _row_impl(a, r):
    if a.dtype == types.uint16:
        return lambda a, r: (a[r].astype(np.uint32) << np.uint32(16)).view(np.float32)
    return lambda a, r: a[r]


@njit(parallel=True, fastmath=True, cache=True)
def _accumulate(act, thr, counts, nonzero, abs_sum, nchunks):
    """counts[k, j] += #(|act[:, j]| > thr[k]); nonzero[j] += #(act[:, j] != 0); abs_sum[j] += sum |act[:, j]|.

    act: float32 [T, n] or bfloat16 bits (uint16) [T, n]."""
    T, n = act.shape
    S = thr.shape[0]
    local = np.zeros((nchunks, S + 1, n), np.int32)
    lsum = np.zeros((nchunks, n), np.float64)
    for c in prange(nchunks):
        cnt, sm = local[c], lsum[c]
        for r in range(c * T // nchunks, (c + 1) * T // nchunks):
            row = _row(act, r)
            for j in range(n):
                a = abs(row[j])
                sm[j] += a
                cnt[S, j] += a > 0
            for k in range(S):
                t, ck = thr[k], cnt[k]
                for j in range(n):
                    ck[j] += abs(row[j]) > t
    for c in range(nchunks):
        counts += local[c, :S]
        nonzero += local[c, S]
        abs_sum += lsum[c]


def _numpy(act: torch.Tensor) -> np.ndarray:
    """The array `_accumulate` reads: float32 as is, bfloat16 as its raw bits."""
    if act.dtype == torch.bfloat16:
        return act.view(torch.int16).numpy().view(np.uint16)
    return act.numpy()


def magnitude_histogram(a: np.ndarray, edges: np.ndarray = HIST_EDGES) -> np.ndarray:
    """int64 [len(edges) + 1]: counts of |act| values `a` below edges[0], in each bin of the log-uniform
    `edges`, and at or above edges[-1]."""
    lo, n = np.log10(edges[0]), len(edges) - 1
    per = n / (np.log10(edges[-1]) - lo)
    with np.errstate(divide="ignore"):
        b = np.floor((np.log10(a) - lo) * per)
    return np.bincount(np.clip(b, -1, n).astype(np.int64) + 1, minlength=n + 2)


def coactivation(active: torch.Tensor, m: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Each neuron's `m` most co-active neurons by Jaccard index |i and j| / |i or j| over the tokens
    of `active` (bool [T, n_ff]); returns (neighbors int32 [n_ff, m], jaccard float32 [n_ff, m])."""
    M = active.float()
    n = M.shape[1]
    m = min(m, n - 1)
    count = M.sum(0)
    nbr, jac = np.zeros((n, m), np.int32), np.zeros((n, m), np.float32)
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        both = M[:, lo:hi].T @ M  # [b, n]
        j = both / (count[lo:hi, None] + count[None, :] - both).clamp_min(1.0)
        j[torch.arange(hi - lo), torch.arange(lo, hi)] = -1.0  # not its own neighbour
        v, i = j.topk(m, dim=1)
        nbr[lo:hi], jac[lo:hi] = i.numpy(), v.clamp_min(0).numpy()
    return nbr, jac


def chain_order(neighbors: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Greedy co-activation chain: start at the hottest neuron, step to the most co-active unplaced
    neighbour, or to the hottest unplaced neuron when none is left. int32 [n_ff], a permutation."""
    n = len(freq)
    by_freq = np.argsort(-freq, kind="stable")
    placed = np.zeros(n, bool)
    order = np.empty(n, np.int32)
    cur, ptr = int(by_freq[0]), 0
    for k in range(n):
        placed[cur] = True
        order[k] = cur
        nxt = next((int(j) for j in neighbors[cur] if not placed[j]), -1)
        if nxt < 0:
            while ptr < n and placed[by_freq[ptr]]:
                ptr += 1
            nxt = int(by_freq[ptr]) if ptr < n else -1
        cur = nxt
    return order


def skew(counts: np.ndarray, top: float = 0.2) -> float:
    """Share of all active (token, neuron) events held by the `top` fraction of most frequently active neurons
    (mean over layers; counts [n_layers, n_ff])."""
    k = max(1, int(round(counts.shape[1] * top)))
    s = -np.sort(-counts, axis=1)
    return float(np.mean(s[:, :k].sum(1) / np.maximum(s.sum(1), 1)))


def profile_sequences(model, sequences: list[list[int]], opts: ProfileOptions = ProfileOptions(),
                      sources: list[dict] | None = None, progress: bool = False) -> Profile:
    """Profile `model` on token `sequences` (each run with exact causal attention from position 0)."""
    from tqdm import tqdm

    cfg = model.config
    L, n_ff, levels = cfg.n_layers, cfg.n_ff, np.array(LEVELS, np.float32)
    packed = Packed(sequences)
    N = packed.n_tokens
    rng = np.random.default_rng(opts.seed)
    R = torch.from_numpy(np.sort(rng.choice(N, size=min(opts.samples, N), replace=False)))
    Rc = torch.from_numpy(np.sort(rng.choice(len(R), size=min(opts.coact_tokens, len(R)), replace=False)))
    lvl = int(np.flatnonzero(np.abs(levels - opts.coact_level) < 1e-6)[0])

    thresholds = np.zeros((L, len(levels)), np.float32)
    counts = np.zeros((L, len(levels), n_ff), np.int64)
    nonzero = np.zeros((L, n_ff), np.int64)
    abs_sum = np.zeros((L, n_ff), np.float64)
    hist = np.zeros((L, len(HIST_EDGES) + 1), np.int64)
    m = min(opts.coact_neighbors, n_ff - 1)
    nbr, jac = np.zeros((L, n_ff, m), np.int32), np.zeros((L, n_ff, m), np.float32)
    order = np.zeros((L, n_ff), np.int32)
    inputs = np.zeros((L, len(R), cfg.d_model), np.float16)
    scale = np.ones(L, np.float32)
    nthreads = torch.get_num_threads()

    weights = FloatWeights(model, DTYPES[opts.dtype], keep=False)
    # one step = one token through one layer (the profile runs layer by layer over all tokens)
    bar = tqdm(total=L * N, unit=" tok×layer", unit_scale=True, desc="profile", disable=not progress)
    runner = LayerRunner(model, packed, weights, opts.chunk, bar)
    for step in runner.steps():
        i = step.layer
        bar.set_postfix(layer=i)
        h = step.ffn_input(R)
        big = float(h.abs().max())
        scale[i] = max(1.0, big / F16_SAFE)
        inputs[i] = (h / scale[i]).numpy().astype(np.float16)
        a = weights.gate_up(i, h).float().abs_()
        values = a.reshape(-1).numpy()
        if values.size > MAX_VALUES:
            values = values[rng.integers(0, values.size, MAX_VALUES)]
        thresholds[i] = np.maximum(np.quantile(values, levels), 0.0)
        hist[i] = magnitude_histogram(values)
        nbr[i], jac[i] = coactivation(a[Rc] > float(thresholds[i, lvl]), m)
        del a, values

        def record(layer: int, x: torch.Tensor, i=i) -> torch.Tensor:
            act = weights.gate_up(layer, x)
            _accumulate(_numpy(act), thresholds[i], counts[i], nonzero[i], abs_sum[i], nthreads)
            return weights.ffn_out(layer, act)

        step.apply(record)
        order[i] = chain_order(nbr[i], counts[i, lvl])
    bar.close()

    achieved = 1.0 - counts.sum(2) / (N * n_ff)  # [L, levels]
    manifest = {
        "version": PROFILE_VERSION,
        "hetinfer_version": hetinfer.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"path": model.path, "fingerprint": model.fingerprint, "config": cfg.to_dict()},
        "tokens": int(N),
        "sequences": len(sequences),
        "sources": sources or [],
        "options": asdict(opts),
        "layers": list(range(L)),
        "summary": {
            "achieved_sparsity": {f"{s:g}": round(float(achieved[:, k].mean()), 4) for k, s in enumerate(LEVELS)},
            "top20_share": {f"{s:g}": round(skew(counts[:, k]), 4) for k, s in enumerate(LEVELS) if s in (0.5, 0.7)},
            "natural_sparsity": round(float(1.0 - nonzero.sum() / (L * N * n_ff)), 4),
        },
    }
    stats = {
        "layer_ids": np.arange(L, dtype=np.int32), "levels": levels, "thresholds": thresholds,
        "active_count": counts, "nonzero_count": nonzero, "abs_sum": abs_sum, "hist_edges": HIST_EDGES,
        "hist": hist, "coact_neighbors": nbr, "coact_jaccard": jac, "neuron_order": order,
    }
    samples = {"layer_ids": np.arange(L, dtype=np.int32), "inputs": inputs, "input_scale": scale,
               "sequence": packed.sequence[R].numpy().astype(np.int32)}
    return Profile(manifest, stats, _samples=samples)
