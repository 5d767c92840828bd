"""The dense engine on the kernels, per weight flag, on the real default model.

f32 decodes every weight exactly as the reference dequantizes it and stays float, so it keeps the
foundation's tolerance against transformers, max |logit diff| <= 1e-3 (measured 7e-5), for prefill
and for the decode path (fused attention kernel). f16 rounds the weights (measured max diff 0.07):
stated bound 0.15 and top-1 agreement >= 99% of positions.

native (Q4_1/Q8_0 blocks read in place) quantizes activations to 8 bits per block of 32 in its dot
products, like llama.cpp, so it is compared with the f32 engine over a 320-token WikiText prompt:
measured max |logit diff| 1.12 and top-1 agreement 96.3% (prefill), 1.0-1.15 and 94-95% (decode).
Native decode against native prefill differs as much (measured 1.13-1.25, 92-94%): any float-level
difference between the two paths moves some activations across a rounding boundary of the 8-bit
grid. Stated bounds: max |diff| <= 2.0 and top-1 agreement >= 90%.
"""
import numpy as np
import pytest
import torch

from hetinfer import kernels
from hetinfer.loader import load_model

pytestmark = pytest.mark.slow

BOUNDS = {"f32": (1e-3, 1.0), "f16": (0.15, 0.99)}  # (max |diff|, top-1 agreement) against transformers
# Native block formats quantize every activation to 8 bits, so a 1-ulp change anywhere (fastmath sums
# compiled fresh vs loaded from numba's cache differ by ~4e-8) flips roundings that 30 layers amplify:
# over these 160-320 WikiText tokens, top-1 agreement measured 0.94-0.96 against the f32 engine and
# 0.92-0.94 between native decode and native prefill, max |diff| 1.0-1.3. Real errors are caught:
# decoding with the wrong RoPE layout measured top-1 0.27 and max |diff| 45; overwriting the last
# prefill token's cache entry (context off by one) kept top-1 at 0.91 but max |diff| rose to 5.9.
NATIVE_MAX_DIFF, NATIVE_MIN_TOP1 = 2.0, 0.90


@pytest.fixture(scope="module")
def prompt_and_reference(model, hf_model, wikitext_eval):
    ids = model.tokenizer.encode(wikitext_eval[:3000])[:240]
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    return ids, ref


def prefill_and_decode(m, ids, split, kv="f32"):
    """All-position logits from one prefill, and from a prefill of ids[:split] then one token at a time
    (KV cache of element type `kv`)."""
    tr = m.transformer
    prefill = tr.forward(ids, tr.new_cache(512, kv), all_logits=True)  # T > 1: tiled GEMM path
    cache = tr.new_cache(512, kv)
    tr.forward(ids[:split], cache)
    decode = np.stack([tr.forward([t], cache) for t in ids[split:]])  # T = 1: GEMV + fused attention
    return prefill, decode


def agreement(ours, want, max_diff, min_top1):
    diff = float(np.abs(ours - want).max())
    top1 = float((ours.argmax(-1) == want.argmax(-1)).mean())
    assert diff <= max_diff and top1 >= min_top1, f"max |diff| {diff:.3g} (<= {max_diff}), top-1 {top1:.3f} (>= {min_top1})"


@pytest.mark.parametrize("weights", list(BOUNDS))
def test_engine_logits_per_weight_flag(model_path, prompt_and_reference, weights):
    ids, ref = prompt_and_reference
    m = load_model(model_path, weights=weights)
    assert m.weights.layers[0].gate.qtype == weights
    prefill, decode = prefill_and_decode(m, ids, 180)
    for ours, want in ((prefill, ref), (decode, ref[180:])):
        agreement(ours, want, *BOUNDS[weights])


