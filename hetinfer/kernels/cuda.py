"""CUDA versions of the kernels: the same operations with torch on the GPU.

A weight lives on the device as a dense [rows, cols] tensor made once by `to_cuda`
(f16 by default: GPUs multiply it at full speed and it holds every q8_0/q4_0/q4_1 weight
to within f16 rounding). Sparse ops are `index_select` of the active rows plus a matmul;
cuBLAS accumulates in float32. Inputs and outputs are float32 tensors on the same device.
Used only when CUDA is present; `hetinfer.kernels` dispatches here for torch-tensor weights.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hetinfer.tensors import QTensor


def to_cuda(W: QTensor, dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda") -> torch.Tensor:
    """The weight decoded once into a dense `dtype` tensor on `device`."""
    return torch.from_numpy(W.dequantize()).to(device=device, dtype=dtype)


def _act(act: str, g: torch.Tensor) -> torch.Tensor:
    if act == "silu":
        return F.silu(g)
    if act == "relu":
        return torch.relu(g)
    return F.gelu(g, approximate="tanh")


def _rows(rows, n: int, device: torch.device) -> torch.Tensor:
    """Row ids as int64 on `device`; out-of-range ids raise ValueError (one device sync)."""
    r = rows if isinstance(rows, torch.Tensor) else torch.from_numpy(np.asarray(rows))
    if r.ndim != 1 or (r.numel() and (r.dtype.is_floating_point or r.dtype == torch.bool)):
        raise ValueError(f"row ids must be a 1-D integer array, got shape {tuple(r.shape)} dtype {r.dtype}")
    r = r.to(device=device, dtype=torch.int64)
    if r.numel() and bool((r.min() < 0) | (r.max() >= n)):
        bad = r[(r < 0) | (r >= n)][0].item()
        raise ValueError(f"row id {bad} is out of range: valid ids are 0..{n - 1}")
    return r


def linear(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x.to(W.dtype) @ W.T).float()


def gate_up(Wg: torch.Tensor, Wu: torch.Tensor, x: torch.Tensor, act: str) -> torch.Tensor:
    return _act(act, linear(Wg, x)) * linear(Wu, x)


def embedding(W: torch.Tensor, ids) -> torch.Tensor:
    return W.index_select(0, _rows(ids, W.shape[0], W.device)).float()


def gather_matvec(W: torch.Tensor, rows, x: torch.Tensor) -> torch.Tensor:
    return linear(W.index_select(0, _rows(rows, W.shape[0], W.device)), x)


def scatter_axpy(Wd_t: torch.Tensor, rows, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r = _rows(rows, Wd_t.shape[0], Wd_t.device)
    if a.numel() != r.numel():
        raise ValueError(f"{a.numel()} coefficients for {r.numel()} rows")
    y += (a.reshape(1, -1).to(Wd_t.dtype) @ Wd_t.index_select(0, r)).float().reshape(y.shape)
    return y


def sparse_ffn(Wg: torch.Tensor, Wu: torch.Tensor, Wd_t: torch.Tensor, rows, x: torch.Tensor, act: str):
    """(y with x's shape, h [len(rows)]) for one token; see `hetinfer.kernels.sparse_ffn`."""
    r = _rows(rows, Wg.shape[0], Wg.device)
    xr = x.reshape(1, -1)
    h = (_act(act, linear(Wg.index_select(0, r), xr)) * linear(Wu.index_select(0, r), xr))[0]
    y = (h.reshape(1, -1).to(Wd_t.dtype) @ Wd_t.index_select(0, r)).float()
    return y.reshape(x.shape), h
