"""KV-cache decode against full recomputation, sampling, stop handling on the real model."""
import numpy as np
import pytest

from hetinfer import kernels
from hetinfer.errors import HetinferError
from hetinfer.generate import PREFILL_CHUNK, Session
from hetinfer.kernels import threads
from hetinfer.sampling import SamplingParams, candidates, make_generator, sample


def test_incremental_decode_equals_full_recompute(model_f32):  # float engine: exact up to float32 rounding
    model = model_f32
    tr = model.transformer
    ids = model.tokenizer.encode("Activation sparsity lets a runtime skip most of the feed-forward network")
    cache = tr.new_cache(128)
    step_logits = [tr.forward(ids[:5], cache)]
    for t in ids[5:]:
        step_logits.append(tr.forward([t], cache))
    full = tr.forward(ids, tr.new_cache(128), all_logits=True)
    for i, logits in enumerate(step_logits):
        assert np.abs(logits - full[4 + i]).max() <= 1e-4


def test_f16_cache_decode_matches_prefill_on_random_model():
    """Random float weights (qwen2: q/k/v biases), a float16 KV cache: prefill (`kernels.attention_prompt`) and decode (the
    fused kernel) write the same float16 keys and values, to one float16 step (their float32 projections may
    differ by rounding), and give the same logits; the cache halves the float32 one's bytes."""
    from test_profiler import tiny_model

    m = tiny_model(arch="qwen2", vocab=64)
    tr, ids = m.transformer, np.random.default_rng(0).integers(0, 64, 40).tolist()
    caches = {kv: tr.new_cache(64, kv) for kv in ("f16", "f32")}
    full = tr.forward(ids, caches["f16"], all_logits=True)
    cache = tr.new_cache(64, "f16")
    tr.forward(ids[:10], cache)
    steps = np.stack([tr.forward([t], cache) for t in ids[10:]])
    assert cache.k.dtype == cache.v.dtype == np.float16
    for a, b in ((cache.k, caches["f16"].k), (cache.v, caches["f16"].v)):
        np.testing.assert_allclose(a[:, :40].astype(np.float32), b[:, :40].astype(np.float32), rtol=2**-10, atol=1e-6)
    np.testing.assert_allclose(steps, full[10:], rtol=1e-4, atol=2e-4)  # measured 3e-5; f16 vs f32 differ 5e-3
    f32 = tr.forward(ids, caches["f32"], all_logits=True)
    assert 0 < np.abs(full - f32).max() < 0.01 * np.abs(f32).max()  # rounded, but only just
    assert caches["f16"].k.nbytes * 2 == caches["f32"].k.nbytes
    assert 2 * caches["f16"].k.nbytes == m.config.kv_cache_bytes(64, "f16") == m.config.kv_cache_bytes(64) // 2
    with pytest.raises(ValueError, match="must be one of f32, f16"):
        tr.new_cache(64, "f8")


# A system prompt longer than one prefill chunk: its first chunk is what a later request can reuse.
SYSTEM = ("You are a careful assistant for a small bakery. " + " ".join(
    f"Rule {i}: answer questions about bread, cakes and opening hours politely and briefly." for i in range(1, 25)))


def test_prefix_reuse_is_bit_identical_to_a_fresh_prefill(model):
    """Native 8-bit activations: the shared prefix computed in any other order (the previous prompt's
    partial chunk, its generated tokens) changes the logits; reuse keeps only whole chunks."""
    tok = model.tokenizer
    ask = lambda q: tok.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])  # noqa: E731
    a, b = ask("When do you open on Sundays?"), ask("Do you sell rye bread?")
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert PREFILL_CHUNK < shared < len(a) < 2 * PREFILL_CHUNK
    fresh, cached = Session(model, n_ctx=1024)._prefill(a)
    assert cached == 0
    s = Session(model, n_ctx=1024)
    "".join(s.stream(b, SamplingParams(temperature=0, max_tokens=8)))  # b's prompt, then its answer, in the cache
    again, cached = s._prefill(a)
    assert cached == PREFILL_CHUNK and np.array_equal(again, fresh)
    stored, cached = s._prefill(a)  # the same prompt again: its stored logits
    assert stored is again and cached == len(a)
    longer = a + tok.encode("Thanks!")
    assert np.array_equal(s._prefill(longer)[0], Session(model, n_ctx=1024)._prefill(longer)[0])


def test_prompt_logits_do_not_depend_on_the_thread_count(model):
    """Auto threads run the kernels on as many threads as cores are free (kernels.set_threads): a prompt's
    products and attention must give the same bits on any count."""
    if len(threads._cores()) < 2:
        pytest.skip("one core: nothing to compare")
    ids = model.tokenizer.encode(SYSTEM)[:40]  # past GEMV_MAX_T: the prompt path of numpy's GEMM
    outs = []
    try:
        for n in (1, 2):
            kernels.set_threads(n)
            outs.append(model.transformer.forward(ids, model.transformer.new_cache(128), all_logits=True))
    finally:
        kernels.set_threads()
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.slow
def test_greedy_answer_does_not_depend_on_the_request_before(model):
    """Request A, a different request B, then A again: A's answer is the one a fresh session gives."""
    chat = lambda q: [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]  # noqa: E731
    p = SamplingParams(temperature=0, max_tokens=24)
    want = "".join(Session(model, n_ctx=1024).chat(chat("When do you open on Sundays?"), p))
    s = Session(model, n_ctx=1024)
    for q in ("Do you sell rye bread?", "When do you open on Sundays?"):
        got = "".join(s.chat(chat(q), p))
    assert got == want and s.stats.cached_tokens == PREFILL_CHUNK


