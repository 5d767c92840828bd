"""A random llama model written to GGUF here (llama.cpp's Q/K permutation, mixed tensor types)
must give transformers' logits for the same (dequantized) weights."""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
T = gguf.GGMLQuantizationType


def _permute(w, n_head):  # what llama.cpp's converter does to Q/K rows
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_mixed_formats_and_permuted_qk_match_transformers(tmp_path, model):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=model.config.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    path = str(tmp_path / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    reader = gguf.GGUFReader(model.path)  # reuse the real vocabulary so the tokenizer section is valid
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(reader.fields["tokenizer.ggml.tokens"].contents())
    w.add_token_merges(reader.fields["tokenizer.ggml.merges"].contents())
    w.add_token_types(reader.fields["tokenizer.ggml.token_type"].contents())

    new_sd = {}

    def put(name, arr, qtype, hf_name, perm=None):
        q = gguf.quants.quantize(arr.astype(np.float32), qtype) if qtype not in (T.F32,) else arr.astype(np.float32)
        w.add_tensor(name, q, raw_dtype=qtype)
        deq = gguf.quants.dequantize(q, qtype).reshape(arr.shape)
        if perm is not None:  # undo the permutation for the transformers copy
            n = perm
            deq = deq.reshape(n, deq.shape[0] // n // 2, 2, *deq.shape[1:]).swapaxes(1, 2).reshape(deq.shape)
        new_sd[hf_name] = torch.from_numpy(np.ascontiguousarray(deq))

    put("token_embd.weight", sd["model.embed_tokens.weight"], T.Q8_0, "model.embed_tokens.weight")
    put("output.weight", sd["lm_head.weight"], T.F16, "lm_head.weight")
    put("output_norm.weight", sd["model.norm.weight"], T.F32, "model.norm.weight")
    kinds = {"attn_v": T.Q4_0, "attn_output": T.BF16, "ffn_gate": T.Q4_1, "ffn_up": T.Q8_0, "ffn_down": T.F32}
    hf_names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
    for i in range(2):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], 4), T.F16, p + "self_attn.q_proj.weight", 4)
        put(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], 2), T.Q8_0, p + "self_attn.k_proj.weight", 2)
        for k, qt in kinds.items():
            put(f"blk.{i}.{k}.weight", sd[p + hf_names[k] + ".weight"], qt, p + hf_names[k] + ".weight")
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], T.F32, p + "input_layernorm.weight")
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], T.F32, p + "post_attention_layernorm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    hf.load_state_dict(new_sd)

    from hetinfer.loader import load_model

    m = load_model(path)
    L0 = m.weights.layers[0]
    assert (L0.wv.qtype, L0.wo.qtype, L0.gate.qtype, m.weights.embed.qtype) == ("q4_0", "bf16", "q4_1", "q8_0")
    ids = [3, 99, 1000, 5, 42, 42, 7, 300, 12, 8]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    # Dequantized once to float32 the engine is exact; kept in block format the dot products quantize
    # activations to 8 bits per block (as llama.cpp does), which costs a little precision.
    exact = load_model(path, weights="f32")
    ours = exact.transformer.forward(ids, exact.transformer.new_cache(64), all_logits=True)
    assert np.abs(ours - ref).max() <= 1e-3
    native = m.transformer.forward(ids, m.transformer.new_cache(64), all_logits=True)
    assert np.abs(native - ref).max() <= 2e-2
    assert np.array_equal(native.argmax(-1), ref.argmax(-1))


def test_k_quant_converted_once_to_f16(tmp_path):
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(4, 144), dtype=np.uint8)  # Q4_K: d, dmin (f16), scales[12], qs[128]
    blocks[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    blocks[:, 2:4] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    path = str(tmp_path / "k.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("x.weight", blocks, raw_dtype=T.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from hetinfer.gguf_file import GGUFModel

    qt = GGUFModel(path).weight("x.weight")
    ref = gguf.quants.dequantize(blocks, T.Q4_K).reshape(4, 256)
    assert qt.qtype == "f16" and qt.shape == (4, 256)
    np.testing.assert_allclose(qt.dequantize(), ref, rtol=1e-3, atol=1e-4)


def _library_view(path):
    from hetinfer.gguf_file import _field_value

    r = gguf.GGUFReader(path)
    return {k: _field_value(f) for k, f in r.fields.items()}, list(r.tensors), r.data_offset, r.alignment


@pytest.mark.parametrize("which", ["real", "mixed"])
def test_lean_reader_reads_what_the_gguf_library_reads(which, model_path, tmp_path):
    """hetinfer's own header reader (it keeps no numpy view per metadata item) against gguf.GGUFReader: every
    metadata value with its Python type, every tensor's type, shape, offset, size, element type and bytes;
    on SmolLM2's file and on one with K-quant, integer, float64 and float16 tensors, booleans, non-ASCII
    strings and an array of arrays."""
    from hetinfer.gguf_file import read_gguf

    path = model_path
    if which == "mixed":
        path = str(tmp_path / "mixed.gguf")
        w = gguf.GGUFWriter(path, "llama")
        w.add_uint32("test.u32", 7)
        w.add_bool("test.flag", True)
        w.add_float64("test.f64", 0.25)
        w.add_array("test.nested", [[1, 2], [3]])
        w.add_array("test.strings", ["a", "ü", ""])
        rng = np.random.default_rng(0)
        w.add_tensor("k.weight", rng.integers(0, 256, size=(4, 144), dtype=np.uint8), raw_dtype=T.Q4_K)
        w.add_tensor("i.weight", np.arange(12, dtype=np.int32).reshape(3, 4))
        w.add_tensor("d.weight", rng.standard_normal((2, 8)))
        w.add_tensor("h.weight", rng.standard_normal((5, 32)).astype(np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    fields, tensors, start, alignment = read_gguf(path)
    want_fields, want_tensors, want_start, want_alignment = _library_view(path)
    assert (start, alignment) == (want_start, want_alignment)
    if which == "mixed":  # gguf's contents() flattens an array of arrays; the lean reader keeps its shape
        assert fields.pop("test.nested") == [[1, 2], [3]] and want_fields.pop("test.nested") == [1, 2, 3]
    assert fields == want_fields and [type(v) for v in fields.values()] == [type(v) for v in want_fields.values()]
    assert len(tensors) == len(want_tensors)
    for got, want in zip(tensors, want_tensors):
        assert (got.name, got.tensor_type, got.data_offset, got.n_bytes) == (want.name, want.tensor_type,
                                                                              int(want.data_offset), int(want.n_bytes))
        assert got.shape == tuple(int(d) for d in want.shape) and got.data.dtype == want.data.dtype
        assert np.array_equal(got.data.reshape(-1), np.asarray(want.data).reshape(-1))
