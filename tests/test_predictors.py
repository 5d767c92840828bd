"""Predictors: high recall where the active sets are learnable, calibration, artefact round trip."""
import json
import os

import numpy as np
import pytest
import torch

from hetinfer.errors import ArtifactError
from hetinfer.profiler.collect import ProfileOptions, profile_sequences
from hetinfer.profiler.predictors import TrainOptions, load_predictors
from hetinfer.profiler.train import calibrate, threshold_for_density, train_predictors
from hetinfer.sparse import predictor_ffn
from test_profiler import random_sequences, tiny_model

K, D, N_FF, VOCAB = 4, 32, 64, 400


def clustered_model(seed=0):
    """One layer (attention output zero) where a token of cluster t % K drives exactly the neurons j % K == t % K:
    the truly active set of every token is known and a rank-K predictor can find it."""
    rng = np.random.default_rng(seed)
    c = np.linalg.qr(rng.standard_normal((D, K)))[0].T  # K orthonormal directions
    embed = 3 * c[np.arange(VOCAB) % K] + 0.3 * rng.standard_normal((VOCAB, D))
    gate = 2 * c[np.arange(N_FF) % K] + 0.1 * rng.standard_normal((N_FF, D))
    up = c[np.arange(N_FF) % K] + 0.1 * rng.standard_normal((N_FF, D))
    return tiny_model(seed=seed, n_layers=1, d=D, n_ff=N_FF, vocab=VOCAB, zero_attention=True,
                      embed=embed, gate=gate, up=up)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    m = clustered_model()
    seqs = random_sequences(np.random.default_rng(1), 80, VOCAB, 20, 40)
    profile = profile_sequences(m, seqs, ProfileOptions(samples=10**6, dtype="float32"))
    opts = TrainOptions(sparsity=0.7, recall=0.95, ranks=(4, 8, 16), epochs=20, max_param_ratio=1.0, max_flops_ratio=1.0)
    preds, reports = train_predictors(m, profile, opts)
    path = str(tmp_path_factory.mktemp("pred") / "tiny.predictors")
    preds.save(path)
    return m, profile, preds, reports, path


def ffn_inputs(m, ids):
    """h of the clustered model for tokens `ids` (attention adds nothing, so h = rms_norm(embedding) * ffn_norm)."""
    E = torch.from_numpy(m.weights.embed.dequantize(np.asarray(ids)))
    return E / torch.sqrt(E.pow(2).mean(1, keepdim=True) + m.config.norm_eps) * torch.from_numpy(m.weights.layers[0].ffn_norm)


def test_predictor_reaches_high_recall_on_known_active_sets(trained):
    m, profile, preds, reports, _ = trained
    (r,) = reports
    assert r.recall >= 0.95 and r.precision >= 0.9
    assert r.density <= 0.3  # within the budget: the known set is 1/K = 25% of the neurons
    assert r.rank in (4, 8) and r.rank < 16  # adaptive sizing stops at the first rank within budget
    # the selected rows on fresh tokens are each token's own cluster
    ids = torch.arange(VOCAB)
    mask = preds.mask(0, ffn_inputs(m, ids))
    own = (torch.arange(N_FF)[None, :] % K) == (ids[:, None] % K)
    assert (mask & own).sum() / own.sum() > 0.95 and (mask & ~own).sum() / (~own).sum() < 0.05


def test_predictor_ffn_follows_dense_where_predictions_are_right(trained):
    m, _, preds, _, _ = trained
    ffn = predictor_ffn(m, preds, backend="torch")
    h = ffn_inputs(m, np.random.default_rng(3).integers(0, VOCAB, 50))
    dense = m.transformer.dense_ffn(0, h)
    out = ffn(0, h)
    want = ffn.weights.ffn_out(0, ffn.weights.gate_up(0, h) * preds.mask(0, h))
    torch.testing.assert_close(out, want)
    assert ffn.meter.overall() == pytest.approx(float(preds.mask(0, h).float().mean()))
    # 95% of the activation mass kept: close to dense, far closer than a random set of the same density
    act = ffn.weights.gate_up(0, h)
    rand = ffn.weights.ffn_out(0, act * (torch.rand(act.shape) < ffn.meter.overall()))
    assert (out - dense).norm() < 0.25 * dense.norm()
    assert (out - dense).norm() < 0.3 * (rand - dense).norm()


