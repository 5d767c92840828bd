"""Every per-token computation on weights goes through here (placeholder until the kernels issue).

linear(W, x): x [T, in] float32 -> [T, out] float32, W a QTensor in any stored format.
embedding(W, ids): rows of W for token ids, float32 [T, cols].
"""
from __future__ import annotations

import numpy as np
import torch

from hetinfer.tensors import QTensor


def linear(W: QTensor, x: torch.Tensor) -> torch.Tensor:
    return x @ torch.from_numpy(W.dequantize()).T


def embedding(W: QTensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(W.dequantize(np.asarray(ids, dtype=np.int64)))