def test_packing_before_the_first_prompt_changes_no_logit(model_path, model):
    """Transformer.pack(ffn=False) packs every layer's attention (and a Q4 head), not the FFN that a deployment or a
    sparse mode reads as rows of its own; pack() packs the FFN too. Logits are those of weights packed lazily."""
    m = load_model(model_path)
    L = m.transformer.w.layers
    attention = [W for layer in L for W in (layer.wq, layer.wk, layer.wv, layer.wo)]
    ffn = [W for layer in L for W in (layer.gate, layer.up, layer.down)]
    assert m.transformer.pack(ffn=False) == sum(map(kernels.packed_nbytes, attention + [m.weights.output]))
    assert all(kernels.packed_nbytes(W) > 0 for W in attention) == kernels.simd.PACKS
    assert not any("_dense_info" in W.__dict__ for W in ffn)
    assert m.transformer.pack() == sum(map(kernels.packed_nbytes, attention + ffn + [m.weights.output]))
    assert all(kernels.packed_nbytes(W) > 0 for W in ffn) == kernels.simd.PACKS
    ids = model.tokenizer.encode("The capital of France is")

    def prompt_and_step(tr):
        cache = tr.new_cache(16)
        return tr.forward(ids, cache), tr.forward([ids[-1]], cache)

    assert all(np.array_equal(a, b) for a, b in zip(prompt_and_step(m.transformer), prompt_and_step(model.transformer)))


def test_native_block_formats_against_f32_engine(model, model_f32, wikitext_eval):
    """8-bit activations (native Q4_1/Q8_0) against the exact float engine, and native decode against
    native prefill, over >= 300 tokens of WikiText."""
    assert model.weights.layers[0].gate.qtype == "q4_1" and model_f32.weights.layers[0].gate.qtype == "f32"
    ids = model.tokenizer.encode(wikitext_eval[:4000])[:320]
    assert len(ids) >= 300
    prefill, decode = prefill_and_decode(model, ids, 160)
    exact = model_f32.transformer.forward(ids, model_f32.transformer.new_cache(512), all_logits=True)
    agreement(prefill, exact, NATIVE_MAX_DIFF, NATIVE_MIN_TOP1)
    agreement(decode, exact[160:], NATIVE_MAX_DIFF, NATIVE_MIN_TOP1)
    agreement(decode, prefill[160:], NATIVE_MAX_DIFF, NATIVE_MIN_TOP1)


# A float16 KV cache against a float32 one over 320 WikiText tokens. With float weights (the f32 engine) the
# cache's rounding is the only difference: measured max |logit diff| 0.022 and top-1 agreement 100%, prefill
# and decode alike; f16 decode against f16 prefill 0.0073 and 100% (a 1-ulp float32 difference between the
# GEMM and GEMV projections of k may round to the neighbouring float16). The native model (8-bit activations)
# amplifies any difference as it does between its own paths: f16 against f32 prefill measured 1.04 and 97.8%,
# decode 1.19 and 94.4% (its f32 decode against f32 prefill: 1.22 and 96.9%). Greedy 200-token chat answers
# of the native model with f16 differ from f32 on all 5 prompts tried (with f32 weights: on none of 2), so f32
# stays the engines' default.
F16_KV_MAX_DIFF, F16_KV_MIN_TOP1 = 0.1, 0.99


def test_f16_kv_cache_against_f32(model, model_f32, wikitext_eval):
    ids = model.tokenizer.encode(wikitext_eval[:4000])[:320]
    assert len(ids) >= 300
    pre32, dec32 = prefill_and_decode(model_f32, ids, 160, "f32")
    pre16, dec16 = prefill_and_decode(model_f32, ids, 160, "f16")
    agreement(pre16, pre32, F16_KV_MAX_DIFF, F16_KV_MIN_TOP1)
    agreement(dec16, dec32, F16_KV_MAX_DIFF, F16_KV_MIN_TOP1)
    agreement(dec16, pre16[160:], F16_KV_MAX_DIFF, F16_KV_MIN_TOP1)  # decode and prefill share one f16 cache
    tr = model.transformer
    native32 = tr.forward(ids, tr.new_cache(512, "f32"), all_logits=True)
    agreement(tr.forward(ids, tr.new_cache(512, "f16"), all_logits=True), native32, NATIVE_MAX_DIFF, NATIVE_MIN_TOP1)
