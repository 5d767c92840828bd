"""`hetinfer profile --plot`: two panels for a person to look at.

Left: per layer, neurons sorted by activation frequency at the 50% level (the power-law curve;
flat means weak skew). Right: per layer, the fraction of activations below a threshold.
"""
from __future__ import annotations

import os

import numpy as np

from hetinfer.errors import HetinferError
from hetinfer.profiler.artifact import hist_quantile


def plot_profile(profile, path: str, sparsity: float = 0.5) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HetinferError("--plot needs matplotlib: pip install matplotlib") from None
    freq = profile.activation_frequency(sparsity)
    hist, edges = profile.stats["hist"], profile.stats["hist_edges"]
    L = profile.n_layers
    colors = plt.cm.viridis(np.linspace(0, 1, L))
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    rank = np.arange(1, freq.shape[1] + 1)
    for i in range(L):
        a.loglog(rank, -np.sort(-freq[i]), color=colors[i], lw=0.8)
        cdf = np.cumsum(hist[i])[:-1] / max(hist[i].sum(), 1)  # fraction below each edge
        b.semilogx(edges, cdf, color=colors[i], lw=0.8)
    a.set(xlabel="neuron rank (most frequently active first)", ylabel=f"activation frequency at {sparsity:.0%} sparsity",
          title="per-layer activation frequency")
    b.set(xlabel="|activation| threshold", ylabel="sparsity (fraction of activations below)",
          title="sparsity vs threshold")
    lo = min(hist_quantile(hist[i], edges, 0.001) for i in range(L))
    hi = max(hist_quantile(hist[i], edges, 0.9999) for i in range(L))
    b.set_xlim(max(lo, edges[0]), hi)
    sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, L - 1))
    fig.colorbar(sm, ax=b, label="layer")
    fig.suptitle(f"{profile.config.get('name') or 'model'}: {profile.tokens} calibration tokens")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
