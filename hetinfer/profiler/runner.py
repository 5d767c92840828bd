"""Layer-by-layer batched forward over many sequences (the offline tools' engine).

`Transformer.forward` runs one sequence through all layers; profiling and evaluation instead
run every sequence through layer 0, then layer 1, ...: each layer's weights are dequantized
once and every product is one big GEMM over all tokens. Attention stays exact per sequence
(sequences of equal length are batched together). The FFN is the engine's pluggable
`ffn(layer, h)` callable, applied in token chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from hetinfer.model import FFN, rms_norm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ACT = {"silu": F.silu, "relu": F.relu, "gelu": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class FloatLayer:
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    wqkv: torch.Tensor  # q, k and v projections stacked: [(n_heads + 2 n_kv_heads) head_dim, d]
    wo: torch.Tensor
    gate: torch.Tensor  # [n_ff, d]
    up: torch.Tensor  # [n_ff, d]
    down: torch.Tensor  # [d, n_ff]
    bqkv: Optional[torch.Tensor] = None


class FloatWeights:
    """A model's weights dequantized to torch tensors of `dtype`, one layer at a time.

    With `keep` every layer stays after first use (fast repeated passes over small models);
    without, only the most recent layer is held (one pass over a model larger than RAM allows).
    """

    def __init__(self, model, dtype: torch.dtype = torch.float32, keep: bool = True):
        self.model, self.dtype, self.keep = model, dtype, keep
        self._layers: dict[int, FloatLayer] = {}
        self._output: torch.Tensor | None = None

    def _t(self, W) -> torch.Tensor:
        return torch.from_numpy(W.dequantize()).to(self.dtype)

    def layer(self, i: int) -> FloatLayer:
        if i not in self._layers:
            if not self.keep:
                self._layers.clear()
            L = self.model.weights.layers[i]
            self._layers[i] = FloatLayer(
                attn_norm=torch.from_numpy(L.attn_norm), ffn_norm=torch.from_numpy(L.ffn_norm),
                wqkv=torch.cat([self._t(L.wq), self._t(L.wk), self._t(L.wv)]), wo=self._t(L.wo),
                gate=self._t(L.gate), up=self._t(L.up), down=self._t(L.down),
                bqkv=None if L.bq is None else torch.from_numpy(np.concatenate([L.bq, L.bk, L.bv])),
            )
        return self._layers[i]

    def ffn_out(self, i: int, act: torch.Tensor) -> torch.Tensor:
        """down(act) in float32 for act [T, n_ff]."""
        return (act.to(self.dtype) @ self.layer(i).down.T).float()

    def gate_up(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """act(gate h) * up h [T, n_ff] in the compute dtype, for h [T, d]."""
        L, hd = self.layer(i), h.to(self.dtype)
        return ACT[self.model.config.activation](hd @ L.gate.T).mul_(hd @ L.up.T)

    def dense_ffn(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.ffn_out(i, self.gate_up(i, h))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Output logits (float32) for final residual-stream states x [T, d]."""
        if self._output is None:
            self._output = torch.from_numpy(self.model.weights.output.dequantize())
        cfg = self.model.config
        return rms_norm(x, self.model.weights.output_norm, cfg.norm_eps) @ self._output.T


@dataclass
class Group:
    """Consecutive sequences attended together: `index` [B, T] holds the flat position of each
    (sequence, step); shorter sequences are padded at the end by repeating their last position,
    marked False in `valid` (None when nothing is padded). Causal attention never lets a real token
    see the padding, and the real positions of a group form one contiguous range of the layout."""

    index: torch.Tensor
    valid: torch.Tensor | None


