"""The synthetic active-set trace: its density, hot/cold skew and token-to-token reuse match what its
docstring states, and it is deterministic from the seed in any access order."""
import numpy as np
import pytest

from hetinfer.offload.trace import Trace, TraceConfig

N_FF, TOKENS = 2048, 512


def masks(trace: Trace, layer: int) -> np.ndarray:
    """bool [TOKENS, n_ff]: which neurons were active at each token."""
    out = np.zeros((TOKENS, trace.cfg.n_ff), dtype=bool)
    for t in range(TOKENS):
        ids = trace.active(layer, t)
        assert ids.dtype == np.int64 and (np.diff(ids) > 0).all() and 0 <= ids.min() and ids.max() < N_FF
        out[t, ids] = True
    return out


@pytest.mark.parametrize("density,stay", [(0.10, 0.5), (0.05, 0.8), (0.10, 0.0)])
def test_trace_has_the_stated_density_skew_and_reuse(density, stay):
    trace = Trace(TraceConfig(n_layers=2, n_ff=N_FF, density=density, stay=stay, seed=3))
    p = trace.freq.astype(np.float64)
    assert p.shape == (2, N_FF) and p.mean(axis=1) == pytest.approx([density, density], rel=1e-3)
    top = round(0.2 * N_FF)
    for layer in range(2):
        m = masks(trace, layer)
        assert m.mean() == pytest.approx(density, rel=0.05)
        fires = m.sum(axis=0)  # [n_ff]
        hottest = np.argsort(-p[layer])[:top]  # by the stated frequencies, not the measured ones
        assert fires[hottest].sum() / fires.sum() == pytest.approx(0.8, abs=0.02)
        assert np.abs(fires / TOKENS - p[layer]).mean() < 0.02  # each neuron fires at its own frequency
        now, nxt = m[:-1], m[1:]
        on_on = (now & nxt).sum() / now.sum()
        off_on = (~now & nxt).sum() / (~now).sum()
        q = p[layer]
        assert on_on == pytest.approx((q * (stay + (1 - stay) * q)).sum() / q.sum(), abs=0.02)
        assert off_on == pytest.approx(((1 - q) * (1 - stay) * q).sum() / (1 - q).sum(), abs=0.01)


def test_hot_neurons_are_scattered_and_layers_differ():
    trace = Trace(TraceConfig(n_layers=2, n_ff=N_FF))
    hot = [set(np.argsort(-trace.freq[layer])[:100].tolist()) for layer in range(2)]
    assert len(hot[0] & hot[1]) < 30 and max(hot[0]) > N_FF // 2


def test_trace_is_deterministic_in_any_access_order():
    cfg = TraceConfig(n_layers=2, n_ff=300, seed=7)
    a, b = Trace(cfg), Trace(cfg)
    order = [200, 3, 130, 64, 63, 0, 199]
    seq = {t: a.active(1, t) for t in range(201)}
    for t in order:
        np.testing.assert_array_equal(b.active(1, t), seq[t])
    other = Trace(TraceConfig(n_layers=2, n_ff=300, seed=8))
    assert any(not np.array_equal(other.active(1, t), seq[t]) for t in range(10))
    np.testing.assert_array_equal(a.freq, b.freq)


def test_unreachable_statistics_are_refused():
    with pytest.raises(ValueError, match="hot_share"):  # 20% of neurons cannot serve 80% at 30% density
        Trace(TraceConfig(n_layers=1, n_ff=1000, density=0.3))
    with pytest.raises(ValueError, match="stay"):
        Trace(TraceConfig(n_layers=1, n_ff=1000, stay=1.0))
