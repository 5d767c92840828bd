"""deploy.open_session's overrides, which make the baselines of benchmarks/offload.py configurations
of the same engine: naive streaming (all flash, every neuron, no window cache), whole layers resident,
a selector in place of the predictors (the synthetic trace), reads through the page cache."""
from __future__ import annotations

import numpy as np
import pytest

from hetinfer.cli import main
from hetinfer.offload.deploy import load_deployment, open_session, tier_counts
from tests.test_deploy import _prepare

pytestmark = pytest.mark.slow


def _decode(dep, steps: int = 3, **overrides):
    """(ffn, its per-token report over `steps` decoded tokens, the last logits) of a session with `overrides`."""
    session = open_session(dep, **overrides)
    tr, ffn = dep.model.transformer, session.ffn
    logits = tr.forward(dep.model.tokenizer.encode("The capital of France is"), session.cache, ffn)
    ffn.reset_stats()
    for _ in range(steps):
        logits = tr.forward([int(logits.argmax())], session.cache, ffn)
    return ffn, ffn.report(), logits


def test_open_session_overrides_configure_the_baselines(tmp_path, offline):
    out, flash = tmp_path / "dep", tmp_path / "flash"
    flash.mkdir()
    assert main(_prepare(out, flash, offline, "-t", "1")) == 0  # -t reaches the steps that take it, not place
    dep = load_deployment(out)
    cfg, record = dep.model.config, dep.store.record_bytes
    none, whole = np.zeros(cfg.n_layers, np.int64), np.full(cfg.n_layers, cfg.n_ff, np.int64)

    naive, r, streamed = _decode(dep, resident=none, capacity=none, every_neuron=True)
    assert all(s.n_resident == 0 and s.cache.capacity == 0 for s in naive.layers)
    assert r["ffn_density"] == 1 and r["cache_hit_rate"] == 0
    assert r["flash_bytes_per_token"] >= cfg.n_layers * cfg.n_ff * record  # every record, every token

    ram, r, resident = _decode(dep, resident=whole, every_neuron=True)  # the plan's cache gets no slots: none left
    assert all(s.n_resident == cfg.n_ff and s.cache.capacity == 0 for s in ram.layers)
    assert r["flash_bytes_per_token"] == 0
    np.testing.assert_allclose(resident, streamed, rtol=0, atol=1e-4)  # placement moves bytes, not arithmetic

    ids = np.arange(0, cfg.n_ff, 3)
    traced, r, _ = _decode(dep, resident=none, capacity=whole, select=lambda layer, h: ids, window=1)
    assert r["ffn_density"] == pytest.approx(len(ids) / cfg.n_ff)
    assert r["cache_hit_rate"] == pytest.approx(2 / 3)  # the first token reads the set, the next two find it

    paged, r, _ = _decode(dep, capacity=none, direct=False)
    plan = tier_counts(dep.plan)
    assert paged.reader.method == "page_cache"
    assert [s.n_resident for s in paged.layers] == list(plan[:, 0] + plan[:, 1])
    assert all(s.cache.capacity == 0 for s in paged.layers) and 0 < r["ffn_density"] < 1