class Packed:
    """Sequences laid out flat (longest first), grouped for attention by length rounded up to `bucket`."""

    def __init__(self, sequences: list[list[int]], bucket: int = 64):
        self.order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        self.lengths = [len(sequences[i]) for i in self.order]
        if not self.lengths or min(self.lengths) == 0:
            raise ValueError("every sequence needs at least one token")
        self.tokens = torch.tensor([t for i in self.order for t in sequences[i]], dtype=torch.long)
        self.n_tokens = len(self.tokens)
        self.sequence = torch.tensor(np.repeat(self.order, self.lengths), dtype=torch.long)  # original id per token
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.groups: list[Group] = []
        padded = [min(-(-n // bucket) * bucket, self.lengths[0]) for n in self.lengths]
        k = 0
        while k < len(padded):
            T, members = padded[k], []
            while k < len(padded) and padded[k] == T:
                members.append(k)
                k += 1
            steps = torch.arange(T)
            n = torch.tensor([self.lengths[j] for j in members])[:, None]
            start = torch.tensor(self.offsets[members])[:, None]
            index = start + torch.minimum(steps[None, :], n - 1)
            valid = steps[None, :] < n
            self.groups.append(Group(index, None if bool(valid.all()) else valid))

    def positions_of(self, seq: int) -> slice:
        """The flat slice holding original sequence `seq`."""
        k = self.order.index(seq)
        return slice(int(self.offsets[k]), int(self.offsets[k + 1]))


class LayerStep:
    """One layer of a pass, after attention: read FFN inputs, then `apply` the FFN exactly once."""

    def __init__(self, runner: "LayerRunner", layer: int):
        self.runner, self.layer = runner, layer

    def ffn_input(self, idx: torch.Tensor) -> torch.Tensor:
        """Post-norm FFN inputs h [len(idx), d] (float32) for flat token positions `idx`."""
        L, cfg = self.runner.weights.layer(self.layer), self.runner.model.config
        return rms_norm(self.runner.x[idx], L.ffn_norm, cfg.norm_eps)

    def apply(self, ffn: FFN) -> None:
        r, L, eps = self.runner, self.runner.weights.layer(self.layer), self.runner.model.config.norm_eps
        for lo in range(0, r.packed.n_tokens, r.chunk):
            x = r.x[lo: lo + r.chunk]
            x += ffn(self.layer, rms_norm(x, L.ffn_norm, eps))
            if r.progress is not None:
                r.progress.update(len(x))


class LayerRunner:
    """Runs `packed` sequences through the model layer by layer; `x` is the residual stream [N, d]."""

    def __init__(self, model, packed: Packed, weights: FloatWeights, chunk: int = 8192, progress=None):
        self.model, self.packed, self.weights, self.chunk, self.progress = model, packed, weights, chunk, progress
        self.x = torch.from_numpy(model.weights.embed.dequantize(packed.tokens.numpy()))

    def steps(self) -> Iterator[LayerStep]:
        """Yield each layer after its attention; the caller must `apply` an FFN before the next."""
        for i in range(self.model.config.n_layers):
            self._attention(i)
            yield LayerStep(self, i)

    def run(self, ffn: FFN | None = None) -> torch.Tensor:
        """All layers with one FFN (default dense); returns the final residual stream [N, d]."""
        for step in self.steps():
            step.apply(ffn or self.weights.dense_ffn)
        return self.x

    def _attention(self, i: int) -> None:
        cfg, tr, L, dt = self.model.config, self.model.transformer, self.weights.layer(i), self.weights.dtype
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        for g in self.packed.groups:
            B, T = g.index.shape
            freqs = torch.outer(torch.arange(T, dtype=torch.float32), torch.from_numpy(tr.inv_freq))
            cis = torch.polar(torch.ones_like(freqs), freqs)[:, None, :]  # [T, 1, hd/2]
            per = max(1, self.chunk // T)  # sequences per batch: about `chunk` tokens
            for b0 in range(0, B, per):
                idx = g.index[b0: b0 + per].reshape(-1)
                nb = len(idx) // T
                # unpadded groups are contiguous in x: work on a view, no gather or scatter
                x = self.x[int(idx[0]): int(idx[-1]) + 1] if g.valid is None else self.x[idx]
                h = rms_norm(x, L.attn_norm, cfg.norm_eps).to(dt)
                qkv = h @ L.wqkv.T
                if L.bqkv is not None:
                    qkv += L.bqkv.to(dt)
                q, k, v = qkv.view(nb, T, H + 2 * KV, hd).split((H, KV, KV), dim=2)
                q, k = rope(q, cis, tr.interleaved).to(dt), rope(k, cis, tr.interleaved).to(dt)
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=True, enable_gqa=True)
                out = (out.transpose(1, 2).reshape(nb * T, H * hd) @ L.wo.T).float()
                if g.valid is None:
                    x += out
                else:  # the real positions of consecutive sequences are one contiguous range of x
                    keep = g.valid[b0: b0 + per].reshape(-1)
                    self.x[int(idx[0]): int(idx[0]) + int(keep.sum())] += out[keep]


def rope(x: torch.Tensor, cis: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of x [..., T, heads, hd] by complex rotations `cis` [T, 1, hd/2] (float32 result).

    The same rotation as `Transformer._apply_rope`, as one complex product: pairs are (2j, 2j+1) when
    `interleaved` (GGUF llama layout), else (j, j + hd/2) (HF layout)."""
    x = x.float()
    half = x.shape[-1] // 2
    if interleaved:
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (half, 2))) * cis).flatten(-2)
    r = torch.complex(x[..., :half], x[..., half:]) * cis
    return torch.cat((r.real, r.imag), dim=-1)
