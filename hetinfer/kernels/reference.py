"""Plain numpy versions of every kernel: obviously correct, float64 accumulation, slow.

Tests compare the CPU and CUDA kernels against these. Weights are decoded with
`QTensor.dequantize`, which matches the `gguf` package byte for byte. Products with block-format
weights (q8_0, q4_0, q4_1) take x as the CPU kernels read it, in 31-bit fixed point per block of
32 (`fixed_x`, within amax * 2^-31 of x: below float32 resolution), then multiply exactly.
"""
from __future__ import annotations

import numpy as np

from hetinfer.tensors import BLOCK_FORMATS, QTensor, quantize


def act(name: str, g: np.ndarray) -> np.ndarray:
    """The FFN activations the engine uses; gelu is the tanh approximation (as in `hetinfer.model`)."""
    if name == "silu":
        return g / (1.0 + np.exp(-g))
    if name == "relu":
        return np.maximum(g, 0.0)
    if name == "gelu":
        return 0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g**3)))
    raise ValueError(f"unknown activation {name!r}")


def _w(W: QTensor, rows=None) -> np.ndarray:
    return W.dequantize(rows).astype(np.float64)


def quantize_x(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`cpu.quantize_x`, bit for bit: x [..., cols] -> h, l int16 [..., cols // 32, 32] and dx float32
    [..., cols // 32] with x = dx * (h + l / 2^15): dx = amax / 32767, h = rint(x * (1 / dx)),
    l = rint((x - h * dx) * (2^15 / dx)), all float32 (x - h * dx fused: exact in float64, rounded once).
    Blocks with inf/nan get dx = nan and h = l = 0, blocks with dx < 2^-110 count as 0."""
    f32 = np.float32
    b = np.asarray(x, f32).reshape(*np.shape(x)[:-1], -1, 32)
    amax = np.abs(b).max(-1)
    dx = amax / f32(32767.0)
    finite = np.isfinite(b).all(-1)
    ok = finite & (dx >= f32(2.0**-110))
    b = np.where(ok[..., None], b, f32(0))
    inv = np.where(ok, f32(1.0) / np.where(ok, dx, f32(1)), f32(0))[..., None]
    h = np.rint(b * inv)
    r = (b.astype(np.float64) - h.astype(np.float64) * np.where(ok, dx, f32(0))[..., None]).astype(f32)
    lo = np.rint(r * (inv * f32(32768.0)))
    dx = np.where(ok, dx, np.where(finite, f32(0), f32(np.nan))).astype(f32)
    return h.astype(np.int16), lo.astype(np.int16), dx


def fixed_x(x: np.ndarray) -> np.ndarray:
    """x as the block-format dots see it, float64: dx * (h + l / 2^15) from `quantize_x`."""
    h, lo, dx = quantize_x(x)
    return (dx.astype(np.float64)[..., None] * (h + lo / 32768.0)).reshape(np.shape(x))


def _x(W: QTensor, x: np.ndarray) -> np.ndarray:
    """x as a product with W reads it: `fixed_x` for block formats, else x itself."""
    return fixed_x(x) if W.qtype in BLOCK_FORMATS else np.asarray(x, np.float64)


def linear(W: QTensor, x: np.ndarray) -> np.ndarray:
    """x [T, cols] -> [T, rows]."""
    return _x(W, x) @ _w(W).T


def embedding(W: QTensor, ids: np.ndarray) -> np.ndarray:
    return W.dequantize(np.asarray(ids, np.int64))


def gather_matvec(W: QTensor, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The selected output rows only: x [..., cols] -> [..., len(rows)]."""
    return _x(W, x) @ _w(W, rows).T


def scatter_axpy(Wd_t: QTensor, rows: np.ndarray, a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """y + sum_i a[i] * Wd_t[rows[i]] (a new array)."""
    return np.asarray(y, np.float64) + np.asarray(a, np.float64) @ _w(Wd_t, rows)


def gate_up(Wg: QTensor, Wu: QTensor, x: np.ndarray, act_name: str) -> np.ndarray:
    """act(x Wg^T) * (x Wu^T): the dense FFN before the down projection."""
    return act(act_name, linear(Wg, x)) * linear(Wu, x)


def sparse_ffn(Wg: QTensor, Wu: QTensor, Wd_t: QTensor, rows: np.ndarray, x: np.ndarray, act_name: str):
    """FFN output of one token [d] using only neurons `rows`, and their activations h [len(rows)]."""
    x = _x(Wg, np.reshape(x, -1))
    h = act(act_name, _w(Wg, rows) @ x) * (_w(Wu, rows) @ x)
    return h @ _w(Wd_t, rows), h


def transpose_down(W: QTensor, qtype: str) -> QTensor:
    """W^T stored as `qtype` (dequantize, transpose, quantize)."""
    return quantize(np.ascontiguousarray(W.dequantize().T), qtype)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * w


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> np.ndarray:
    """Rotate the last axis of x [..., hd]: pairs (2j, 2j+1) if interleaved, else (j, j + hd/2)."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :half], x[..., half:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return np.stack((ra, rb), -1).reshape(x.shape) if interleaved else np.concatenate((ra, rb), -1)


def attention_decode(q, k, v, k_cache, v_cache, pos, cos, sin, interleaved):
    """One token's attention (see `kernels.attention_decode`); returns (out [H*hd], k_cache, v_cache) with the
    caches updated (new arrays)."""
    n_ctx, KV, hd = k_cache.shape
    q = rope(np.reshape(q, (-1, hd)), cos, sin, interleaved)
    kc, vc = np.array(k_cache, np.float64), np.array(v_cache, np.float64)
    kc[pos] = rope(np.reshape(k, (KV, hd)), cos, sin, interleaved)
    vc[pos] = np.reshape(v, (KV, hd))
    group = q.shape[0] // KV
    out = np.empty_like(q)
    for h in range(q.shape[0]):
        s = kc[: pos + 1, h // group] @ q[h] / np.sqrt(hd)
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ vc[: pos + 1, h // group]
    return out.reshape(-1), kc, vc
