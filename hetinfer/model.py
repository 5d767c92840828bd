"""The transformer: Llama/Qwen2 decoder, batch 1, exact dense attention with a KV cache.

Weights are `QTensor`s in their stored format (or `kernels.GPUTensor`s on a device: a layer runs
where its attention weights are, `LayerWeights.device`, and forward moves x there); every product
goes through `hetinfer.kernels`.
The FFN is a pluggable callable `ffn(layer, h) -> out` so sparse and offloaded engines replace
only the part activation sparsity applies to; attention and the KV cache stay dense and exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from hetinfer import kernels
from hetinfer.config import DEFAULT_KV, KV_DTYPES, ModelConfig
from hetinfer.errors import HetinferError
from hetinfer.tensors import QTensor

FFN = Callable[[int, torch.Tensor], torch.Tensor]
CPU = torch.device("cpu")
TORCH_KV = {"f32": torch.float32, "f16": torch.float16}
_LAYER_TENSORS = ("attn_norm", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "ffn_norm", "gate", "up", "down")
ACT = {"silu": F.silu, "relu": F.relu, "gelu": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    wq: QTensor
    wk: QTensor
    wv: QTensor
    wo: QTensor
    ffn_norm: torch.Tensor
    gate: QTensor
    up: QTensor
    down: QTensor
    bq: Optional[torch.Tensor] = None
    bk: Optional[torch.Tensor] = None
    bv: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        """Where the layer runs, so where its input must be: its attention weights' device."""
        return device_of(self.wq)


def device_of(W: QTensor | kernels.GPUTensor) -> torch.device:
    """The device of a weight: a `kernels.GPUTensor`'s (a GPU, or the CPU stand-in the tests use),
    else the CPU."""
    return W.device if isinstance(W, kernels.GPUTensor) else CPU


@dataclass
class Weights:
    embed: QTensor  # [vocab, d]
    output_norm: torch.Tensor
    output: QTensor  # [vocab, d]; the same object as `embed` when tied
    layers: list[LayerWeights]
    rope_freqs: Optional[torch.Tensor] = None  # llama3 per-frequency divisors stored in GGUF


class KVCache:
    """Preallocated keys/values [n_layers, n_ctx, n_kv_heads, head_dim]; pages are touched as used.

    dtype "f32" or "f16" (`config.KV_DTYPES`): a float16 cache holds half the bytes, and decode
    attention streams half; keys and values are rounded to it as written and attended in float32."""

    def __init__(self, cfg: ModelConfig, n_ctx: int, dtype: str = DEFAULT_KV):
        if dtype not in KV_DTYPES:
            raise ValueError(f"KV cache dtype must be one of {', '.join(KV_DTYPES)}, got {dtype!r}")
        shape = (cfg.n_layers, n_ctx, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.empty(shape, dtype=TORCH_KV[dtype])
        self.v = torch.empty(shape, dtype=TORCH_KV[dtype])
        self.dtype = dtype
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)  # per-layer views, made once
        self.n_ctx = n_ctx
        self.tokens: list[int] = []  # what the cache holds, for prefix reuse across chat turns

    @property
    def pos(self) -> int:
        return len(self.tokens)

    def truncate(self, n: int) -> None:
        del self.tokens[n:]


