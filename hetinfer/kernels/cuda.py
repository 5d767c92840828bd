"""GPU versions of the kernels: the same operations in plain torch, on weights in their stored format.

`to_cuda` copies a weight's stored bytes to the device once (`GPUTensor`): q8_0/q4_0/q4_1 as the
same GGUF blocks the CPU kernels read (uint8 [rows, row_bytes]), f32/f16/bf16 as tensors of that
dtype. So a weight takes on the GPU exactly the bytes the placement plan counts for it (a dense
f16 copy would take 3.2x a q4_1 weight's bytes, 1.9x a q8_0 one's). Each call decodes only the rows it needs
(`decode_rows`: every row for `linear`, the active ones for the sparse ops), in tiles of at most
`TILE_BYTES`, and multiplies them in the weight's `compute_dtype` with float32 accumulation
(cuBLAS): f16 for block formats, the stored dtype for float formats (nothing to decode).

Pure torch, so it runs on any device; the tests run it on the CPU against `reference.py`.
Activations are float32 tensors on the weight's device, and so are the results.
`hetinfer.kernels` dispatches here for `GPUTensor` weights.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from hetinfer.tensors import BLOCK_FORMATS, GPU_TILE_BYTES, GPUTensor, QTensor

TILE_BYTES = GPU_TILE_BYTES  # rows decoded at a time (the tests patch it small)


def to_cuda(W: QTensor, device: str | torch.device = "cuda") -> GPUTensor:
    """The weight's stored bytes copied once to `device`."""
    data = W.data.view(np.int16) if W.qtype == "bf16" else W.data  # numpy has no bfloat16
    t = torch.tensor(data, device=device)  # a copy: mmapped GGUF views are read-only
    return GPUTensor(W.qtype, W.shape, t.view(torch.bfloat16) if W.qtype == "bf16" else t)


