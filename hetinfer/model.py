"""The transformer: Llama/Qwen2 decoder, batch 1, exact dense attention with a KV cache.

Weights are `QTensor`s in their stored format (or `kernels.GPUTensor`s on a device: a layer runs
where its attention weights are, `LayerWeights.device`, and forward moves x there); every product
goes through `hetinfer.kernels`. Activations, the KV cache and logits are float32 numpy arrays on
the host (`kernels.HOST`): a CPU run never imports torch.
The FFN is a pluggable callable `ffn(layer, h) -> out` so sparse and offloaded engines replace
only the part activation sparsity applies to; attention and the KV cache stay dense and exact.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from hetinfer import kernels
from hetinfer.config import DEFAULT_KV, KV_DTYPES, ModelConfig
from hetinfer.errors import HetinferError
from hetinfer.tensors import QTensor

FFN = Callable[[int, np.ndarray], np.ndarray]
NUMPY_KV = {"f32": np.float32, "f16": np.float16}
_LAYER_TENSORS = ("attn_norm", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "ffn_norm", "gate", "up", "down")


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    wq: QTensor
    wk: QTensor
    wv: QTensor
    wo: QTensor
    ffn_norm: np.ndarray
    gate: QTensor
    up: QTensor
    down: QTensor
    bq: Optional[np.ndarray] = None
    bk: Optional[np.ndarray] = None
    bv: Optional[np.ndarray] = None

    @property
    def device(self):
        """Where the layer runs, so where its input must be: its attention weights' device."""
        return device_of(self.wq)


def device_of(W: QTensor | kernels.GPUTensor):
    """The device of a weight: a `kernels.GPUTensor`'s torch device (a GPU, or the CPU stand-in the tests
    use), else the host (`kernels.HOST`)."""
    return W.device if isinstance(W, kernels.GPUTensor) else kernels.HOST


@dataclass
class Weights:
    embed: QTensor  # [vocab, d]
    output_norm: np.ndarray
    output: QTensor  # [vocab, d]; the same object as `embed` when tied
    layers: list[LayerWeights]
    rope_freqs: Optional[np.ndarray] = None  # llama3 per-frequency divisors stored in GGUF


class KVCache:
    """Preallocated keys/values [n_layers, n_ctx, n_kv_heads, head_dim]; pages are touched as used.

    dtype "f32" or "f16" (`config.KV_DTYPES`): a float16 cache holds half the bytes, and decode
    attention streams half; keys and values are rounded to it as written and attended in float32.
    `devices` [n_layers]: where each layer runs (`LayerWeights.device`); a layer on a torch device keeps
    its keys and values in a torch tensor there (its slice of k and v is never touched: no pages)."""

    def __init__(self, cfg: ModelConfig, n_ctx: int, dtype: str = DEFAULT_KV, devices: list | None = None):
        if dtype not in KV_DTYPES:
            raise ValueError(f"KV cache dtype must be one of {', '.join(KV_DTYPES)}, got {dtype!r}")
        shape = (cfg.n_layers, n_ctx, cfg.n_kv_heads, cfg.head_dim)
        self.k = np.empty(shape, NUMPY_KV[dtype])  # pages are touched as positions are written
        self.v = np.empty(shape, NUMPY_KV[dtype])
        self.dtype = dtype
        self.k_layers, self.v_layers = list(self.k), list(self.v)  # per-layer views, made once
        for i, dev in enumerate(devices or ()):
            if dev != kernels.HOST:
                torch = sys.modules["torch"]  # loaded with the layer's weights
                kv = getattr(torch, NUMPY_KV[dtype].__name__)
                self.k_layers[i], self.v_layers[i] = (torch.empty(shape[1:], dtype=kv, device=dev) for _ in range(2))
        self.n_ctx = n_ctx
        self.tokens: list[int] = []  # what the cache holds, for prefix reuse across chat turns

    @property
    def pos(self) -> int:
        return len(self.tokens)

    def truncate(self, n: int) -> None:
        del self.tokens[n:]


