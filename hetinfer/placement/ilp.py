"""Choose a tier for every neuron: an ILP over groups of neurons, a greedy baseline, a fill-up pass.

Neurons of a layer are ranked by activation probability and cut into groups of `group_size`
consecutive ranks (sized so the model has at most `max_binaries` binaries). One binary per
(group, tier) and each group on exactly one tier. Prefix constraints keep hotter groups on a
tier at least as fast as colder groups of the same layer. Capacities are in bytes: GPU neuron
bytes; RAM neuron bytes plus the window cache of flash neurons; flash record bytes. Each layer
pays the sync cost when it runs on both GPU and CPU (and, streamed, its fixed streaming cost when its
coldest group is on flash), and a layer whose attention is on the CPU
uses the GPU only with at least `Problem.min_gpu` neurons (the indicator is its hottest group's
GPU binary). The objective is `cost.evaluate`'s expected time per token (`Usage.seconds`, flash
misses at their fixed price), exactly: group costs are sums of neuron costs, and the time a token's reads
overlap its compute (`cost.overlapped`) is linear in a variable bounded below by each. CBC starts
from the better of the greedy and a quick ILP over 8x coarser groups (and that start stands in for its
result when CBC finds none, or still runs `KILL_GRACE` s past its time limit and is killed); its result is topped up
neuron by neuron into capacity that group granularity left free; whichever of that and the
neuron-level greedy is faster is returned, so the result is never worse than greedy.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pulp

from hetinfer.placement.cost import FLASH, GPU, RAM, TIERS, PlacementError, Problem, evaluate, violations
from hetinfer.placement.hardware import format_size


@dataclass
class Solution:
    tiers: np.ndarray  # uint8 [n_layers, n_ff]: tier code of every neuron
    seconds: float  # expected time per token of `tiers`
    greedy_seconds: float | None  # the neuron-level greedy placement's (None: greedy found none)
    ilp_seconds: float | None  # the ILP's (or, if CBC found none, its warm start's) after fill-up
    chosen: str  # "ilp" or "greedy"
    status: str  # CBC: optimal, within gap (--mip-gap), time limit (stopped with a solution), infeasible, not solved,
    # killed (still running KILL_GRACE s past the time limit)
    mip_gap: float | None  # CBC's relative gap between its solution and its bound at exit
    solve_seconds: float  # building the model and CBC
    group_size: int
    groups: int
    binaries: int


@dataclass
class _Units:
    """Neurons (count 1) or groups of neurons of each layer, hottest first."""

    seconds: np.ndarray  # float64 [3, n_layers, K]
    window: np.ndarray  # float64 [n_layers, K]
    count: np.ndarray  # int64 [n_layers, K]
    read: np.ndarray  # float64 [n_layers, K]: the flash reads' part of seconds[FLASH]


KILL_GRACE = 10.0  # seconds CBC may run past its time limit before it is killed


def group_size_for(n_layers: int, n_ff: int, n_tiers: int, max_binaries: int) -> int:
    """Smallest group size keeping (groups x tiers) at or below `max_binaries`."""
    g = max(1, math.ceil(n_layers * n_ff * n_tiers / max_binaries))
    while n_layers * math.ceil(n_ff / g) * n_tiers > max_binaries and g < n_ff:
        g += 1
    return g


def rank_order(p: Problem) -> np.ndarray:
    """int64 [n_layers, n_ff]: neuron ids of each layer, hottest first (ties by id)."""
    return np.argsort(-p.freq, axis=1, kind="stable")


def _neuron_units(p: Problem, order: np.ndarray) -> _Units:
    seconds = np.take_along_axis(p.seconds, order[None], axis=2)
    return _Units(seconds, np.take_along_axis(p.window, order, axis=1), np.ones_like(order),
                  np.take_along_axis(p.read_seconds, order, axis=1))


def _group_units(neurons: _Units, group_size: int) -> _Units:
    starts = np.arange(0, neurons.count.shape[1], group_size)
    return _Units(np.add.reduceat(neurons.seconds, starts, axis=2), np.add.reduceat(neurons.window, starts, axis=1),
                  np.add.reduceat(neurons.count, starts, axis=1), np.add.reduceat(neurons.read, starts, axis=1))


def _to_neurons(tiers_units: np.ndarray, units: _Units, order: np.ndarray) -> np.ndarray:
    ranked = np.repeat(tiers_units, units.count[0], axis=1)
    tiers = np.empty_like(ranked)
    np.put_along_axis(tiers, order, ranked, axis=1)
    return tiers


def _free(p: Problem, units: _Units, tiers: np.ndarray) -> np.ndarray:
    """Bytes still free on each tier (RAM net of the window cache) for units placed as `tiers`."""
    b = units.count * p.sizes.neuron_bytes[:, None]
    free = p.free.astype(np.float64) - [b[tiers == GPU].sum(), b[tiers == RAM].sum(), 0.0]
    free[RAM] -= units.window[tiers == FLASH].sum() + _window_rounding(p)
    free[FLASH] -= (units.count * p.sizes.record_bytes[:, None])[tiers == FLASH].sum()
    return free


def _window_rounding(p: Problem) -> int:
    """Bytes kept free for rounding each layer's window-cache bytes up to a whole byte (`cost.evaluate`)."""
    return len(p.freq) if FLASH in p.tiers else 0


