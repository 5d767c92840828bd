"""Read a GGUF file: configuration, memory-mapped weights and tokenizer metadata.

Weights in formats the kernels read (f32, f16, bf16, q8_0, q4_0, q4_1) stay views into the
mmapped file. Other types (K-quants, ...) are dequantized once at load to f16, the nearest
format that loses nothing measurable, and reported by `hetinfer info`.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from hetinfer.config import ModelConfig, RopeScaling
from hetinfer.errors import HetinferError
from hetinfer.tensors import QTensor

_NATIVE = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}


class GGUFModel:
    """An open GGUF file: `fields` (metadata dict), `tensors` (name -> tensor info with `data`, a view into
    the mapped file)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise HetinferError(f"model file not found: {path}; pass an existing .gguf file or HF directory with -m")
        try:
            self.fields, tensors, data_start, alignment = read_gguf(path)
        except Exception:  # not a little-endian GGUF this reader parses: the gguf library's reader, and its error
            self.fields, tensors, data_start, alignment = _read_with_library(path)
        self.tensors = {t.name: t for t in tensors}
        self.path = path
        self.arch = str(self.fields.get("general.architecture", "?"))
        check_layout(path, tensors, data_start, alignment)

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

    `tensors`: GGUFTensors or gguf ReaderTensors, whose `n_bytes` the reader derives from each tensor's type
    and shape; both readers refuse a tensor that ends past the end of the file."""
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


def _read_with_library(path: str) -> tuple[dict, list, int, int]:
    """`read_gguf`'s result from gguf.GGUFReader (big-endian files), or its error as a HetinferError."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        return ({k: _field_value(f) for k, f in reader.fields.items()}, list(reader.tensors), reader.data_offset,
                reader.alignment)
    except Exception as e:  # gguf raises assorted ValueError/IndexError/struct errors on bad files
        raise HetinferError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:120]}); "
            "it is truncated or corrupt: download or convert it again"
        ) from None


@dataclass
class GGUFTensor:
    """One tensor's header entry and its bytes in the mapped file (the fields of gguf's ReaderTensor that
    hetinfer reads)."""
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ne0 (columns) first, as GGUF stores it
    data_offset: int  # absolute byte offset in the file
    n_bytes: int
    data: np.ndarray  # [rows, columns] of the element type for f32/f16/f64/ints, else uint8 [rows, row bytes]


# GGUF metadata value types -> numpy scalar types (8: string, 9: array)
_VALUE_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
                 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_ELEMENT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                   "I32": np.int32, "I64": np.int64}


def read_gguf(path: str) -> tuple[dict, list[GGUFTensor], int, int]:
    """(metadata, tensors, data start, alignment) of a little-endian GGUF v2/v3 file, its tensors views into
    one read-only map of the file.

    A lean reader: gguf.GGUFReader keeps a numpy view per metadata item (~250,000 for a 49k-token
    vocabulary: ~85 MB held and ~170 MB at its peak), where this one makes the Python values directly.
    Metadata values are what gguf's `ReaderField.contents()` gives (str, int, float, bool, lists of them),
    except that an array of arrays stays nested (gguf flattens it); raises ValueError (or struct.error,
    IndexError) on a file it cannot parse."""
    import gguf

    mm = np.memmap(path, dtype=np.uint8, mode="r")
    buf = memoryview(mm)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("no GGUF magic")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (little-endian 2 or 3 expected)")
    pos = 24

    def string(at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, at)
        if at + 8 + n > len(buf):
            raise ValueError("a string runs past the end of the file")
        return str(buf[at + 8 : at + 8 + n], "utf-8"), at + 8 + n

    def value(kind: int, at: int):
        if kind == 8:
            return string(at)
        if kind == 9:
            sub, count = struct.unpack_from("<IQ", buf, at)
            at += 12
            if sub in (8, 9):  # strings and arrays have sizes of their own: one at a time
                out = []
                for _ in range(count):
                    v, at = value(sub, at)
                    out.append(v)
                return out, at
            dt = np.dtype(_VALUE_DTYPES[sub]).newbyteorder("<")
            return np.frombuffer(buf, dt, count, at).tolist(), at + count * dt.itemsize
        dt = np.dtype(_VALUE_DTYPES[kind]).newbyteorder("<")
        return np.frombuffer(buf, dt, 1, at).tolist()[0], at + dt.itemsize

    fields = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}  # as gguf's reader
    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        fields[key], pos = value(kind, pos + 4)
    infos = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, tuple(int(d) for d in dims), gguf.GGMLQuantizationType(kind), offset))
    alignment = int(fields.get("general.alignment", 32))
    data_start = -(-pos // alignment) * alignment
    tensors = []
    for name, dims, ttype, offset in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[ttype]
        n_elements = int(np.prod(dims, dtype=np.int64))
        n_bytes = n_elements * type_size // block
        start = data_start + offset
        if start + n_bytes > len(mm):
            raise ValueError(f"tensor {name} ends past the end of the file")
        rows = n_elements // dims[0] if dims and dims[0] else 1
        raw = mm[start : start + n_bytes]
        elem = _ELEMENT_DTYPES.get(ttype.name)
        data = raw.view(elem).reshape(rows, -1) if elem is not None else raw.reshape(rows, -1)
        tensors.append(GGUFTensor(name, ttype, dims, start, n_bytes, data))
    return fields, tensors, data_start, alignment
