"""Plain numpy versions of every kernel: obviously correct, float64 accumulation, slow.

Tests compare the CPU and CUDA kernels against these. Weights are decoded with
`QTensor.dequantize`, which matches the `gguf` package byte for byte. Products with block-format
weights (q8_0, q4_0, q4_1) take x as the CPU kernels read it, quantized to 8 bits per block of 32
like llama.cpp's q8_0 activations (`quantize_x`, bit-identical to `cpu.quantize_x`), then multiply
in float64.
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


def unpack_rows(qtype: str, packed: np.ndarray) -> np.ndarray:
    """The rows [8 G, row_bytes] of q4_0 or q4_1 that `cpu.pack_rows` packed into groups [G, 8 row_bytes]."""
    bb, head = (20, 32) if qtype == "q4_1" else (18, 16)
    G, nb = packed.shape[0], packed.shape[1] // (8 * bb)
    blocks = packed.reshape(G, nb, 8 * bb)
    rows = np.zeros((G, 8, nb, bb), np.uint8)
    rows[..., 0:2] = blocks[..., 0:16].reshape(G, nb, 8, 2).transpose(0, 2, 1, 3)
    if qtype == "q4_1":
        rows[..., 2:4] = blocks[..., 16:32].reshape(G, nb, 8, 2).transpose(0, 2, 1, 3)
    p = blocks[..., head:].reshape(G, nb, 2, 64)
    vec = np.stack([p[:, :, 0] & 15, p[:, :, 1] & 15, p[:, :, 0] >> 4, p[:, :, 1] >> 4], axis=2)  # [G, nb, 4, 64]
    q = np.empty((G, 8, nb, 32), np.uint8)
    for j in range(32):  # weight j of row r: vector j // 8, lane r + 8 * (j % 8 // 4), byte j % 4
        t, half = j // 8, j % 8 // 4
        q[..., j] = vec[:, :, t, [4 * (r + 8 * half) + j % 4 for r in range(8)]].transpose(0, 2, 1)
    rows[..., bb - 16:] = q[..., :16] | (q[..., 16:] << 4)
    return rows.reshape(G * 8, nb * bb)


def _w(W: QTensor, rows=None) -> np.ndarray:
    return W.dequantize(rows).astype(np.float64)


def quantize_x(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`cpu.quantize_x`, bit for bit: x [..., cols] -> q int8 [..., cols // 32, 32], d and s float32
    [..., cols // 32] with x ~ d * q: d = amax / 127, q = rint(x * (1 / d)), s = d * sum(q), all float32.
    Blocks with inf/nan get d = s = nan and q = 0; blocks with d < 2^-110 count as 0."""
    f32 = np.float32
    b = np.asarray(x, f32).reshape(*np.shape(x)[:-1], -1, 32)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(b).max(-1) / f32(127.0)
        finite = np.isfinite(b).all(-1)
        ok = finite & (d >= f32(2.0**-110))
        b = np.where(ok[..., None], b, f32(0))
        inv = np.where(ok, f32(1.0) / np.where(ok, d, f32(1)), f32(0))[..., None]
        q = np.rint(b * inv).astype(np.int8)
        d = np.where(ok, d, np.where(finite, f32(0), f32(np.nan))).astype(f32)
        s = (d * q.astype(np.int32).sum(-1).astype(f32)).astype(f32)
    return q, d, s


def q8_x(x: np.ndarray) -> np.ndarray:
    """x as the block-format dots see it, float64 (exact): d * q from `quantize_x`."""
    q, d, _ = quantize_x(x)
    return (d.astype(np.float64)[..., None] * q).reshape(np.shape(x))


def _x(W: QTensor, x: np.ndarray, q8: bool = True) -> np.ndarray:
    """x as a product with W reads it: `q8_x` for block formats (unless q8=False: x as given, what the
    CUDA kernels read), else x itself."""
    return q8_x(x) if q8 and W.qtype in BLOCK_FORMATS else np.asarray(x, np.float64)


