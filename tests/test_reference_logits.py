"""The dense engine against Hugging Face transformers on the real default model (same GGUF), with
`weights="f32"` (`model_f32`): the exact float engine."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def _prompts(model, wikitext_eval):
    tok = model.tokenizer
    chat = tok.render_chat([{"role": "user", "content": "Write a haiku about memory hierarchies."}])
    long_ids = tok.encode(wikitext_eval[:4000])[:320]
    assert len(long_ids) >= 300
    return [tok.encode("The capital of France is"), tok.encode(chat), long_ids]


def test_logits_match_transformers(model_f32, hf_model, wikitext_eval):
    model = model_f32
    for ids in _prompts(model, wikitext_eval):
        ours = model.transformer.forward(ids, model.transformer.new_cache(512), all_logits=True)
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].numpy()
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= 1e-3


def test_greedy_continuations_match_transformers(model_f32, hf_model, wikitext_eval):
    model = model_f32
    for ids in _prompts(model, wikitext_eval):
        cache = model.transformer.new_cache(512)
        logits, ours = model.transformer.forward(ids, cache), []
        for _ in range(32):
            ours.append(int(logits.argmax()))
            logits = model.transformer.forward([ours[-1]], cache)
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert ours == ref
