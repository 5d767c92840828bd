"""Read a Hugging Face checkpoint directory: config.json and (sharded) safetensors, memory-mapped.

The safetensors header is parsed here rather than through `safetensors.safe_open` so that
bf16 stays a zero-copy uint16 view and a corrupt header gets an error that says so.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from hetinfer.config import ModelConfig, RopeScaling
from hetinfer.errors import HetinferError
from hetinfer.tensors import QTensor

_DTYPES = {"F32": (np.float32, "f32"), "F16": (np.float16, "f16"), "BF16": (np.uint16, "bf16")}
_ACTS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu"}


def read_safetensors(path: str) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (qtype, mmapped array in its stored shape) for every tensor in one file."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds file size {size}")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        out, spans = {}, []
        for name, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise HetinferError(
                    f"{path}: tensor {name} has dtype {info['dtype']}; hetinfer reads F32, F16 and BF16 safetensors"
                )
            dtype, qtype = _DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if not (0 <= start <= end <= size - 8 - n) or end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                raise ValueError(f"tensor {name} has offsets {start}..{end} that do not fit the file")
            out[name] = (qtype, mm[8 + n + start : 8 + n + end].view(dtype).reshape(shape))
            spans.append((start, end, name))
        spans.sort()
        for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
            if start < end:
                raise ValueError(f"tensor {name} overlaps tensor {other}")
        return out
    except HetinferError:
        raise
    except Exception as e:
        raise HetinferError(
            f"{path} is not a valid safetensors file ({type(e).__name__}: {str(e)[:120]}); "
            "it is truncated or corrupt: download or save the checkpoint again"
        ) from None


class HFCheckpoint:
    """An HF model directory: `cfg` (config.json dict) and `tensors` (name -> (qtype, array))."""

    def __init__(self, path: str):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise HetinferError(f"{path} has no config.json; pass a Hugging Face checkpoint directory or a .gguf file")
        try:
            with open(cfg_path, "rb") as fh:
                self.cfg = json.load(fh)
        except (OSError, ValueError) as e:
            raise HetinferError(f"{cfg_path} is unreadable ({e}); download or save the checkpoint again") from None
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as fh:
                files = sorted(set(json.load(fh)["weight_map"].values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise HetinferError(f"{path} has no *.safetensors files; hetinfer reads safetensors checkpoints only")
        self.tensors: dict[str, tuple[str, np.ndarray]] = {}
        for f in files:
            fp = os.path.join(path, f)
            if not os.path.isfile(fp):
                raise HetinferError(f"{path}: shard {f} listed in the index is missing; download it again")
            self.tensors.update(read_safetensors(fp))
        self.path = path

    def config(self) -> ModelConfig:
        tied = bool(self.cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in self.tensors
        return hf_config(self.cfg, os.path.basename(os.path.normpath(self.path)), tied, where=self.path)

    def weight(self, name: str) -> QTensor:
        if name not in self.tensors:
            raise HetinferError(f"{self.path}: tensor {name} is missing from the safetensors files; the checkpoint is incomplete")
        qtype, arr = self.tensors[name]
        arr = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(1, -1)
        return QTensor(qtype, (arr.shape[0], arr.shape[1]), arr)

    def vector(self, name: str) -> np.ndarray:
        return self.weight(name).dequantize().reshape(-1)


def hf_config(c: dict, name: str, tied: bool | None = None, where: str = "config.json") -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict (also for models not on disk: what-if planning).

    `tied`: whether the output head is the embedding matrix; None takes `tie_word_embeddings`."""
    try:
        return _hf_config(c, name, tied, where)
    except KeyError as e:
        raise HetinferError(f"{where}: config lacks {e}; the checkpoint is incomplete, download or save it "
                            "again") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise HetinferError(f"{where}: not a usable model config ({e}); download or save the checkpoint "
                            "again") from None


def _hf_config(c: dict, name: str, tied: bool | None, where: str) -> ModelConfig:
    if not isinstance(c, dict):
        raise TypeError("config.json must hold a JSON object")
    mtype = c.get("model_type", "?")
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}.get(mtype)
    if arch is None:
        raise HetinferError(f"{where}: model_type {mtype!r} is not supported; hetinfer runs llama, mistral and qwen2 models")
    act = _ACTS.get(c.get("hidden_act", "silu"))
    if act is None:
        raise HetinferError(f"{where}: hidden_act {c['hidden_act']!r} is not supported (silu, relu, gelu)")
    # transformers >= 5 writes `rope_parameters` (theta inside); older configs `rope_theta` + `rope_scaling`
    rs = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = c.get("rope_theta") or rs.get("rope_theta", 10000.0)
    scaling = None
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "llama3":
            scaling = RopeScaling(
                float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"]),
                int(rs["original_max_position_embeddings"]),
            )
        elif kind == "linear":
            scaling = RopeScaling(float(rs["factor"]), 1.0, 1.0, 0)
        elif kind not in (None, "default"):
            raise HetinferError(f"{where}: rope scaling {kind!r} is not supported (llama3, linear)")
    n_heads = int(c["num_attention_heads"])
    return ModelConfig(
        arch=arch,
        n_layers=int(c["num_hidden_layers"]),
        d_model=int(c["hidden_size"]),
        n_ff=int(c["intermediate_size"]),
        n_heads=n_heads,
        n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
        head_dim=int(c.get("head_dim") or c["hidden_size"] // n_heads),
        vocab_size=int(c["vocab_size"]),
        context_length=int(c.get("max_position_embeddings", 2048)),
        rope_theta=float(theta),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        activation=act,
        tied_embeddings=bool(c.get("tie_word_embeddings", False)) if tied is None else tied,
        attn_bias=arch == "qwen2" or bool(c.get("attention_bias", False)),
        rope_scaling=scaling,
        name=name,
        extra={"rope_interleaved": False, "source": "hf"},
    )