def test_layers_know_their_device_and_gpu_weights_run_in_forward():
    """Random float weights; layer 1's weights as `kernels.GPUTensor`s. On the CPU stand-in (the torch path
    the CUDA kernels take, on the CPU) forward gives the all-CPU model's logits, prefill and decode; on
    another device the layer says so and forward moves x there before layer 1 and back before layer 2."""
    from test_profiler import tiny_model

    import torch

    m = tiny_model(n_layers=3)
    tr, ids = m.transformer, np.random.default_rng(1).integers(0, 50, 12).tolist()

    def logits():
        cache = tr.new_cache(32)
        return np.concatenate([tr.forward(ids[:8], cache, all_logits=True), np.stack([tr.forward([t], cache) for t in ids[8:]])])

    want = logits()
    assert tr.moves == {} and {L.device for L in m.weights.layers} == {kernels.HOST}
    L = m.weights.layers[1]
    names = ("wq", "wk", "wv", "wo", "gate", "up", "down")
    cpu_weights = {n: getattr(L, n) for n in names}

    def place(device: str) -> None:
        for n in names:
            setattr(L, n, kernels.to_cuda(cpu_weights[n], device))
        tr.update_devices()

    place("meta")
    assert L.device == torch.device("meta") and m.weights.layers[2].device == kernels.HOST
    assert tr.moves == {1: torch.device("meta"), 2: kernels.HOST}
    place("cpu")  # the stand-in: torch tensors on the CPU, another device than the host's numpy arrays
    assert L.device == torch.device("cpu") and tr.moves == {1: torch.device("cpu"), 2: kernels.HOST}
    np.testing.assert_allclose(logits(), want, rtol=1e-4, atol=1e-4)  # f32 weights: float32 rounding only


def test_seeded_sampling_is_reproducible_and_seeds_differ(model):
    # native 8-bit activations: a repeated prompt must not be recomputed through the one-token path
    # (its logits differ from the batched prompt path's by up to ~1), so the session keeps them
    s = Session(model, n_ctx=256)
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=123, max_tokens=12)
    a = "".join(s.complete("Once upon a time", p))
    b = "".join(s.complete("Once upon a time", p))
    c = "".join(s.complete("Once upon a time", SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                                               seed=7, max_tokens=12)))
    d = "".join(Session(model, n_ctx=256).complete("Once upon a time", p))
    assert a == b == d and a != c and s.stats.gen_tokens == 12


def _full_vocab_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The filters as plainly as possible, over the whole vocabulary, in float64 (what `candidates` must equal)."""
    logits = logits.astype(np.float64)
    if p.top_k > 0:
        kth = np.sort(logits)[::-1][p.top_k - 1]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits / p.temperature - np.max(logits / p.temperature))
    probs /= probs.sum()
    if p.min_p > 0:
        probs[probs < p.min_p * probs.max()] = 0
    if p.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        probs[order[before >= p.top_p]] = 0
    return probs / probs.sum()


@pytest.mark.parametrize("kw", [dict(), dict(top_k=0, top_p=0.9, min_p=0), dict(top_k=0, top_p=1, min_p=0.1),
                                dict(temperature=0.5, top_k=5, top_p=1, min_p=0),
                                dict(temperature=1.3, top_k=0, top_p=1, min_p=0)])
def test_candidates_equal_full_vocabulary_filters(kw):
    logits = (np.random.default_rng(0).standard_normal(1000) * 3).astype(np.float32)
    p = SamplingParams(**kw)
    probs, ids = candidates(logits, p)
    got = np.zeros(1000)
    got[np.arange(1000) if ids is None else ids] = probs / probs.sum()
    np.testing.assert_allclose(got, _full_vocab_probs(logits, p), atol=1e-6)


def test_sampling_filters():
    logits = np.array([5.0, 4.0, 1.0, 0.0, -1.0], np.float32)
    g = make_generator(0)
    assert sample(logits, SamplingParams(temperature=0), [], g) == 0
    picks = {sample(logits, SamplingParams(temperature=5.0, top_k=2, top_p=1, min_p=0), [], g) for _ in range(200)}
    assert picks == {0, 1}
    picks = {sample(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.5, min_p=0), [], g) for _ in range(100)}
    assert picks == {0}
    picks = {sample(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1, min_p=0.3), [], g) for _ in range(200)}
    assert picks == {0, 1}
    # repetition penalty demotes the seen best token below the runner-up
    assert sample(logits, SamplingParams(temperature=0, repeat_penalty=2.0), [0], g) == 1
    with pytest.raises(HetinferError):
        SamplingParams(top_p=0)


def test_sampling_draws_tokens_at_their_probabilities():
    """The seeded inverse-CDF draw: over 20,000 draws each token's share is within 0.01 (about 3 standard
    deviations) of its probability, and a seed repeats its draws."""
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    draws = [sample(logits, p, [], g) for g in [make_generator(3)] for _ in range(20000)]
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / len(draws), probs, atol=0.01)
    again = make_generator(3)
    assert [sample(logits, p, [], again) for _ in range(50)] == draws[:50]


def test_stop_strings_and_context_limit(model):
    s = Session(model, n_ctx=64)
    text = "".join(s.complete("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=20, stop=[" 7"])))
    assert " 7" not in text and text.strip().startswith("5") and s.stats.finish_reason == "stop"
    with pytest.raises(HetinferError, match="exceeds the context"):
        s.complete("word " * 80, SamplingParams(max_tokens=4))
