"""Profiler: statistics against a hand computation, the layer runner against the engine, artefacts, data."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import data_path
from hetinfer.config import ModelConfig
from hetinfer.data import Source, calibration_sequences, parse_source, read_chats, shares, sliding_windows
from hetinfer.errors import ArtifactError, HetinferError
from hetinfer.loader import Model
from hetinfer.model import LayerWeights, Transformer, Weights, vec
from hetinfer.profiler import collect
from hetinfer.profiler.artifact import LEVELS, hist_quantile, load_profile
from hetinfer.profiler.collect import ProfileOptions, chain_order, coactivation, profile_sequences
from hetinfer.profiler.runner import FloatWeights, LayerRunner, Packed
from hetinfer.tensors import quantize


def tiny_model(seed=0, n_layers=2, d=64, n_ff=96, vocab=50, activation="silu", arch="llama", interleaved=True,
               zero_attention=False, embed=None, gate=None, up=None) -> Model:
    """A random float32 model built in memory (no tokenizer)."""
    rng = np.random.default_rng(seed)
    n_heads, n_kv = 4, 2
    hd = d // n_heads
    cfg = ModelConfig(arch=arch, n_layers=n_layers, d_model=d, n_ff=n_ff, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd,
                      vocab_size=vocab, context_length=1024, activation=activation, attn_bias=arch == "qwen2",
                      extra={"rope_interleaved": interleaved})

    def w(rows, cols, scale=0.2, given=None):
        a = given if given is not None else rng.standard_normal((rows, cols)) * scale
        return quantize(np.asarray(a, np.float32), "f32")

    def norm():
        return vec(1.0 + 0.1 * rng.standard_normal(d))

    def bias(n):
        return vec(0.1 * rng.standard_normal(n)) if arch == "qwen2" else None

    layers = [LayerWeights(
        attn_norm=norm(), wq=w(d, d), wk=w(n_kv * hd, d), wv=w(n_kv * hd, d),
        wo=w(d, d, given=np.zeros((d, d)) if zero_attention else None), ffn_norm=norm(),
        gate=w(n_ff, d, given=gate), up=w(n_ff, d, given=up), down=w(d, n_ff),
        bq=bias(d), bk=bias(n_kv * hd), bv=bias(n_kv * hd),
    ) for _ in range(n_layers)]
    weights = Weights(embed=w(vocab, d, 1.0, given=embed), output_norm=norm(), output=w(vocab, d), layers=layers)
    return Model(f"tiny-{seed}", cfg, weights, None, Transformer(cfg, weights), {}, f"tiny{seed:012d}")


def random_sequences(rng, n, vocab, lo=3, hi=70):
    return [rng.integers(0, vocab, rng.integers(lo, hi)).tolist() for _ in range(n)]


def run_cli(argv):
    from hetinfer.profiler.cli import add_parser

    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return args.run(args)


def test_profile_counts_match_hand_computation():
    # one ReLU layer whose attention output is zero: h = rms_norm(embedding) * ffn_norm exactly
    m = tiny_model(n_layers=1, activation="relu", zero_attention=True, vocab=5000)
    rng = np.random.default_rng(1)
    seqs = random_sequences(rng, 30, m.config.vocab_size)
    p = profile_sequences(m, seqs, ProfileOptions(samples=10**6, dtype="float32", chunk=100, coact_neighbors=5))

    L = m.weights.layers[0]
    packed = Packed(seqs)
    x = m.weights.embed.dequantize(packed.tokens.numpy()).astype(np.float64)  # tokens in the profile's order
    h = x / np.sqrt((x ** 2).mean(1, keepdims=True) + m.config.norm_eps) * L.ffn_norm
    a = np.abs(np.maximum(h @ L.gate.dequantize().T, 0) * (h @ L.up.dequantize().T))
    assert p.tokens == len(a) == sum(map(len, seqs))
    want_thr = np.maximum(np.quantile(a.ravel(), LEVELS), 0)
    np.testing.assert_allclose(p.stats["thresholds"][0], want_thr, rtol=1e-4, atol=1e-7)
    assert want_thr[0] == 0.0 < want_thr[-1]  # ReLU: low levels fall inside the natural sparsity
    for k, t in enumerate(p.stats["thresholds"][0]):
        # exact, except for values within float32 rounding of the threshold (the quantile is often a data value)
        near = (np.abs(a - t) <= 1e-5 * t).sum(0) if t > 0 else 0
        assert np.all(np.abs(p.stats["active_count"][0, k] - (a > t).sum(0)) <= near)
        assert np.sum(near) <= 2
    np.testing.assert_array_equal(p.stats["nonzero_count"][0], (a > 0).sum(0))
    np.testing.assert_allclose(p.mean_abs_activation()[0], a.mean(0), rtol=1e-4)
    np.testing.assert_allclose(p.activation_frequency(0.5)[0], p.stats["active_count"][0, 4] / len(a), rtol=1e-6)
    assert p.stats["hist"][0].sum() == a.size
    assert p.manifest["summary"]["natural_sparsity"] == pytest.approx((a == 0).mean(), abs=1e-4)
    # every token was sampled, so the stored FFN inputs are h itself
    inputs, seq = p.samples()
    np.testing.assert_allclose(inputs[0], h, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(seq, packed.sequence.numpy())


@pytest.mark.parametrize("arch,interleaved", [("llama", True), ("qwen2", False)])
def test_layer_runner_matches_engine_forward(arch, interleaved):
    m = tiny_model(seed=3, n_layers=3, arch=arch, interleaved=interleaved)
    rng = np.random.default_rng(2)
    seqs = random_sequences(rng, 7, m.config.vocab_size, 1, 150)  # mixed lengths: padded attention groups
    packed = Packed(seqs, bucket=32)
    assert any(g.valid is not None for g in packed.groups)
    w = FloatWeights(m)
    x = LayerRunner(m, packed, w, chunk=128).run()
    for k, ids in enumerate(seqs):
        ref = m.transformer.forward(ids, m.transformer.new_cache(256), all_logits=True)
        np.testing.assert_allclose(w.logits(x[packed.positions_of(k)]).numpy(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_layer_runner_matches_engine_on_real_model(model_f32, wikitext_eval):
    model = model_f32  # the exact float engine: the profiler's runner computes in float too
    ids = model.tokenizer.encode(wikitext_eval[:3000])
    seqs = [ids[:48], ids[100:120], ids[200:205]]  # the engine's prefill is slow: keep them short
    packed = Packed(seqs)
    w = FloatWeights(model)
    x = LayerRunner(model, packed, w).run()
    for k, s in enumerate(seqs):
        ref = model.transformer.forward(s, model.transformer.new_cache(256), all_logits=True)
        assert np.abs(w.logits(x[packed.positions_of(k)]).numpy() - ref).max() <= 1e-3


def test_bfloat16_profile_agrees_with_float32():
    m = tiny_model(seed=4, n_layers=2, d=64, n_ff=128)
    seqs = random_sequences(np.random.default_rng(5), 40, m.config.vocab_size, 30, 60)
    f32 = profile_sequences(m, seqs, ProfileOptions(samples=10**6, dtype="float32"))
    b16 = profile_sequences(m, seqs, ProfileOptions(samples=10**6, dtype="bfloat16"))
    np.testing.assert_allclose(b16.stats["thresholds"], f32.stats["thresholds"], rtol=0.03)
    diff = np.abs(b16.activation_frequency(0.5) - f32.activation_frequency(0.5))
    assert diff.mean() < 0.01 and diff.max() < 0.06


def test_coactivation_groups_neurons_that_fire_together():
    rng = np.random.default_rng(0)
    n, blocks, T = 40, 5, 600
    which = rng.integers(0, blocks, T)  # each token activates one block of 8 neurons (plus noise)
    active = (np.arange(n)[None, :] // 8 == which[:, None]) ^ (rng.random((T, n)) < 0.03)
    nbr, jac = coactivation(torch.from_numpy(active), m=7)
    assert (nbr[:, :7] // 8 == np.arange(n)[:, None] // 8).mean() > 0.95
    assert np.all(np.diff(jac, axis=1) <= 0) and np.all(jac <= 1)
    order = chain_order(nbr, active.sum(0))
    assert sorted(order.tolist()) == list(range(n))
    # neighbours in the order belong to the same block almost always (a block change at most 4 times)
    assert (np.diff(order // 8) != 0).sum() <= blocks - 1 + 2


def test_hist_quantile_matches_numpy_quantile():
    rng = np.random.default_rng(0)
    a = np.abs(rng.standard_normal(200_000) * np.exp(rng.standard_normal(200_000))).astype(np.float32)
    a[:20_000] = 0
    hist = collect.magnitude_histogram(a)
    from hetinfer.profiler.artifact import HIST_EDGES

    for q in (0.05, 0.2, 0.55, 0.9, 0.99):
        want = np.quantile(a, q)
        got = hist_quantile(hist, HIST_EDGES, q)
        assert got == pytest.approx(want, rel=0.04, abs=1e-9)


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    m = tiny_model(seed=7)
    seqs = random_sequences(np.random.default_rng(8), 40, m.config.vocab_size)
    p = profile_sequences(m, seqs, ProfileOptions(samples=500, coact_tokens=300))
    path = str(tmp_path_factory.mktemp("prof") / "tiny.profile")
    p.save(path)
    return m, p, path


def test_profile_round_trip(tiny_profile):
    m, p, path = tiny_profile
    q = load_profile(path, m)
    assert q.tokens == p.tokens and q.fingerprint == m.fingerprint and q.config == m.config.to_dict()
    for k, v in p.stats.items():
        np.testing.assert_array_equal(q.stats[k], v)
    np.testing.assert_array_equal(q.samples()[0], p.samples()[0])
    freq = q.activation_frequency(0.3)
    assert freq.dtype == np.float32 and freq.shape == (2, 96) and (0 <= freq).all() and (freq <= 1).all()
    for layer in range(2):
        assert sorted(q.neuron_order(layer).tolist()) == list(range(96))
    np.testing.assert_array_equal(q.thresholds(0.7), p.stats["thresholds"][:, 6])
    t = q.thresholds(0.65)  # between levels: from the histogram
    assert (q.thresholds(0.6) <= t).all() and (t <= q.thresholds(0.7)).all()
    with pytest.raises(ValueError, match="levels"):
        q.activation_frequency(0.55)
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert manifest["format"] == "hetinfer-profile" and manifest["version"] == 1 and manifest["layers"] == [0, 1]


def test_profile_errors_name_problem_and_fix(tiny_profile, tmp_path):
    import shutil

    m, p, path = tiny_profile
    other = tiny_model(seed=9)
    with pytest.raises(ArtifactError, match=f"fingerprint {m.fingerprint} but this model.*re-run `hetinfer profile`"):
        load_profile(path, other)
    bad = str(tmp_path / "v2")
    shutil.copytree(path, bad)
    mf = json.load(open(os.path.join(bad, "manifest.json")))
    json.dump(dict(mf, version=2), open(os.path.join(bad, "manifest.json"), "w"))
    with pytest.raises(ArtifactError, match="format version 2 but this hetinfer reads version 1; re-run"):
        load_profile(bad)
    json.dump(mf, open(os.path.join(bad, "manifest.json"), "w"))
    with open(os.path.join(bad, "stats.safetensors"), "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00garbage")
    with pytest.raises(ArtifactError, match="checksum"):
        load_profile(bad)
    with pytest.raises(ArtifactError, match="not found"):
        load_profile(str(tmp_path / "missing"))
    # overwriting: an existing profile is replaced atomically, anything else is refused
    p.save(path)
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".")]
    (tmp_path / "notes").mkdir()
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        p.save(str(tmp_path / "notes"))


def test_parse_source_and_shares(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abcdefghij")
    assert parse_source(str(f)) == Source(str(f))
    assert parse_source(f"{f}[:0.7]") == Source(str(f), 0.0, 0.7)
    assert parse_source(f"{f}[0.7:]").spec == f"{f}[0.7:1]"
    with pytest.raises(HetinferError, match="0 <= a < b <= 1"):
        parse_source(f"{f}[0.8:0.2]")
    with pytest.raises(HetinferError, match="not found"):
        parse_source(str(tmp_path / "nope.txt"))
    assert shares([100, 10_000], 1000) == [100, 900]
    assert shares([600, 600, 600], 900) == [300, 300, 300]
    assert shares([5, 5], 1000) == [5, 5]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 400), window=st.integers(2, 64), frac=st.floats(0.05, 1.0), bos=st.booleans())
def test_sliding_windows_score_every_token_once(n, window, frac, bos):
    stride = max(1, int(window * frac) - (1 if bos else 0))
    span = window - (1 if bos else 0)
    ids = list(range(1000, 1000 + n))
    if span < 2:
        with pytest.raises(HetinferError, match="too small"):
            sliding_windows(ids, window, stride, bos=7 if bos else None)
        return
    wins = sliding_windows(ids, window, stride, bos=7 if bos else None)
    scored = []
    for k, w in enumerate(wins):
        assert len(w.tokens) <= window
        assert w.first >= (1 if bos else 0)  # BOS is never a scored target
        if k > 0:  # tokens of context before the first target: window - stride, and never none
            assert w.first - (1 if bos else 0) + 1 >= max(1, span - stride)
        scored += w.tokens[w.first + 1:]
    assert scored == ids[1:]


def test_mt_bench_rendering_and_calibration_mix(model):
    mt = data_path("mt_bench", "question.jsonl")
    text = data_path("wikitext-2", "valid.txt")
    chats = read_chats(parse_source(mt), model.tokenizer)
    assert len(chats) == 160 and all(c.count("<|im_start|>user") == 1 for c in chats)
    assert chats[0].endswith("<|im_start|>assistant\n")
    seqs, report = calibration_sequences([parse_source(f"{text}[:0.7]"), parse_source(mt)], model.tokenizer, 20_000, 256)
    kinds = {r["kind"]: r["tokens"] for r in report}
    assert kinds["chat"] > 8000 and kinds["text"] >= 9000 and 20_000 <= sum(kinds.values()) < 20_000 + 2 * 256
    assert max(map(len, seqs)) == 256 and report[0]["slice"] == [0.0, 0.7]


def test_bad_chat_jsonl(tmp_path, model):
    f = tmp_path / "c.jsonl"
    f.write_text('{"turns": ["hi"]}\n{"question": 1}\n')
    with pytest.raises(HetinferError, match="c.jsonl:2: expected a `turns` list"):
        read_chats(parse_source(str(f)), model.tokenizer)


@pytest.mark.slow
def test_profile_cli_on_real_model(model_path, tmp_path):
    out, png = tmp_path / "smol.profile", tmp_path / "p.png"
    text, mt = data_path("wikitext-2", "valid.txt"), data_path("mt_bench", "question.jsonl")
    assert run_cli(["profile", "-m", model_path, "--data", f"{text}[:0.7]", mt, "--tokens", "3000",
                    "--samples", "1024", "-o", str(out), "--plot", str(png), "-q"]) == 0
    p = load_profile(str(out))
    assert 3000 <= p.tokens < 3000 + 2 * 512 and [s["kind"] for s in p.manifest["sources"]] == ["text", "chat"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    achieved = p.manifest["summary"]["achieved_sparsity"]
    assert all(abs(achieved[f"{s:g}"] - s) < 0.05 for s in LEVELS)
    assert p.activation_frequency(0.5).shape == (30, 1536)