def _promote(p: Problem, units: _Units, tiers: np.ndarray, target: int, layers: np.ndarray) -> None:
    """Move units of `layers` up into `target` while they fit: best time saved per byte first,
    hottest first within a layer (so prefixes stay prefixes). GPU candidates are ranked by what
    they save over RAM, RAM candidates (flash units) by what they save per extra RAM byte."""
    b = (units.count * p.sizes.neuron_bytes[:, None]).astype(np.float64)
    if target == GPU:
        cand, gain, cost = tiers > GPU, units.seconds[RAM] - units.seconds[GPU], b
    else:
        cand, gain, cost = tiers == FLASH, units.seconds[FLASH] - units.seconds[RAM], b - units.window
    cand &= layers[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):  # cost 0 (an always-active flash neuron): a free move
        key = np.where(cand & (cost > 0), gain / cost, np.inf)
    key = np.minimum.accumulate(key, axis=1)  # non-increasing along ranks: no unit jumps a hotter one
    lay, rank = np.nonzero(cand)
    pick = np.lexsort((rank, -key[lay, rank]))
    fits = np.cumsum(cost[lay, rank][pick]) <= _free(p, units, tiers)[target]
    n = len(fits) if fits.all() else int(np.argmin(fits))
    tiers[lay[pick[:n]], rank[pick[:n]]] = target


def _greedy(p: Problem, units: _Units) -> np.ndarray | None:
    """Hottest units to the GPU (only layers whose attention is there), the next hottest to RAM,
    the rest to flash; sync costs ignored, as PowerInfer's placement does. None if it does not fit."""
    tiers = np.full(units.count.shape, FLASH if FLASH in p.tiers else RAM, dtype=np.uint8)
    if GPU in p.tiers:
        _promote(p, units, tiers, GPU, p.dense.attn_on_gpu.copy())
    if FLASH in p.tiers:
        _promote(p, units, tiers, RAM, np.ones(len(tiers), dtype=bool))
    return tiers if (_free(p, units, tiers) >= 0).all() else None


def _fill(p: Problem, units: _Units, tiers: np.ndarray) -> None:
    """Top up capacity left free, neuron by neuron, without adding a GPU to a CPU-attention layer."""
    if GPU in p.tiers:
        _promote(p, units, tiers, GPU, p.dense.attn_on_gpu | (tiers == GPU).any(axis=1))
    if FLASH in p.tiers:
        _promote(p, units, tiers, RAM, np.ones(len(tiers), dtype=bool))


def greedy(p: Problem) -> np.ndarray | None:
    """Neuron-level greedy placement (uint8 [n_layers, n_ff]) or None when it does not fit."""
    order = rank_order(p)
    units = _neuron_units(p, order)
    tiers = _greedy(p, units)
    return None if tiers is None else _to_neurons(tiers, units, order)