def rope_inv_freq(cfg: ModelConfig, rope_freqs: Optional[torch.Tensor]) -> torch.Tensor:
    """Inverse frequencies with llama3 / linear scaling applied."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    if rope_freqs is not None:
        return inv / rope_freqs
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.original_max_position_embeddings == 0:  # linear
        return inv / s.factor
    low_wl = s.original_max_position_embeddings / s.low_freq_factor
    high_wl = s.original_max_position_embeddings / s.high_freq_factor
    wl = 2 * math.pi / inv
    smooth = (s.original_max_position_embeddings / wl - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = (1 - smooth) * inv / s.factor + smooth * inv
    return torch.where(wl > low_wl, inv / s.factor, torch.where(wl < high_wl, inv, mid))


class Transformer:
    def __init__(self, cfg: ModelConfig, weights: Weights):
        self.cfg, self.w = cfg, weights
        self.inv_freq = rope_inv_freq(cfg, weights.rope_freqs)
        self.interleaved = bool(cfg.extra.get("rope_interleaved", False))
        self.act = ACT[cfg.activation]
        self.checked = False  # the first forward pass checks every layer's output (see `_check_finite`)
        self.update_devices()

    def update_devices(self) -> None:
        """Note where each layer runs (`LayerWeights.device`); call again after moving weights between
        devices. `moves` maps the layers (and, as n_layers, the output head) before which `forward`
        moves x to another device: empty when everything is on one device."""
        where = [device_of(self.w.embed), *(L.device for L in self.w.layers), device_of(self.w.output)]
        self.moves = {i: d for i, (prev, d) in enumerate(zip(where, where[1:])) if d != prev}

    def new_cache(self, n_ctx: int | None = None, dtype: str = DEFAULT_KV) -> KVCache:
        return KVCache(self.cfg, n_ctx or self.cfg.context_length, dtype)

    def dense_ffn(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        L = self.w.layers[layer]
        return kernels.dense_ffn(L.gate, L.up, L.down, h, self.cfg.activation)

    def forward(self, tokens: list[int], cache: KVCache, ffn: FFN | None = None, all_logits: bool = False) -> torch.Tensor:
        """Run `tokens` after what `cache` holds; logits of the last token ([vocab]) or all ([T, vocab])."""
        cfg, T, pos = self.cfg, len(tokens), cache.pos
        if pos + T > cache.n_ctx:
            raise HetinferError(
                f"prompt and generation need {pos + T} tokens but the context holds {cache.n_ctx}; "
                "shorten the prompt, lower max tokens, or raise --ctx"
            )
        ffn = ffn or self.dense_ffn
        x = kernels.embedding(self.w.embed, torch.tensor(tokens, dtype=torch.long))
        if not self.checked:
            self._check_finite(x, "the token embedding", ("embed",), self.w)
        cos, sin = self._rope(pos, T)
        if T == 1:
            cos, sin = cos[0, 0], sin[0, 0]  # [hd/2]: what the decode kernel takes, indexed once, not per layer
        moves = self.moves
        for i, L in enumerate(self.w.layers):
            if i in moves:
                x = x.to(moves[i])
            if T == 1:  # decode: the attention half of the layer in one kernel call, x updated in place
                biases = None if L.bq is None else (L.bq, L.bk, L.bv)
                h = kernels.attention_block(x, L.attn_norm, L.wq, L.wk, L.wv, L.wo, biases, cache.k_layers[i],
                                            cache.v_layers[i], pos, cos, sin, self.interleaved, cfg.norm_eps, L.ffn_norm)
            else:
                x = x + self._attention(i, L, rms_norm(x, L.attn_norm, cfg.norm_eps), cache, pos, cos, sin)
                h = rms_norm(x, L.ffn_norm, cfg.norm_eps)
            x = x + ffn(i, h)
            if not self.checked:
                self._check_finite(x, f"layer {i}", _LAYER_TENSORS, L)
        cache.tokens.extend(tokens)
        if len(self.w.layers) in moves:
            x = x.to(moves[len(self.w.layers)])
        x = x if all_logits else x[-1:]
        logits = kernels.linear(self.w.output, rms_norm(x, self.w.output_norm, cfg.norm_eps))
        if not self.checked:
            self._check_finite(logits, "the output head", ("output_norm", "output"), self.w)
            self.checked = True
        return logits if all_logits else logits[0]

    @staticmethod
    def _check_finite(x: torch.Tensor, where: str, names: tuple[str, ...], weights) -> None:
        """On the first forward pass only (a few microseconds per layer once): a HetinferError naming the
        part and tensor whose output is NaN or infinite, so a corrupt model stops instead of writing garbage."""
        if bool(torch.isfinite(x).all()):
            return
        for name in names:
            w = getattr(weights, name, None)
            values = w.dequantize() if isinstance(w, QTensor) else w.numpy() if w is not None else None
            if values is not None and not np.isfinite(values).all():
                raise HetinferError(f"{where}: tensor {name} holds NaN or infinite values; the model file is "
                                    "corrupt, download or convert it again")
        raise HetinferError(f"{where} gives NaN or infinite values on the first forward pass although its weights are "
                            "finite; the model's weights are corrupt or out of range, download or convert it again")

    def _attention(self, i: int, L: LayerWeights, h: torch.Tensor, cache: KVCache, pos: int, cos, sin) -> torch.Tensor:
        cfg, T = self.cfg, h.shape[0]
        q, k, v = kernels.linears((L.wq, L.wk, L.wv), h)
        if L.bq is not None:
            q, k, v = q + L.bq, k + L.bk, v + L.bv
        q = self._apply_rope(q.view(T, cfg.n_heads, cfg.head_dim), cos, sin)
        k = self._apply_rope(k.view(T, cfg.n_kv_heads, cfg.head_dim), cos, sin)
        cache.k[i, pos : pos + T] = k  # rounded to the cache's dtype, as decode writes it
        cache.v[i, pos : pos + T] = v.view(T, cfg.n_kv_heads, cfg.head_dim)
        keys = cache.k[i, : pos + T].transpose(0, 1).float()  # [kv_heads, S, hd]; a float16 cache widened
        vals = cache.v[i, : pos + T].transpose(0, 1).float()
        mask = torch.ones(T, pos + T, dtype=torch.bool).tril(diagonal=pos)  # causal over the new tokens, all of the prefix
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, vals, attn_mask=mask, enable_gqa=True)
        return kernels.linear(L.wo, out.transpose(0, 1).reshape(T, -1))

    def _rope(self, pos: int, T: int):
        t = torch.arange(pos, pos + T, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)  # [T, hd/2]
        return freqs.cos()[:, None, :], freqs.sin()[:, None, :]

    def _apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.interleaved:  # pairs (2j, 2j+1): GGUF llama layout
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        half = x.shape[-1] // 2  # pairs (j, j + hd/2): HF layout
        a, b = x[..., :half], x[..., half:]
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return kernels.rms_norm(x, w, eps)


def vec(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
