"""Random-weight HF checkpoints built here, loaded by hetinfer and compared with transformers."""
import json
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")


def _save(tmp_path, model, model_path_for_tokenizer, shards=True):
    from hetinfer.loader import load_model

    out = tmp_path / "ckpt"
    size = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(out, max_shard_size=f"{size // 2 // 1000 + 1}KB" if shards else "10GB")
    # any byte-level BPE tokenizer.json will do for logits; take the default model's
    load_model(model_path_for_tokenizer).tokenizer.backend.save(str(out / "tokenizer.json"))
    return out


def _compare(ckpt, hf):
    from hetinfer.loader import load_model

    m = load_model(str(ckpt))
    ids = [5, 17, 300, 42, 1000, 7, 7, 123, 9]
    ours = m.transformer.forward(ids, m.transformer.new_cache(64), all_logits=True)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() <= 1e-4
    return m


def test_llama_gqa_untied_odd_ffn_two_shards(tmp_path, model_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=128, rope_theta=5000.0,
        rms_norm_eps=1e-6,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    ckpt = _save(tmp_path, hf, model_path)
    assert os.path.exists(ckpt / "model.safetensors.index.json")
    assert len(set(json.load(open(ckpt / "model.safetensors.index.json"))["weight_map"].values())) >= 2
    m = _compare(ckpt, hf)
    assert not m.config.tied_embeddings and m.config.n_ff == 100 and m.config.n_kv_heads == 2


def test_llama3_rope_scaling_and_relu(tmp_path, model_path):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, hidden_act="relu", max_position_embeddings=256,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    m = _compare(_save(tmp_path, hf, model_path, shards=False), hf)
    assert m.config.activation == "relu" and m.config.rope_scaling is not None


def test_qwen2_biases(tmp_path, model_path):
    torch.manual_seed(2)
    cfg = transformers.Qwen2Config(
        vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    for layer in hf.model.layers:  # make the biases matter
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.normal_(proj.bias, std=0.5)
    m = _compare(_save(tmp_path, hf, model_path, shards=False), hf)
    assert m.config.arch == "qwen2" and m.config.attn_bias