def solve(p: Problem, max_binaries: int = 20000, group_size: int | None = None, time_limit: float = 60.0,
          mip_gap: float = 0.01, threads: int | None = None) -> Solution:
    """The fastest placement found: the group ILP (topped up) or the greedy, whichever is faster.

    time_limit: seconds for building and solving the ILP; mip_gap: CBC stops within this relative gap."""
    n_layers, n_ff = p.freq.shape
    g = group_size or group_size_for(n_layers, n_ff, len(p.tiers), max_binaries)
    order = rank_order(p)
    neurons = _neuron_units(p, order)
    groups = _group_units(neurons, g)

    start = time.perf_counter()
    warm = _warm_start(p, neurons, groups, g, order, start + time_limit / 4, mip_gap, threads)
    ilp_groups, status, gap = _solve_ilp(p, groups, warm, start + time_limit, mip_gap, threads)
    solve_seconds = time.perf_counter() - start

    candidates = {}
    if ilp_groups is None:
        ilp_groups = warm  # CBC's answer is at least as good as its start, when it gives one
    if ilp_groups is not None:
        ranked = np.repeat(ilp_groups, groups.count[0], axis=1)
        _fill(p, neurons, ranked)
        candidates["ilp"] = _to_neurons(ranked, neurons, order)
    greedy_ranked = _greedy(p, neurons)
    if greedy_ranked is not None:
        candidates["greedy"] = _to_neurons(greedy_ranked, neurons, order)
    scored = {k: evaluate(p, t).seconds for k, t in candidates.items() if not violations(p, t)}
    if not scored:
        raise PlacementError(_no_fit_message(p))
    chosen = min(scored, key=lambda k: (scored[k], k != "ilp"))
    return Solution(spread_streamed(p, candidates[chosen]), scored[chosen], scored.get("greedy"), scored.get("ilp"),
                    chosen, status, gap, solve_seconds, g, groups.count.shape[1], groups.count.size * len(p.tiers))


def spread_streamed(p: Problem, tiers: np.ndarray) -> np.ndarray:
    """`tiers` with the rows of interchangeable layers (identical in everything the cost model prices) permuted
    so that, among them, the layers with flash neurons lie evenly apart: same cost, but a streamed plan's
    reads then overlap the compute of the layers between (`offload.stream` reads a layer's span once the pool
    of the streamed layer two before it is free), where neighbouring streamed layers would wait on each other."""
    if not p.streamed:
        return tiers
    groups: dict[bytes, list[int]] = {}
    for layer in range(len(tiers)):
        key = b"".join(np.ascontiguousarray(a).tobytes() for a in (
            p.freq[layer], p.seconds[:, layer], p.window[layer], p.misses[layer], p.sizes.neuron_bytes[layer],
            p.sizes.record_bytes[layer], p.dense.attn_on_gpu[layer], p.min_gpu[layer]))
        groups.setdefault(key, []).append(layer)
    out = tiers.copy()
    for layers in groups.values():
        flash = [int((tiers[layer] == FLASH).sum()) for layer in layers]
        m = sum(n > 0 for n in flash)
        if m in (0, len(layers)):
            continue
        slots = [layers[int((i + 0.5) * len(layers) / m)] for i in range(m)]
        order = [layer for _, layer in sorted(zip(flash, layers), key=lambda t: -t[0])]  # most flash first
        for dst, src in zip(slots + [layer for layer in layers if layer not in slots], order):
            out[dst] = tiers[src]
    return out


def _warm_start(p: Problem, neurons: _Units, groups: _Units, g: int, order: np.ndarray, deadline: float,
                mip_gap: float, threads: int | None) -> np.ndarray | None:
    """The better of the greedy and an ILP over 8x coarser groups (solved by `deadline`), as group tiers.

    Fine groups are slow to branch on where sync costs make whole layers matter (few layers, tight
    GPU); the coarse model is not, and its solution is one of the fine model's (groups nest)."""
    k = groups.count.shape[1]
    options = [_greedy(p, groups)]
    if k > 8:
        coarse = _group_units(neurons, 8 * g)
        tiers, _, _ = _solve_ilp(p, coarse, _greedy(p, coarse), deadline, mip_gap, threads)
        options.append(None if tiers is None else np.repeat(tiers, 8, axis=1)[:, :k])
    scored = [(evaluate(p, _to_neurons(t, groups, order)).seconds, i) for i, t in enumerate(options) if t is not None]
    return options[min(scored)[1]] if scored else None


