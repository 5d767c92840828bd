"""The dense engine on the kernels, per weight flag, against transformers on the same GGUF.

native (Q4_1/Q8_0 blocks read in place) and f32 decode every weight exactly as the reference
dequantizes it (native decode takes x in 31-bit fixed point per block, below float32 resolution),
so they keep the foundation's tolerance, max |logit diff| <= 1e-3 (measured 7e-5), for prefill and
for the decode path (fused attention kernel). llama.cpp's 8-bit x would not: measured 0.72 on
decode, top-1 agreement 97%. f16 rounds the weights
(measured max diff 0.07): stated bound 0.15 and top-1 agreement >= 99% of positions.
"""
import pytest
import torch

from hetinfer.loader import load_model

pytestmark = pytest.mark.slow

BOUNDS = {"native": (1e-3, 1.0), "f32": (1e-3, 1.0), "f16": (0.15, 0.99)}  # (max |diff|, top-1 agreement)


@pytest.fixture(scope="module")
def prompt_and_reference(model, hf_model, wikitext_eval):
    ids = model.tokenizer.encode(wikitext_eval[:3000])[:240]
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    return ids, ref


@pytest.mark.parametrize("weights", list(BOUNDS))
def test_engine_logits_per_weight_flag(model_path, prompt_and_reference, weights):
    ids, ref = prompt_and_reference
    max_diff, min_top1 = BOUNDS[weights]
    m = load_model(model_path, weights=weights)
    assert m.weights.layers[0].gate.qtype == ("q4_1" if weights == "native" else weights)
    tr = m.transformer
    prefill = tr.forward(ids, tr.new_cache(512), all_logits=True)  # T > 1: tiled GEMM path
    cache = tr.new_cache(512)
    tr.forward(ids[:180], cache)
    decode = torch.stack([tr.forward([t], cache) for t in ids[180:]])  # T = 1: GEMV + fused attention
    for ours, want in ((prefill, ref), (decode, ref[180:])):
        assert (ours - want).abs().max().item() <= max_diff
        assert (ours.argmax(-1) == want.argmax(-1)).float().mean().item() >= min_top1
