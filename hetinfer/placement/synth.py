"""Activation profiles for models that were never profiled (what-if planning).

Either a measured profile of another model rescaled to the new shape (each layer takes the
rank-frequency curve of the source layer at the same relative depth, resampled to the new
width), or a power law over neuron rank with the mean set by the target sparsity. Either way
the neuron ids carry no meaning: neuron i is the i-th hottest.
"""
from __future__ import annotations

import numpy as np

from hetinfer.placement.cost import PlacementError


def power_law(n_layers: int, n_ff: int, exponent: float, sparsity: float) -> np.ndarray:
    """float32 [n_layers, n_ff]: frequency of the rank-r neuron = min(1, c * r^-exponent), with c
    chosen so a token activates a (1 - sparsity) fraction of neurons on average."""
    if not 0 <= sparsity < 1:
        raise PlacementError(f"sparsity must be in [0, 1), got {sparsity}")
    if exponent < 0:
        raise PlacementError(f"power-law exponent must be >= 0, got {exponent}")
    density = 1.0 - sparsity
    shape = np.arange(1, n_ff + 1, dtype=np.float64) ** -exponent
    lo, hi = 0.0, 1.0 / shape[-1]  # at hi every neuron is always active: mean 1 >= density
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.minimum(1.0, mid * shape).mean() < density else (lo, mid)
    row = np.minimum(1.0, hi * shape).astype(np.float32)
    return np.repeat(row[None], n_layers, axis=0)


def rescale(freq: np.ndarray, n_layers: int, n_ff: int) -> np.ndarray:
    """float32 [n_layers, n_ff] from a measured [L0, F0] profile: per target layer, the sorted curve
    of the source layer at the same relative depth, interpolated at the same relative ranks."""
    freq = np.asarray(freq, dtype=np.float64)
    src_layers, src_ff = freq.shape
    curves = -np.sort(-freq, axis=1)
    src_pos = (np.arange(src_ff) + 0.5) / src_ff
    dst_pos = (np.arange(n_ff) + 0.5) / n_ff
    out = np.empty((n_layers, n_ff), dtype=np.float32)
    for layer in range(n_layers):
        src = round(layer * (src_layers - 1) / max(n_layers - 1, 1))
        out[layer] = np.interp(dst_pos, src_pos, curves[src])
    return out