def linear(W: QTensor, x: np.ndarray, q8: bool = True) -> np.ndarray:
    """x [T, cols] -> [T, rows]."""
    return _x(W, x, q8) @ _w(W).T


def embedding(W: QTensor, ids: np.ndarray) -> np.ndarray:
    return W.dequantize(np.asarray(ids, np.int64))


def gather_matvec(W: QTensor, rows: np.ndarray, x: np.ndarray, q8: bool = True) -> np.ndarray:
    """The selected output rows only: x [..., cols] -> [..., len(rows)]."""
    return _x(W, x, q8) @ _w(W, rows).T


def scatter_axpy(Wd_t: QTensor, rows: np.ndarray, a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """y + sum_i a[i] * Wd_t[rows[i]] (a new array)."""
    return np.asarray(y, np.float64) + np.asarray(a, np.float64) @ _w(Wd_t, rows)


def gate_up(Wg: QTensor, Wu: QTensor, x: np.ndarray, act_name: str, q8: bool = True) -> np.ndarray:
    """act(x Wg^T) * (x Wu^T): the dense FFN before the down projection."""
    return act(act_name, linear(Wg, x, q8)) * linear(Wu, x, q8)


def sparse_ffn(Wg: QTensor, Wu: QTensor, Wd_t: QTensor, rows: np.ndarray, x: np.ndarray, act_name: str,
               q8: bool = True):
    """FFN output of one token [d] using only neurons `rows`, and their activations h [len(rows)]."""
    x = _x(Wg, np.reshape(x, -1), q8)
    h = act(act_name, _w(Wg, rows) @ x) * (_w(Wu, rows) @ x)
    return h @ _w(Wd_t, rows), h


def prompt_ffn(Wg: QTensor, Wu: QTensor, Wd_t: QTensor, x: np.ndarray, act_name: str, q8: bool = True) -> np.ndarray:
    """A prompt's FFN over every neuron, the down projection neuron-major: x [T, d] -> [T, d]."""
    return gate_up(Wg, Wu, x, act_name, q8) @ _w(Wd_t)


def threshold_ffn(Wg: QTensor, Wu: QTensor, Wd_t: QTensor, x: np.ndarray, act_name: str, threshold: float,
                  q8: bool = True):
    """FFN output of one token [d] over the neurons whose |act(g) * u| exceeds `threshold`, and their ids."""
    x = _x(Wg, np.reshape(x, -1), q8)
    h = act(act_name, _w(Wg) @ x) * (_w(Wu) @ x)
    rows = np.flatnonzero(np.abs(h) > threshold)
    return h[rows] @ _w(Wd_t, rows), rows


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
    caches updated (new arrays of the caches' dtype: a float16 cache gets k and v rounded to nearest)."""
    n_ctx, KV, hd = k_cache.shape
    kc, vc = np.array(k_cache), np.array(v_cache)
    kc[pos] = rope(np.reshape(k, (KV, hd)), cos, sin, interleaved)
    vc[pos] = np.reshape(v, (KV, hd))
    out = attention(rope(np.reshape(q, (-1, hd)), cos, sin, interleaved), kc[: pos + 1], vc[: pos + 1])
    return out.reshape(-1), kc, vc


def attention(q, keys, values):
    """softmax(q_h K^T / sqrt(hd)) V per query head in float64, for rotated q [H, hd] and cached keys and
    values [S, KV, hd] (any float dtype), query head h reading kv head h // (H / KV); -> [H, hd]."""
    hd, KV = q.shape[1], keys.shape[1]
    keys, values = np.asarray(keys, np.float64), np.asarray(values, np.float64)
    group = q.shape[0] // KV
    out = np.empty((q.shape[0], hd))
    for h in range(q.shape[0]):
        s = keys[:, h // group] @ q[h] / np.sqrt(hd)
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ values[:, h // group]
    return out