def decode_rows(W: GPUTensor, rows: np.ndarray | torch.Tensor | None = None,
                dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Rows of W (all if None; any order, may repeat) decoded to a dense `dtype` [len(rows), cols]
    tensor. With dtype float32 the values equal `QTensor.dequantize` bit for bit."""
    data = W.data if rows is None else W.data.index_select(0, _rows(rows, W.shape[0], W.device))
    return _decode(W.qtype, data, dtype)


def _decode(qtype: str, data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored rows -> `dtype`. Blocks are decoded in float32 as `QTensor.dequantize` does (exact
    products d * q; one rounding for q4_1's + m), then rounded once to `dtype`."""
    if qtype not in BLOCK_FORMATS:
        return data.to(dtype)
    block, nbytes = BLOCK_FORMATS[qtype]
    n, blocks = data.shape[0], data.shape[1] // nbytes
    b = data.view(n, blocks, nbytes)
    if qtype == "q8_0":
        w = b[..., 2:].view(torch.int8).float()
    else:  # weight j of a block in the low nibble of byte j, weight 16 + j in the high nibble
        packed = b[..., 4:] if qtype == "q4_1" else b[..., 2:]
        w = torch.cat((packed & 0x0F, packed >> 4), dim=-1).float()
        if qtype == "q4_0":
            w -= 8.0
    w *= b[..., 0:2].view(torch.float16)  # d, widened exactly to float32 (in place: fewer temporaries)
    if qtype == "q4_1":
        w += b[..., 2:4].view(torch.float16)  # m
    return w.reshape(n, blocks * block).to(dtype)


def _tiles(W: GPUTensor, r: torch.Tensor | None, dtype: torch.dtype) -> Iterator[tuple[slice, torch.Tensor]]:
    """(positions in r, those rows decoded to `dtype`), at most TILE_BYTES at a time; r None: every row."""
    n = W.shape[0] if r is None else r.numel()
    if r is None and W.data.dtype == dtype:  # stored as dtype already: nothing to decode
        yield slice(0, n), W.data
        return
    step = max(1, TILE_BYTES // (W.shape[1] * dtype.itemsize))
    for lo in range(0, n, step):
        s = slice(lo, min(lo + step, n))
        yield s, _decode(W.qtype, W.data[s] if r is None else W.data.index_select(0, r[s]), dtype)


def _act(act: str, g: torch.Tensor) -> torch.Tensor:
    if act == "silu":
        return F.silu(g)
    if act == "relu":
        return torch.relu(g)
    return F.gelu(g, approximate="tanh")


def _rows(rows: np.ndarray | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Row ids as int64 on `device`; out-of-range ids raise ValueError (one device sync)."""
    r = rows if isinstance(rows, torch.Tensor) else torch.from_numpy(np.asarray(rows))
    if r.ndim != 1 or (r.numel() and (r.dtype.is_floating_point or r.dtype == torch.bool)):
        raise ValueError(f"row ids must be a 1-D integer array, got shape {tuple(r.shape)} dtype {r.dtype}")
    r = r.to(device=device, dtype=torch.int64)
    if r.numel() and bool((r.min() < 0) | (r.max() >= n)):
        bad = r[(r < 0) | (r >= n)][0].item()
        raise ValueError(f"row id {bad} is out of range: valid ids are 0..{n - 1}")
    return r


def _matvec(W: GPUTensor, r: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x [..., cols] @ W[r]^T -> float32 [..., len(r)] (every row if r is None)."""
    dt = W.compute_dtype
    xd = x.to(dt)
    out = torch.empty(*x.shape[:-1], W.shape[0] if r is None else r.numel(), device=x.device)
    for s, w in _tiles(W, r, dt):
        out[..., s] = xd @ w.T
    return out


def _axpy(W: GPUTensor, r: torch.Tensor, a: torch.Tensor, y: torch.Tensor) -> None:
    """y [cols] += a @ W[r] in place."""
    dt = W.compute_dtype
    ad = a.reshape(-1).to(dt)
    yf = y.view(-1)
    for s, w in _tiles(W, r, dt):
        yf += (ad[s] @ w).float()


def linear(W: GPUTensor, x: torch.Tensor) -> torch.Tensor:
    return _matvec(W, None, x)


def gate_up(Wg: GPUTensor, Wu: GPUTensor, x: torch.Tensor, act: str) -> torch.Tensor:
    return _act(act, linear(Wg, x)) * linear(Wu, x)


def embedding(W: GPUTensor, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Rows for token ids, float32, bit-exact."""
    return decode_rows(W, ids, torch.float32)


def gather_matvec(W: GPUTensor, rows: np.ndarray | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _matvec(W, _rows(rows, W.shape[0], W.device), x)


def scatter_axpy(Wd_t: GPUTensor, rows: np.ndarray | torch.Tensor, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r = _rows(rows, Wd_t.shape[0], Wd_t.device)
    if a.numel() != r.numel():
        raise ValueError(f"{a.numel()} coefficients for {r.numel()} rows")
    _axpy(Wd_t, r, a, y)
    return y


def sparse_ffn(Wg: GPUTensor, Wu: GPUTensor, Wd_t: GPUTensor, rows: np.ndarray | torch.Tensor, x: torch.Tensor,
               act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y with x's shape, h [len(rows)]) for one token; see `hetinfer.kernels.sparse_ffn`."""
    r = _rows(rows, Wg.shape[0], Wg.device)
    xr = x.reshape(-1)
    h = _act(act, _matvec(Wg, r, xr)) * _matvec(Wu, r, xr)
    y = torch.zeros(Wd_t.shape[1], device=x.device)
    _axpy(Wd_t, r, h, y)
    return y.reshape(x.shape), h


def threshold_ffn(Wg: GPUTensor, Wu: GPUTensor, Wd_t: GPUTensor, x: torch.Tensor, act: str,
                  threshold: float) -> tuple[torch.Tensor, int]:
    """(y with x's shape, neurons kept) for one token; see `hetinfer.kernels.threshold_ffn`."""
    h = gate_up(Wg, Wu, x.reshape(-1), act)
    r = (h.abs() > threshold).nonzero()[:, 0]
    y = torch.zeros(Wd_t.shape[1], device=x.device)
    _axpy(Wd_t, r, h[r], y)
    return y.reshape(x.shape), r.numel()


def predict_rows(W1: GPUTensor, W2_t: GPUTensor, h: torch.Tensor, threshold: float) -> torch.Tensor:
    """The neurons the predictor picks for one token, int64 ascending on the device; see
    `hetinfer.kernels.predict_rows`."""
    z = torch.relu(linear(W1, h)).reshape(-1)
    logits = scatter_axpy(W2_t, torch.arange(W2_t.shape[0], device=z.device), z,
                          torch.zeros(W2_t.shape[1], device=z.device))
    return (logits > threshold).nonzero()[:, 0]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2, -1) + eps) * w, in float32 on x's device."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [..., hd] rotated in pairs (2j, 2j+1) if interleaved (GGUF llama layout), else (j, j + hd/2) (HF)."""
    half = x.shape[-1] // 2
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :half], x[..., half:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return torch.stack((ra, rb), -1).reshape(x.shape) if interleaved else torch.cat((ra, rb), -1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              pos: int, cos, sin, interleaved: bool) -> torch.Tensor:
    """Attention of T new tokens at positions pos..pos+T-1 on the cache's device, as the CPU's
    `attention_decode` (T = 1) and `attention_prompt` compute it: RoPE on q and k (cos/sin [hd/2] or
    [T, hd/2]), k and v written to the layer's cache [n_ctx, n_kv_heads, hd] (float32 or float16, rounded
    to nearest as written) at those positions, causal softmax attention over 0..pos+T-1 in float32 with
    grouped kv heads. q [T, H*hd], k/v [T, KV*hd] -> [T, H*hd]."""
    T, (n_ctx, KV, hd) = q.shape[0], k_cache.shape
    S, H = pos + T, q.shape[1] // hd
    if k.shape != (T, KV * hd) or v.shape != (T, KV * hd) or q.shape[1] % (KV * hd):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit the cache's {KV} "
                         f"kv heads of {hd}")
    if pos < 0 or S > n_ctx:
        raise ValueError(f"positions {pos}..{S - 1} are outside the cache (0..{n_ctx - 1})")
    dev = k_cache.device
    cos, sin = (torch.as_tensor(c, device=dev).reshape(T, 1, hd // 2) for c in (cos, sin))
    k_cache[pos:S] = _rope(k.reshape(T, KV, hd), cos, sin, interleaved).to(k_cache.dtype)
    v_cache[pos:S] = v.reshape(T, KV, hd).to(v_cache.dtype)
    G = H // KV  # query head h = kv * G + g reads kv head h // G: each kv head's G heads attend as G * T rows
    qg = _rope(q.reshape(T, H, hd), cos, sin, interleaved).reshape(T, KV, G, hd).permute(1, 2, 0, 3).reshape(KV, G * T, hd)
    keys, vals = (c[:S].float().transpose(0, 1) for c in (k_cache, v_cache))  # [KV, S, hd]: views of a float32 cache
    mask = torch.arange(S, device=dev) <= pos + torch.arange(T, device=dev)[:, None]  # [T, S]: what each query sees
    out = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask.repeat(G, 1))  # [KV, G * T, hd]
    return out.reshape(KV, G, T, hd).permute(2, 0, 1, 3).reshape(T, H * hd)
