"""Whole-layer streaming: the flash read path of plans without a window cache whose flash sets are dense.

When the reader would read a layer's whole flash span anyway (its predicted set is dense enough that
the read planner merges every gap, as on an IOPS-bound disk at SmolLM2's densities), waiting for
the predictor before reading only adds latency. `SpanStream` instead reads the flash spans of the
streamed layers in their decode order, cyclically (the next token's first layers while this token's
last ones compute), into a ring of page-aligned pools, each span in a few large O_DIRECT pieces
straight into its pool: no staging copy, no gather, and the disk always has the next layers queued.
The FFN computes the token's predicted set from the pool in place.
"""
from __future__ import annotations

import mmap
from collections import deque
from dataclasses import dataclass

import numpy as np

from hetinfer.offload.reader import FlashReader, SpanRead


@dataclass(frozen=True)
class Span:
    """A layer's flash records in the file: `n` records of `record_bytes` from byte `start`."""

    start: int
    n: int
    record_bytes: int


class SpanStream:
    """Reads `spans` (layer -> Span) in ascending layer order, cyclically, `len(pools)` layers ahead.

    get(layer) -> uint8 [n, record_bytes]: the layer's records, waiting for their read; release(layer)
    frees its pool for the next span in the cycle. Asking for a layer other than the next one in the
    cycle (a new prompt, a skipped layer) restarts the cycle there after the reads in flight finish."""

    def __init__(self, reader: FlashReader, spans: dict[int, Span], n_pools: int, pool_bytes: int):
        self.reader, self.spans = reader, dict(sorted(spans.items()))
        self.order = list(self.spans)
        a = reader.align
        self._aligned = {layer: (s.start // a * a, -(-(s.start + s.n * s.record_bytes) // a) * a)
                         for layer, s in self.spans.items()}
        need = max((hi - lo for lo, hi in self._aligned.values()), default=0)
        if need > pool_bytes:
            raise ValueError(f"a streamed span needs {need} bytes, more than a pool's {pool_bytes}")
        self.pools = [mmap.mmap(-1, pool_bytes) for _ in range(min(n_pools, len(self.order)))]
        self._free = list(range(len(self.pools)))
        self._queue: deque[tuple[int, int, SpanRead]] = deque()  # (layer, pool, read), in cycle order
        self._next = 0  # index into `order` of the next span to submit

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.pools)

    def get(self, layer: int) -> np.ndarray:
        if not self._queue or self._queue[0][0] != layer:
            self._restart(layer)
        _, pool, read = self._queue[0]
        read.wait()
        s, (lo, _) = self.spans[layer], self._aligned[layer]
        at = s.start - lo
        return np.frombuffer(self.pools[pool], np.uint8, s.n * s.record_bytes, at).reshape(s.n, s.record_bytes)

    def release(self, layer: int) -> None:
        if self._queue and self._queue[0][0] == layer:
            self._free.append(self._queue.popleft()[1])
            self._fill()

    def drain(self) -> None:
        """Wait for the reads in flight (their pools stay queued)."""
        for _, _, read in self._queue:
            read.wait()

    def _restart(self, layer: int) -> None:
        self.drain()
        self._free = list(range(len(self.pools)))
        self._queue.clear()
        self._next = self.order.index(layer)
        self._fill()

    def _fill(self) -> None:
        while self._free:
            layer = self.order[self._next]
            self._next = (self._next + 1) % len(self.order)
            pool = self._free.pop(0)
            lo, hi = self._aligned[layer]
            self._queue.append((layer, pool, self.reader.submit_span(lo, hi - lo, self.pools[pool])))