def rope_inv_freq(cfg: ModelConfig, rope_freqs: Optional[np.ndarray]) -> np.ndarray:
    """Inverse frequencies (float32 [hd/2]) with llama3 / linear scaling applied."""
    hd = cfg.head_dim
    inv = np.float32(1.0) / (np.float32(cfg.rope_theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))
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
    return np.where(wl > low_wl, inv / s.factor, np.where(wl < high_wl, inv, mid)).astype(np.float32)


class Transformer:
    def __init__(self, cfg: ModelConfig, weights: Weights):
        self.cfg, self.w = cfg, weights
        self.inv_freq = rope_inv_freq(cfg, weights.rope_freqs)
        self.interleaved = bool(cfg.extra.get("rope_interleaved", False))
        self.checked = False  # the first forward pass checks every layer's output (see `_check_finite`)
        self.update_devices()

    def update_devices(self) -> None:
        """Note where each layer runs (`LayerWeights.device`) and bind each layer's decode kernels to its
        weights; call again after moving or replacing weights. `moves` maps the layers (and, as n_layers,
        the output head) before which `forward` moves x to another device: empty when everything is on
        one device."""
        where = [device_of(self.w.embed), *(L.device for L in self.w.layers), device_of(self.w.output)]
        self.moves = {i: d for i, (prev, d) in enumerate(zip(where, where[1:])) if d != prev}
        cfg = self.cfg
        self.attention_steps = [kernels.attention_step(L.attn_norm, L.wq, L.wk, L.wv, L.wo,
                                                       None if L.bq is None else (L.bq, L.bk, L.bv), L.ffn_norm,
                                                       cfg.norm_eps, self.interleaved) for L in self.w.layers]
        self.ffn_steps = [kernels.dense_ffn_step(L.gate, L.up, L.down, cfg.activation) for L in self.w.layers]
        self.prompt_attention = [kernels.attention_prompt if L.device == kernels.HOST else kernels.device_attention
                                 for L in self.w.layers]

    def pack(self, ffn: bool = True) -> int:
        """Make now the packed copies the dense kernels would make during the first prompt (`kernels.pack`):
        every layer's attention, the output head and, with `ffn`, the FFN (which the dense engine, and the
        sparse modes' prompts, read in full; not for an offloaded FFN, whose neurons are records of a store);
        returns the bytes packed."""
        names = ("wq", "wk", "wv", "wo") + (("gate", "up", "down") if ffn else ())
        return kernels.pack([getattr(L, n) for L in self.w.layers for n in names] + [self.w.output])

    def new_cache(self, n_ctx: int | None = None, dtype: str = DEFAULT_KV) -> KVCache:
        """A KV cache whose layers live where the layers run."""
        return KVCache(self.cfg, n_ctx or self.cfg.context_length, dtype, [L.device for L in self.w.layers])

    def dense_ffn(self, layer: int, h: np.ndarray) -> np.ndarray:
        return self.ffn_steps[layer](h)

    def forward(self, tokens: list[int], cache: KVCache, ffn: FFN | None = None, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` after what `cache` holds; logits of the last token ([vocab]) or all ([T, vocab])."""
        cfg, T, pos = self.cfg, len(tokens), cache.pos
        if pos + T > cache.n_ctx:
            raise HetinferError(
                f"prompt and generation need {pos + T} tokens but the context holds {cache.n_ctx}; "
                "shorten the prompt, lower max tokens, or raise --ctx"
            )
        ffn = ffn or self.dense_ffn
        x = kernels.embedding(self.w.embed, tokens)  # [T, d]
        if not self.checked:
            self._check_finite(x, "the token embedding", ("embed",), self.w)
        cos, sin = self._rope(pos, T)  # [T, hd/2]
        if T == 1:
            cos, sin = cos[0], sin[0]  # [hd/2]: what the decode kernel takes, indexed once, not per layer
        moves, rope = self.moves, {kernels.HOST: (cos, sin)}  # rope: cos and sin on each device, copied once
        for i, L in enumerate(self.w.layers):
            if i in moves:
                x = kernels.to_device(x, moves[i])
                if moves[i] not in rope:
                    rope[moves[i]] = tuple(kernels.to_device(a, moves[i]) for a in (cos, sin))
                cos, sin = rope[moves[i]]
            if T == 1:  # decode: the attention half of the layer in one kernel call, x updated in place
                h = self.attention_steps[i](x, cache.k_layers[i], cache.v_layers[i], pos, cos, sin)
            else:
                x = x + self._attention(i, L, rms_norm(x, L.attn_norm, cfg.norm_eps), cache, pos, cos, sin)
                h = rms_norm(x, L.ffn_norm, cfg.norm_eps)
            x = x + ffn(i, h)
            if not self.checked:
                self._check_finite(x, f"layer {i}", _LAYER_TENSORS, L)
        cache.tokens.extend(tokens)
        if len(self.w.layers) in moves:
            x = kernels.to_device(x, moves[len(self.w.layers)])
        x = x if all_logits else x[-1:]
        logits = kernels.to_device(kernels.linear(self.w.output, rms_norm(x, self.w.output_norm, cfg.norm_eps)),
                                   kernels.HOST)  # sampling runs on the host
        if not self.checked:
            self._check_finite(logits, "the output head", ("output_norm", "output"), self.w)
            self.checked = True
        return logits if all_logits else logits[0]

    @staticmethod
    def _check_finite(x, where: str, names: tuple[str, ...], weights) -> None:
        """On the first forward pass only (a few microseconds per layer once): a HetinferError naming the
        part and tensor whose output is NaN or infinite, so a corrupt model stops instead of writing garbage."""
        if bool(np.isfinite(kernels.to_device(x, kernels.HOST)).all()):
            return
        for name in names:
            w = getattr(weights, name, None)
            values = w.dequantize() if isinstance(w, QTensor) else w if isinstance(w, np.ndarray) else None
            if values is not None and not np.isfinite(values).all():
                raise HetinferError(f"{where}: tensor {name} holds NaN or infinite values; the model file is "
                                    "corrupt, download or convert it again")
        raise HetinferError(f"{where} gives NaN or infinite values on the first forward pass although its weights are "
                            "finite; the model's weights are corrupt or out of range, download or convert it again")

    def _attention(self, i: int, L: LayerWeights, h: np.ndarray, cache: KVCache, pos: int, cos, sin) -> np.ndarray:
        q, k, v = kernels.linears((L.wq, L.wk, L.wv), h)  # [T, H*hd], [T, KV*hd], [T, KV*hd]
        if L.bq is not None:
            q, k, v = q + L.bq, k + L.bk, v + L.bv
        out = self.prompt_attention[i](q, k, v, cache.k_layers[i], cache.v_layers[i], pos, cos, sin, self.interleaved)
        return kernels.linear(L.wo, out)

    def _rope(self, pos: int, T: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [T, hd/2] of positions pos..pos+T-1 (float32)."""
        freqs = np.outer(np.arange(pos, pos + T, dtype=np.float32), self.inv_freq)
        return np.cos(freqs), np.sin(freqs)


def place_layers(tr: Transformer, device, layers, ffn: bool = False, head: bool = False) -> int:
    """Move the attention of `layers` (weights in their stored format, `kernels.to_cuda`; norms and biases),
    with `ffn` their dense FFN too, and with `head` the output norm and head, to a torch `device`, then
    rebind the model (`update_devices`), as gpt-fast's apply_tp transforms a loaded model: those layers
    then run there, their KV cache too (`new_cache`), and x moves once at each boundary. Returns the
    bytes of weights moved. Without `ffn` a layer's FFN hook gets h on the device (an offloaded FFN splits
    it by tier)."""
    import torch

    def vector(a):
        return None if a is None else torch.as_tensor(a, device=device)

    names = ("wq", "wk", "wv", "wo") + (("gate", "up", "down") if ffn else ())
    moved = 0
    for i in layers:
        L = tr.w.layers[i]
        for name in names:
            W = getattr(L, name)
            if not isinstance(W, kernels.GPUTensor):
                setattr(L, name, kernels.to_cuda(W, device))
                moved += W.nbytes
        for name in ("attn_norm", "ffn_norm", "bq", "bk", "bv"):
            setattr(L, name, vector(getattr(L, name)))
    if head and not isinstance(tr.w.output, kernels.GPUTensor):
        moved += tr.w.output.nbytes
        tr.w.output, tr.w.output_norm = kernels.to_cuda(tr.w.output, device), vector(tr.w.output_norm)
    tr.update_devices()
    return moved


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return kernels.rms_norm(x, w, eps)


def vec(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)
