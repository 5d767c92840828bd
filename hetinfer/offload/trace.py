"""Synthetic FFN active sets for random-weight models (the scale benchmark).

Random weights have no activation structure, so a benchmark of the offloading engine on a large
random-weight model takes each token's active neurons from here instead, with the two statistics
the engine's tiers and window cache depend on:

* Skew (PowerInfer): per layer, the neuron of rank r fires with stationary frequency
  p_r = min(1, c * r^-a) (`placement.synth.power_law`). The exponent a is chosen so the hottest
  `hot_fraction` of neurons (20%) serve `hot_share` of all activations (80%), and c so the mean
  frequency is `density` (10%); the hottest saturate at p = 1 and fire every token. Ranks are a
  seeded permutation of the ids per layer, so hot neurons are scattered as in a real model.
* Reuse (LLM in a Flash: neurons active for one token tend to be active for the next): each neuron
  is a two-state Markov chain that at every token keeps its previous state with probability
  `stay` (rho) and otherwise draws a fresh one, active with probability p. Its stationary frequency
  is exactly p, and
      P(active at t+1 | active at t)   = rho + (1 - rho) p
      P(active at t+1 | inactive at t) = (1 - rho) p
  so the lag-d autocorrelation of every neuron is rho^d and an active neuron stays active for
  1 / ((1 - rho)(1 - p)) tokens on average. The chain starts from its stationary distribution.
  rho = 0.5 is an assumption (the papers report reuse, not this parameter); the cache's hit rate
  and the read volume scale with it.

Layers are independent, and so are neurons given their frequencies (no co-activation structure).
Deterministic: layer l's state at token t depends only on (seed, l, t), in any access order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetinfer.placement import synth

BLOCK = 64  # tokens generated together; a layer keeps one state per block boundary and its latest block
_RANKS, _START = -2, -1  # random streams of a layer besides its blocks' (0, 1, ...)


@dataclass
class TraceConfig:
    n_layers: int
    n_ff: int
    density: float = 0.10       # mean fraction of a layer's neurons active per token
    hot_fraction: float = 0.20  # the hottest neurons ...
    hot_share: float = 0.80     # ... serve this share of activations
    stay: float = 0.50          # rho: probability a neuron keeps its state from one token to the next
    seed: int = 0


def hot_exponent(n_ff: int, density: float, hot_fraction: float, hot_share: float) -> float:
    """Power-law exponent at which the hottest `hot_fraction` of `n_ff` neurons with mean frequency
    `density` serve `hot_share` of the activations (bisection: the share grows with the exponent)."""
    top = max(1, round(hot_fraction * n_ff))

    def share(a: float) -> float:
        row = synth.power_law(1, n_ff, a, 1.0 - density)[0].astype(np.float64)
        return row[:top].sum() / row.sum()

    lo, hi = 0.0, 1.0
    while share(hi) < hot_share and hi < 64:
        lo, hi = hi, 2 * hi
    if not share(0.0) <= hot_share <= share(hi):
        raise ValueError(f"hot_share {hot_share} is out of reach: the hottest {top} of {n_ff} neurons at density "
                         f"{density} serve between {share(0.0):.3f} (no skew) and {share(hi):.3f} of activations")
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share(mid) < hot_share else (lo, mid)
    return (lo + hi) / 2


class Trace:
    """Active sets per (layer, token); `freq` [n_layers, n_ff] (float32) is every neuron's stationary
    activation frequency, what a profile of this trace would measure, to build a plan from."""

    def __init__(self, cfg: TraceConfig):
        if not 0 < cfg.density < 1 or not 0 <= cfg.stay < 1 or cfg.n_layers < 1 or cfg.n_ff < 1:
            raise ValueError(f"need n_layers, n_ff >= 1, 0 < density < 1 and 0 <= stay < 1; got {cfg}")
        self.cfg = cfg
        self.exponent = hot_exponent(cfg.n_ff, cfg.density, cfg.hot_fraction, cfg.hot_share)
        ranked = synth.power_law(1, cfg.n_ff, self.exponent, 1.0 - cfg.density)[0]
        self.freq = np.empty((cfg.n_layers, cfg.n_ff), dtype=np.float32)
        for layer in range(cfg.n_layers):
            self.freq[layer, self._rng(layer, _RANKS).permutation(cfg.n_ff)] = ranked
        self._fresh_on = (1.0 - cfg.stay) * self.freq  # u below this: a fresh draw that fires
        self._bounds: list[list[np.ndarray]] = [[] for _ in range(cfg.n_layers)]  # packed state before each block
        self._block: list[tuple[int, np.ndarray] | None] = [None] * cfg.n_layers   # (block, packed [BLOCK, n_ff])

    def active(self, layer: int, token: int) -> np.ndarray:
        """Sorted int64 ids of the neurons of `layer` active at `token` (>= 0)."""
        b, i = divmod(token, BLOCK)
        cached = self._block[layer]
        if cached is None or cached[0] != b:
            cached = (b, self._generate(layer, b))
            self._block[layer] = cached
        return np.flatnonzero(np.unpackbits(cached[1][i], count=self.cfg.n_ff)).astype(np.int64)

    def _rng(self, layer: int, stream: int) -> np.random.Generator:
        """One layer's random stream: a block's draws, its start state's or its rank permutation's."""
        return np.random.default_rng(np.random.SeedSequence(self.cfg.seed, spawn_key=(layer, stream + 2)))

    def _generate(self, layer: int, block: int) -> np.ndarray:
        """uint8 [BLOCK, n_ff/8]: the packed states of the block's tokens, from the state before it
        (the blocks before it are generated once, in order, for their last states)."""
        bounds = self._bounds[layer]
        if not bounds:  # the stationary distribution
            start = self._rng(layer, _START).random(self.cfg.n_ff, dtype=np.float32) < self.freq[layer]
            bounds.append(np.packbits(start))
        while len(bounds) <= block:
            self._evolve(layer, len(bounds) - 1)
        return self._evolve(layer, block)

    def _evolve(self, layer: int, block: int) -> np.ndarray:
        """The block's packed states from the state before it; records the state after it."""
        n, bounds = self.cfg.n_ff, self._bounds[layer]
        u = self._rng(layer, block).random((BLOCK, n), dtype=np.float32)  # [BLOCK, n_ff]
        fresh_on, redraw = self._fresh_on[layer], u < 1.0 - self.cfg.stay
        state = np.unpackbits(bounds[block], count=n).astype(bool)
        out = np.empty((BLOCK, (n + 7) // 8), dtype=np.uint8)
        for i in range(BLOCK):
            state = np.where(redraw[i], u[i] < fresh_on, state)
            out[i] = np.packbits(state)
        if len(bounds) == block + 1:
            bounds.append(out[-1].copy())
        return out