def test_decode_rows_are_the_mask_and_the_kernels_ffn_follows_it(trained):
    """One token at a time (the engine's decode): the rows from one kernel call are the mask's ids (but
    for logits within float32 rounding of the threshold), and the kernels backend's FFN over them is
    the torch reference's masked FFN."""
    m, _, preds, _, _ = trained
    kernel_ffn, torch_ffn = predictor_ffn(m, preds, backend="kernels"), predictor_ffn(m, preds, backend="torch")
    h = ffn_inputs(m, np.random.default_rng(4).integers(0, VOCAB, 40))
    logits = preds.logits(0, h)
    for t in range(h.shape[0]):
        rows = preds.rows(0, h[t : t + 1])
        want = preds.mask(0, h[t : t + 1])[0]
        near = (logits[t] - preds.threshold[0]).abs() < 1e-5
        got = torch.zeros_like(want)
        got[torch.from_numpy(rows)] = True
        assert rows.dtype == np.int64 and np.all(np.diff(rows) > 0)
        assert torch.equal(got[~near], want[~near])
        torch.testing.assert_close(kernel_ffn(0, h[t : t + 1]), torch_ffn(0, h[t : t + 1]), rtol=1e-4, atol=1e-5)
    assert kernel_ffn.meter.overall() == pytest.approx(torch_ffn.meter.overall(), abs=1e-3)


def test_selection_frequency_counts_the_rows_the_engine_computes():
    """`selection_frequency` over stored FFN inputs (in chunks) equals a direct count of the rows the
    engine's decode path (`rows`, one token at a time) selects, but for logits within float32 rounding of
    the threshold; a layer with threshold -inf (untrained) selects every neuron. Random predictors."""
    from hetinfer.profiler.predictors import Predictors

    rng = np.random.default_rng(7)
    L, S, r = 3, 150, 8
    w1 = [torch.from_numpy(rng.standard_normal((r, D), dtype=np.float32)) for _ in range(L)]
    w2 = [torch.from_numpy(rng.standard_normal((N_FF, r), dtype=np.float32)) for _ in range(L)]
    preds = Predictors({}, w1, w2, torch.tensor([0.0, 2.0, float("-inf")]))
    inputs = rng.standard_normal((L, S, D), dtype=np.float32)
    freq = preds.selection_frequency(inputs, chunk=64)  # chunks that do not divide S
    count, near = np.zeros((L, N_FF)), np.zeros((L, N_FF))
    for layer in range(L):
        for t in range(S):
            h = torch.from_numpy(inputs[layer, t : t + 1])
            count[layer, preds.rows(layer, h)] += 1
            near[layer] += (preds.logits(layer, h)[0] - preds.threshold[layer]).abs().numpy() < 1e-5
    assert freq.shape == (L, N_FF) and np.all(np.abs(freq * S - count) <= near + 1e-9)
    assert 0.2 < freq[0].mean() < 0.8 and freq[1].mean() < freq[0].mean() and (freq[2] == 1).all()


def test_calibrate_is_the_highest_threshold_reaching_recall():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 50, generator=g)
    mass = torch.rand(300, 50, generator=g) * (torch.rand(300, 50, generator=g) < 0.4)
    for target in (0.5, 0.9, 0.95, 0.999):
        thr, dens = calibrate(z, mass, target)
        kept = z > thr
        assert float((mass * kept).sum() / mass.sum()) >= target - 1e-9
        assert kept.float().mean().item() == pytest.approx(dens)
        tighter = z > z[kept].min()  # drop the weakest kept logit
        assert float((mass * tighter).sum() / mass.sum()) < target
    thr, dens = threshold_for_density(z, 0.3)
    assert (z > thr).float().mean().item() == pytest.approx(0.3, abs=1 / z.numel()) and dens == pytest.approx(0.3)


def test_predictors_round_trip_and_errors(trained, tmp_path):
    import shutil

    m, _, preds, reports, path = trained
    q = load_predictors(path, m)
    h = torch.randn(20, D)
    torch.testing.assert_close(q.logits(0, h), preds.logits(0, h))
    assert torch.equal(q.mask(0, h), preds.mask(0, h))
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert manifest["format"] == "hetinfer-predictors" and manifest["layers"] == [0]
    assert manifest["report"][0]["rank"] == reports[0].rank and manifest["summary"]["median_recall"] >= 0.95
    with pytest.raises(ArtifactError, match="fingerprint .* re-run `hetinfer train-predictors`"):
        load_predictors(path, tiny_model(seed=5))
    bad = str(tmp_path / "old")
    shutil.copytree(path, bad)
    json.dump(dict(manifest, version=0), open(os.path.join(bad, "manifest.json"), "w"))
    with pytest.raises(ArtifactError, match="version 0 but this hetinfer reads version 1"):
        load_predictors(bad)
    with pytest.raises(ArtifactError, match="is a hetinfer-predictors artefact, not a hetinfer-profile"):
        from hetinfer.profiler.artifact import load_profile

        load_profile(path)
