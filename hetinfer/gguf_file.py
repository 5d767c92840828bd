"""Read a GGUF file: configuration, memory-mapped weights and tokenizer metadata.

Weights in formats the kernels read (f32, f16, bf16, q8_0, q4_0, q4_1) stay views into the
mmapped file. Other types (K-quants, ...) are dequantized once at load to f16, the nearest
format that loses nothing measurable, and reported by `hetinfer info`.
"""
from __future__ import annotations

import os

import numpy as np

from hetinfer.config import ModelConfig, RopeScaling
from hetinfer.errors import HetinferError
from hetinfer.tensors import QTensor

_NATIVE = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}


class GGUFModel:
    """An open GGUF file: `fields` (metadata dict), `tensors` (name -> gguf ReaderTensor)."""

    def __init__(self, path: str):
        import gguf

        if not os.path.isfile(path):
            raise HetinferError(f"model file not found: {path}; pass an existing .gguf file or HF directory with -m")
        try:
            reader = gguf.GGUFReader(path)
            self.fields = {k: _field_value(f) for k, f in reader.fields.items()}
            self.tensors = {t.name: t for t in reader.tensors}
        except Exception as e:  # gguf raises assorted ValueError/IndexError/struct errors on bad files
            raise HetinferError(
                f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:120]}); "
                "it is truncated or corrupt: download or convert it again"
            ) from None
        self.path = path
        self.arch = str(self.fields.get("general.architecture", "?"))
        check_layout(path, reader.tensors, reader.data_offset, reader.alignment)

    def config(self) -> ModelConfig:
        try:
            return self._config()
        except (TypeError, ValueError) as e:  # metadata of the wrong type or out of range
            raise HetinferError(f"{self.path}: GGUF metadata is not a usable model config ({e}); the file is corrupt, "
                                "download or convert it again") from None

    def _config(self) -> ModelConfig:
        a, f = self.arch, self.fields
        if a not in ("llama", "qwen2"):
            raise HetinferError(
                f"{self.path}: architecture {a!r} is not supported; hetinfer runs llama (Llama 2/3, Mistral, "
                "SmolLM) and qwen2 models"
            )

        def need(key):
            if f"{a}.{key}" not in f:
                raise HetinferError(f"{self.path}: GGUF metadata lacks {a}.{key}; the file is incomplete, convert it again")
            return f[f"{a}.{key}"]

        n_heads = int(need("attention.head_count"))
        d_model = int(need("embedding_length"))
        head_dim = int(f.get(f"{a}.attention.key_length", d_model // n_heads))
        rope_scaling = None
        if "rope_freqs.weight" in self.tensors:  # llama3 scaling is baked into a per-frequency tensor
            rope_scaling = "rope_freqs"
        elif f.get(f"{a}.rope.scaling.type") == "linear":
            rope_scaling = RopeScaling(float(f[f"{a}.rope.scaling.factor"]), 1.0, 1.0, 0)
        tokens = f.get("tokenizer.ggml.tokens", [])
        return ModelConfig(
            arch=a,
            n_layers=int(need("block_count")),
            d_model=d_model,
            n_ff=int(need("feed_forward_length")),
            n_heads=n_heads,
            n_kv_heads=int(f.get(f"{a}.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            vocab_size=int(f.get(f"{a}.vocab_size", len(tokens))),
            context_length=int(need("context_length")),
            rope_theta=float(f.get(f"{a}.rope.freq_base", 10000.0)),
            norm_eps=float(f.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            activation="silu",
            tied_embeddings="output.weight" not in self.tensors,
            attn_bias=a == "qwen2",
            rope_scaling=None if rope_scaling == "rope_freqs" else rope_scaling,
            name=str(f.get("general.name", os.path.basename(self.path))),
            # llama.cpp permutes llama Q/K rows for interleaved (GPT-J style) rotary; qwen2 is not permuted.
            extra={"rope_interleaved": a == "llama", "source": "gguf"},
        )

    def weight(self, name: str) -> QTensor:
        if name not in self.tensors:
            raise HetinferError(f"{self.path}: tensor {name} is missing; the file is incomplete, convert it again")
        t = self.tensors[name]
        cols, rows = (int(t.shape[0]), int(t.shape[1]) if len(t.shape) > 1 else 1)
        qtype = _NATIVE.get(t.tensor_type.name)
        data = t.data.reshape(rows, -1)
        if qtype is None:
            import gguf

            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(rows, cols)
            return QTensor("f16", (rows, cols), w.astype(np.float16))
        if qtype == "bf16":
            data = data.view(np.uint16)
        return QTensor(qtype, (rows, cols), data)

    def vector(self, name: str) -> np.ndarray:
        """A 1-D tensor (norm weights, biases) as float32."""
        return self.weight(name).dequantize().reshape(-1)

    def tensor_types(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
        return out


def check_layout(path: str, tensors, data_start: int, alignment: int) -> None:
    """Every tensor's data aligned and not overlapping another's; a HetinferError naming the first tensor that
    is not (a damaged or hand-altered header that would otherwise load garbage).

    `tensors`: gguf ReaderTensors, whose `n_bytes` the reader derives from each tensor's type and shape; the
    reader itself refuses a tensor that ends past the end of the file."""
    def corrupt(name: str, problem: str) -> HetinferError:
        return HetinferError(f"{path}: tensor {name} {problem}; the file is corrupt, download or convert it again")

    spans = []
    for t in tensors:
        start, end = int(t.data_offset), int(t.data_offset) + int(t.n_bytes)
        if (start - data_start) % alignment:
            raise corrupt(t.name, f"starts at byte {start}, not on the file's {alignment}-byte alignment")
        spans.append((start, end, t.name))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise corrupt(name, f"overlaps tensor {other} by {end - start} bytes")


def _field_value(field):
    try:
        return field.contents()
    except Exception:
        return None