def _no_fit_message(p: Problem) -> str:
    need = int((p.sizes.neuron_bytes * p.freq.shape[1]).sum())
    have = ", ".join(f"{TIERS[t]} {format_size(max(int(p.free[t]), 0))}" for t in p.tiers)
    hint = ("raise the budgets or shrink the window cache (--window)" if FLASH in p.tiers
            else "add a flash tier with --flash-dir or raise the budgets")
    return (f"the FFN neurons ({format_size(need)}) do not fit in what the dense parts leave free ({have}; "
            f"flash neurons also need RAM for their window cache): {hint}")


def _solve_ilp(p: Problem, u: _Units, start: np.ndarray | None, deadline: float, mip_gap: float,
               threads: int | None) -> tuple[np.ndarray | None, str, float | None]:
    """CBC on the group model, stopping by `deadline` (perf_counter; building the model counts);
    returns group tiers (None if no solution), status and relative gap."""
    n_layers, k_groups = u.count.shape
    tiers = p.tiers
    us = 1e6  # objective in microseconds keeps CBC's tolerances meaningful
    prob = pulp.LpProblem("placement", pulp.LpMinimize)
    with warnings.catch_warnings():  # PuLP 3.3 deprecates this spelling for 4.0 (which drops the bundled CBC)
        warnings.simplefilter("ignore", DeprecationWarning)
        x = {(layer, k, t): pulp.LpVariable(f"x_{layer}_{k}_{TIERS[t]}", cat=pulp.LpBinary)
             for layer in range(n_layers) for k in range(k_groups) for t in tiers}
    if start is not None:
        for (layer, k, t), var in x.items():
            var.setInitialValue(int(start[layer, k] == t))

    objective = {var: float(u.seconds[t, layer, k] * us) for (layer, k, t), var in x.items()}
    constant = p.dense.seconds * us
    for layer in range(n_layers):
        for k in range(k_groups):
            prob += pulp.lpSum(x[layer, k, t] for t in tiers) == 1, f"one_tier_{layer}_{k}"
            for j in range(len(tiers) - 1):  # hot before cold: group k is on tiers[:j+1] if group k+1 is
                if k + 1 < k_groups:
                    prob += (pulp.lpSum(x[layer, k, t] for t in tiers[:j + 1])
                             >= pulp.lpSum(x[layer, k + 1, t] for t in tiers[:j + 1])), f"prefix_{layer}_{k}_{j}"
        if FLASH in tiers and p.streamed:  # a streamed layer's fixed work iff its coldest group is on flash
            objective[x[layer, k_groups - 1, FLASH]] += p.hw.ram.stream_layer_seconds * us
        if GPU in tiers and p.dense.attn_on_gpu[layer]:  # split unless its coldest group is on the GPU
            constant += p.sync_s * us
            objective[x[layer, k_groups - 1, GPU]] -= p.sync_s * us
        elif GPU in tiers:  # CPU attention: split iff its hottest group (the indicator) is on the GPU
            uses_gpu = x[layer, 0, GPU]
            objective[uses_gpu] += p.sync_s * us
            if p.min_gpu[layer]:
                prob += (pulp.lpSum(int(u.count[layer, k]) * x[layer, k, GPU] for k in range(k_groups))
                         >= int(p.min_gpu[layer]) * uses_gpu), f"min_gpu_{layer}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        one = pulp.LpVariable("one", lowBound=1, upBound=1)  # carries the constant, so CBC's gap is of the whole time
    overlap = p.hw.flash.overlap if FLASH in tiers else 0.0
    hidden = []
    if overlap:  # (1 - overlap) (compute + reads) + overlap * max(compute, reads): `cost.overlapped`
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            longer = pulp.LpVariable("longer", lowBound=0)  # the larger of the two
        read = pulp.LpAffineExpression([(x[layer, k, FLASH], float(u.read[layer, k] * us))
                                        for layer in range(n_layers) for k in range(k_groups)])
        prob += pulp.LpAffineExpression(list(objective.items()) + [(one, constant)]) - read <= longer, "longer_compute"
        prob += read <= longer, "longer_reads"
        hidden = [(longer, overlap)]
    prob += pulp.LpAffineExpression([(v, (1 - overlap) * c) for v, c in objective.items()]
                                    + [(one, (1 - overlap) * constant)] + hidden)

    b = u.count * p.sizes.neuron_bytes[:, None]
    if GPU in tiers:
        prob += pulp.LpAffineExpression([(x[layer, k, GPU], int(b[layer, k])) for layer in range(n_layers)
                                         for k in range(k_groups)]) <= int(p.free[GPU]), "cap_gpu"
    ram = [(x[layer, k, RAM], int(b[layer, k])) for layer in range(n_layers) for k in range(k_groups)]
    if FLASH in tiers:
        ram += [(x[layer, k, FLASH], float(u.window[layer, k])) for layer in range(n_layers) for k in range(k_groups)]
        flash = u.count * p.sizes.record_bytes[:, None]
        prob += pulp.LpAffineExpression([(x[layer, k, FLASH], int(flash[layer, k])) for layer in range(n_layers)
                                         for k in range(k_groups)]) <= int(p.free[FLASH]), "cap_flash"
    prob += pulp.LpAffineExpression(ram) <= int(p.free[RAM]) - _window_rounding(p), "cap_ram"

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "cbc.log"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1.0, deadline - time.perf_counter()), gapRel=mip_gap,
                                       warmStart=start is not None, threads=threads or os.cpu_count(),
                                       logPath=str(log))
        solver.tmpDir = tmp  # its model and solution files go with the directory, even when it is killed
        killed = not _solve_within(prob, solver, deadline + KILL_GRACE, tmp)
        text = log.read_text() if log.exists() else ""
    status = "killed" if killed else {
        pulp.LpSolutionOptimal: "within gap" if "within gap tolerance" in text else "optimal",
        pulp.LpSolutionIntegerFeasible: "time limit",
        pulp.LpSolutionInfeasible: "infeasible"}.get(prob.sol_status, "not solved")
    if status in ("infeasible", "not solved", "killed"):
        return None, status, None
    value = np.zeros((n_layers, k_groups, 3))
    for (layer, k, t), var in x.items():
        value[layer, k, t] = var.varValue or 0.0
    return value.argmax(axis=2).astype(np.uint8), status, _gap(text)


