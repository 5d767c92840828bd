"""A weight matrix in its stored format.

`QTensor` is how every 2-D weight travels through hetinfer: the raw bytes (usually a view
into a memory-mapped file), the format, and the logical shape (rows = output features,
cols = input features, like `torch.nn.Linear.weight`). Kernels read the bytes directly;
`dequantize` exists for references, tests and formats the kernels do not handle.
`GPUTensor` is the same stored bytes on a torch device (`kernels.to_cuda`); it is defined here,
without importing torch, so that a CPU run can tell the two apart and never load torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Block formats: (weights per block, bytes per block). Layouts follow ggml:
#   q8_0: f16 d, int8 q[32]                      w = d * q
#   q4_0: f16 d, u8 q[16] (lo nibbles = 0..15)   w = d * (q - 8)
#   q4_1: f16 d, f16 m, u8 q[16]                 w = d * q + m
BLOCK_FORMATS = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20)}
FLOAT_FORMATS = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}  # bf16 kept as raw u16
FORMATS = tuple(FLOAT_FORMATS) + tuple(BLOCK_FORMATS)


@dataclass
class QTensor:
    """A [rows, cols] matrix stored as `qtype`; `data` is 2-D, one row of storage per matrix row."""

    qtype: str
    shape: tuple[int, int]
    data: np.ndarray

    def __post_init__(self) -> None:
        rows, cols = self.shape
        if self.qtype in BLOCK_FORMATS:
            block, nbytes = BLOCK_FORMATS[self.qtype]
            if cols % block:
                raise ValueError(f"{self.qtype} needs cols divisible by {block}, got {cols}")
            want, dtype = (rows, cols // block * nbytes), np.uint8
        elif self.qtype in FLOAT_FORMATS:
            want, dtype = (rows, cols), FLOAT_FORMATS[self.qtype]
        else:
            raise ValueError(f"unknown weight format {self.qtype!r}; known: {', '.join(FORMATS)}")
        if self.data.shape != want or self.data.dtype != dtype:
            raise ValueError(
                f"{self.qtype} tensor of shape {self.shape} needs data {want} {np.dtype(dtype)}, "
                f"got {self.data.shape} {self.data.dtype}"
            )

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def row_bytes(self) -> int:
        return int(self.data.shape[1] * self.data.itemsize)

    def rows(self, idx: np.ndarray) -> "QTensor":
        """The selected rows as a new (copied) QTensor of the same format."""
        idx = np.asarray(idx, dtype=np.int64)
        return QTensor(self.qtype, (len(idx), self.shape[1]), np.ascontiguousarray(self.data[idx]))

    def dequantize(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 [rows, cols] (optionally only the selected rows); a reference, not a hot path."""
        data = self.data if rows is None else self.data[np.asarray(rows, dtype=np.int64)]
        if self.qtype == "f32":
            return np.array(data, dtype=np.float32)
        if self.qtype == "f16":
            return data.astype(np.float32)
        if self.qtype == "bf16":
            return (data.astype(np.uint32) << 16).view(np.float32)
        return _dequantize_blocks(self.qtype, data, self.shape[1])


def _dequantize_blocks(qtype: str, data: np.ndarray, cols: int) -> np.ndarray:
    block, nbytes = BLOCK_FORMATS[qtype]
    n = data.shape[0]
    b = np.ascontiguousarray(data).reshape(n, cols // block, nbytes)
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)  # [n, nb, 1]
    if qtype == "q8_0":
        q = b[..., 2:].view(np.int8).astype(np.float32)
        w = d * q
    else:
        packed = b[..., 4:] if qtype == "q4_1" else b[..., 2:]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.float32)
        if qtype == "q4_0":
            w = d * (q - 8.0)
        else:
            m = b[..., 2:4].copy().view(np.float16).astype(np.float32)
            w = d * q + m
    return w.reshape(n, cols)


def quantize(w: np.ndarray, qtype: str) -> QTensor:
    """Quantize a float [rows, cols] matrix into `qtype` (round-to-nearest, as ggml's reference)."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize expects a 2-D matrix, got shape {w.shape}")
    rows, cols = w.shape
    if qtype == "f32":
        return QTensor("f32", (rows, cols), np.ascontiguousarray(w))
    if qtype == "f16":
        return QTensor("f16", (rows, cols), w.astype(np.float16))
    if qtype == "bf16":
        u = w.view(np.uint32)
        rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
        return QTensor("bf16", (rows, cols), rounded)
    if qtype not in BLOCK_FORMATS:
        raise ValueError(f"unknown weight format {qtype!r}; known: {', '.join(FORMATS)}")
    block, nbytes = BLOCK_FORMATS[qtype]
    if cols % block:
        raise ValueError(f"{qtype} needs cols divisible by {block}, got {cols}")
    x = w.reshape(rows, cols // block, block)
    out = np.zeros((rows, cols // block, nbytes), dtype=np.uint8)
    if qtype == "q8_0":
        amax = np.abs(x).max(-1, keepdims=True)
        d = amax / 127.0
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
        q = np.clip(np.rint(x * inv), -127, 127).astype(np.int8)
        out[..., 0:2] = d.astype(np.float16).view(np.uint8)
        out[..., 2:] = q.view(np.uint8)
    elif qtype == "q4_0":
        # ggml: d = max / -8 where max is the signed value of largest magnitude
        idx = np.abs(x).argmax(-1)[..., None]
        mx = np.take_along_axis(x, idx, -1)
        d = mx / -8.0
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
        q = np.clip(np.floor(x * inv + 8.5), 0, 15).astype(np.uint8)
        out[..., 0:2] = d.astype(np.float16).view(np.uint8)
        out[..., 2:] = q[..., :16] | (q[..., 16:] << 4)
    else:  # q4_1
        lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
        d = (hi - lo) / 15.0
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
        q = np.clip(np.floor((x - lo) * inv + 0.5), 0, 15).astype(np.uint8)
        out[..., 0:2] = d.astype(np.float16).view(np.uint8)
        out[..., 2:4] = lo.astype(np.float16).view(np.uint8)
        out[..., 4:] = q[..., :16] | (q[..., 16:] << 4)
    return QTensor(qtype, (rows, cols), out.reshape(rows, -1))


# A GPUTensor's rows are decoded this many bytes (of the compute dtype) at a time (`cuda.TILE_BYTES`): bounds a
# call's temporaries (a 70B model's FFN matrix decoded whole to f16 would take 470 MB); the cost model counts them.
GPU_TILE_BYTES = 32 << 20


@dataclass(frozen=True, eq=False)
class GPUTensor:
    """A [rows, cols] weight on a torch device in its stored format: `data` is uint8 [rows, row_bytes]
    of GGUF blocks for q8_0/q4_0/q4_1, a float32/float16/bfloat16 [rows, cols] tensor for f32/f16/bf16."""

    qtype: str
    shape: tuple[int, int]
    data: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype products are taken in: f16 for block formats (GPUs multiply it at full speed),
        the stored dtype for float formats."""
        import torch  # only a GPUTensor's owner has loaded it

        return torch.float16 if self.qtype in BLOCK_FORMATS else self.data.dtype
