"""A corrupt model is refused with one line naming the tensor, at load (tensor layout) or on the first forward
pass (NaN/inf weights), instead of generating garbage with exit status 0. Random-weight GGUFs written here."""
import shutil

import numpy as np
import pytest

from hetinfer.errors import HetinferError
from test_bad_input_census import run_in_process

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
D, N_FF, LAYERS = 64, 96, 2


def write_tiny_gguf(path: str, vocab_from: str, poison: str | None = None) -> str:
    """A 2-layer llama GGUF with random weights (q8_0 matrices, f32 norms) and the real model's vocabulary;
    `poison` names a tensor whose rows' first block scale becomes NaN."""
    rng = np.random.default_rng(0)
    src = gguf.GGUFReader(vocab_from)
    tokens = src.fields["tokenizer.ggml.tokens"].contents()
    w = gguf.GGUFWriter(path, "llama")
    for add, v in ((w.add_block_count, LAYERS), (w.add_context_length, 128), (w.add_embedding_length, D),
                   (w.add_feed_forward_length, N_FF), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                   (w.add_layer_norm_rms_eps, 1e-5), (w.add_tokenizer_model, "gpt2"), (w.add_tokenizer_pre, "smollm"),
                   (w.add_token_list, tokens), (w.add_token_merges, src.fields["tokenizer.ggml.merges"].contents()),
                   (w.add_token_types, src.fields["tokenizer.ggml.token_type"].contents())):
        add(v)

    def put(name, rows, cols=None):
        if cols is None:
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(rows)).astype(np.float32))
            return
        q = gguf.quants.quantize((0.2 * rng.standard_normal((rows, cols))).astype(np.float32), T.Q8_0)
        if name == poison:
            q[:, 0:2] = np.array([np.nan], np.float16).view(np.uint8)  # each row's first block's f16 scale
        w.add_tensor(name, q, raw_dtype=T.Q8_0)

    put("token_embd.weight", len(tokens), D)
    put("output_norm.weight", D)
    for i in range(LAYERS):
        for name, rows, cols in (("attn_q", D, D), ("attn_k", D // 2, D), ("attn_v", D // 2, D), ("attn_output", D, D),
                                 ("ffn_gate", N_FF, D), ("ffn_up", N_FF, D), ("ffn_down", D, N_FF)):
            put(f"blk.{i}.{name}.weight", rows, cols)
        put(f"blk.{i}.attn_norm.weight", D)
        put(f"blk.{i}.ffn_norm.weight", D)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, model_path):
    return write_tiny_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"), model_path)


def _shift_offset(src: str, dst: str, name: str, by: int) -> str:
    shutil.copy(src, dst)
    r = gguf.GGUFReader(dst, "r+")
    t = next(t for t in r.tensors if t.name == name)
    offset = t.field.parts[-1]  # the tensor's data offset, relative to the data section (uint64 [1])
    offset[0] = int(offset[0]) + by
    r.data.flush()
    return dst


def test_tiny_gguf_loads_and_generates(tiny_gguf):
    outcome, err = run_in_process(["generate", "-m", tiny_gguf, "-p", "Hello", "-n", "2", "--temperature", "0"])
    assert outcome == "accepted", err


@pytest.mark.parametrize("by,problem", [
    (1, "tensor blk.0.ffn_up.weight starts at byte .* not on the file's 32-byte alignment"),
    (32, "tensor blk.0.ffn_up.weight overlaps tensor blk.0.ffn_down.weight by 32 bytes"),
    (1 << 40, "not a readable GGUF file .* truncated or corrupt"),  # past the end: the gguf reader refuses it
])
def test_altered_tensor_offsets_are_refused_at_load(tiny_gguf, tmp_path, by, problem):
    from hetinfer.loader import load_model

    bad = _shift_offset(tiny_gguf, str(tmp_path / "bad.gguf"), "blk.0.ffn_up.weight", by)
    with pytest.raises(HetinferError, match=f"{problem}.*again") as e:
        load_model(bad)
    assert "\n" not in str(e.value)


def test_altered_offset_in_the_real_model_is_refused(model_path, tmp_path):
    bad = _shift_offset(model_path, str(tmp_path / "smollm2.gguf"), "blk.7.ffn_down.weight", 32)
    outcome, err = run_in_process(["generate", "-m", bad, "-p", "Hi", "-n", "1"])
    assert outcome == "error" and "blk.7.ffn_down.weight overlaps tensor" in err, err


@pytest.mark.parametrize("poison,where", [("blk.1.ffn_down.weight", "layer 1: tensor down"),
                                          ("blk.0.attn_q.weight", "layer 0: tensor wq"),
                                          ("token_embd.weight", "the token embedding: tensor embed")])
def test_nan_weights_stop_the_first_forward_pass(model_path, tmp_path, poison, where):
    bad = write_tiny_gguf(str(tmp_path / "nan.gguf"), model_path, poison)
    outcome, err = run_in_process(["generate", "-m", bad, "-p", "Hello", "-n", "2", "--temperature", "0"])
    assert outcome == "error" and f"{where} holds NaN or infinite values" in err, err