def _solve_within(prob: pulp.LpProblem, solver: pulp.PULP_CBC_CMD, deadline: float, tmp: str) -> bool:
    """`prob.solve(solver)`, killing CBC if it still runs at `deadline` (perf_counter); False if it was killed.

    CBC checks its time limit only between phases: on some infeasible group models its presolve runs
    for many minutes without looking at the clock. Its process is the child whose command line
    names `tmp`, where its model file is."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            prob.solve(solver)
        except BaseException as e:  # noqa: BLE001 (re-raised below unless CBC was killed)
            failed.append(e)

    worker = threading.Thread(target=run, name="cbc", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.perf_counter()))
    killed = False
    while worker.is_alive():
        for child in psutil.Process().children():
            try:
                if any(tmp in arg for arg in child.cmdline()):
                    child.kill()
                    killed = True
            except psutil.Error:  # exited meanwhile
                pass
        worker.join(0.1)
    if failed and not killed:
        raise failed[0]
    return not killed


def _gap(log: str) -> float | None:
    """(incumbent - best bound) / incumbent from CBC's log; 0 when it proved optimality outright,
    None if it printed neither."""
    obj, bound = (re.search(rf"{k}:\s*([-+0-9.eE]+)", log) for k in ("Objective value", "Lower bound"))
    if obj is not None and bound is not None:
        return max(0.0, (float(obj.group(1)) - float(bound.group(1))) / float(obj.group(1)))
    return 0.0 if "Result - Optimal solution found" in log else None
