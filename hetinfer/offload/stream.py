"""Whole-layer streaming: the flash read path of plans without a window cache whose flash sets are dense.

When the reader would read a layer's whole flash span anyway (its predicted set is dense enough that
the read planner merges every gap, as on an IOPS-bound disk at SmolLM2's densities), waiting for
the predictor before reading only adds latency. `SpanStream` instead reads the flash spans of the
streamed layers in their decode order, cyclically (the next token's first layers while this token's
last ones compute), into a ring of page-aligned pools, each span in STREAM_PIECES O_DIRECT requests
straight into its pool by reading threads of the stream's own: no staging copy, no gather, the disk
always has the next layers queued, and the engine's thread only queues a freed pool's pieces (the
reading threads run almost no Python, so they hardly contend with the engine for the GIL).
The FFN computes the token's predicted set from the pool in place.

How many requests a span is read in is chosen by timing (`PieceTuner`): more pieces in flight read faster
from a disk that needs queue depth, but each costs the CPU a system call, a thread wake-up and a turn at
the GIL, which a stream already ahead of compute pays for nothing.
"""
from __future__ import annotations

import mmap
import queue
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from hetinfer.offload.reader import FlashReader
from hetinfer.placement.hardware import STREAM_PIECES


@dataclass(frozen=True)
class Span:
    """A layer's flash records in the file: `n` records of `record_bytes` from byte `start`."""

    start: int
    n: int
    record_bytes: int


# The piece counts PieceTuner tries: STREAM_PIECES, the count the cost model prices (`placement.cost.span_seconds`)
# and the one kept unless another is clearly faster, then fewer.
PIECE_CHOICES = tuple(sorted({STREAM_PIECES, 2, 1}, reverse=True))
TUNE_CYCLES = 4  # decode cycles (tokens) timed per choice
RETUNE_CYCLES = 512  # cycles after which the choices are timed again (the context grows, other load comes and goes)
# How much faster than the first choice another must time to replace it: fewer pieces save the reads' CPU cost, a
# few percent at most, where a wrong choice costs the disk its queue depth (up to half its rate at one piece).
FEWER_PIECES_GAIN = 0.05


class PieceTuner:
    """How many pieces the stream reads each span in: the `choices` in turn, one timed decode cycle (a token's
    pass over the streamed layers, timed from one request of the first streamed layer to the next) at a time,
    in rounds that alternate direction (4 2 1, 1 2 4, ...), until each has `cycles` timings; then the first
    choice, unless another's median cycle is FEWER_PIECES_GAIN faster (then the fastest), until `retune` more
    cycles have passed. Taking turns, back and forth, the choices share whatever the machine's other load does
    meanwhile, a steady drift included. A cycle broken by a restart or a prompt, or begun before a change of
    choice took effect, is not timed."""

    def __init__(self, choices: tuple[int, ...] = PIECE_CHOICES, cycles: int = TUNE_CYCLES,
                 retune: int = RETUNE_CYCLES, clock=time.perf_counter):
        self.choices, self.cycles, self.retune, self.clock = choices, cycles, retune, clock
        self.times: dict[int, list[float]] = {c: [] for c in choices}
        self.pieces = choices[0]
        rounds = [choices if r % 2 == 0 else choices[::-1] for r in range(cycles)]
        self._schedule = [c for r in rounds for c in r]  # the choice of each timed cycle while tuning
        self._since_settled = 0  # cycles since the choice was made
        self._start: float | None = None

    @property
    def settled(self) -> bool:
        """Every choice has been timed: the choice holds until `retune` more cycles have passed."""
        return sum(map(len, self.times.values())) == len(self._schedule)

    def cycle(self) -> None:
        """A decode cycle begins (and the one before it ends)."""
        now = self.clock()
        start, self._start = self._start, now
        if start is not None:
            self._record(now - start)  # a change of choice un-times the cycle beginning now

    def untimed(self) -> None:
        """The current cycle is not a decode token's (a restart, a prompt)."""
        self._start = None

    def _record(self, seconds: float) -> None:
        if self.settled:
            self._since_settled += 1
            if self._since_settled >= self.retune:
                self.times = {c: [] for c in self.choices}
                self._set(self.choices[0])
            return
        self.times[self.pieces].append(seconds)
        if not self.settled:
            self._set(self._schedule[sum(map(len, self.times.values()))])
            return
        self._since_settled = 0
        median = {c: statistics.median(t) for c, t in self.times.items()}
        first, fastest = self.choices[0], min(self.choices, key=median.get)
        self._set(fastest if median[fastest] < (1 - FEWER_PIECES_GAIN) * median[first] else first)

    def _set(self, pieces: int) -> None:
        if pieces != self.pieces:
            self.pieces = pieces
            self._start = None  # spans already queued were cut the old way: the next cycle is mixed


class SpanStream:
    """Reads `spans` (layer -> Span) in ascending layer order, cyclically, `len(pools)` layers ahead, each in
    `tuner.pieces` pieces (at most STREAM_PIECES) read by as many threads.

    get(layer) -> uint8 [n, record_bytes]: the layer's records, waiting for their read; release(layer)
    frees its pool for the next span in the cycle. Asking for a layer other than the next one in the
    cycle (a new prompt, a skipped layer) restarts the cycle there after the reads in flight finish."""

    def __init__(self, reader: FlashReader, spans: dict[int, Span], n_pools: int, pool_bytes: int,
                 tuner: PieceTuner | None = None):
        self.reader, self.spans = reader, dict(sorted(spans.items()))
        self.tuner = tuner or PieceTuner()
        self.order = list(self.spans)
        a = reader.align
        self._aligned = {layer: (s.start // a * a, -(-(s.start + s.n * s.record_bytes) // a) * a)
                         for layer, s in self.spans.items()}
        need = max((hi - lo for lo, hi in self._aligned.values()), default=0)
        if need > pool_bytes:
            raise ValueError(f"a streamed span needs {need} bytes, more than a pool's {pool_bytes}")
        self.pools = [mmap.mmap(-1, pool_bytes) for _ in range(min(n_pools, len(self.order)))]
        self._read = [threading.Event() for _ in self.pools]  # set: the pool's span is in (or failed)
        self._left = [0] * len(self.pools)  # pieces of the pool's span still being read
        self._lock = threading.Lock()
        self._error: list[BaseException | None] = [None] * len(self.pools)
        self._free = list(range(len(self.pools)))
        self._queue: deque[tuple[int, int]] = deque()  # (layer, pool) submitted, in cycle order
        self._next = 0  # index into `order` of the next span to submit
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name="hetinfer-span", daemon=True)
                         for _ in range(STREAM_PIECES if self.pools else 0)]
        for t in self._threads:
            t.start()

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.pools)

    def get(self, layer: int) -> np.ndarray:
        if not self._queue or self._queue[0][0] != layer:
            self._restart(layer)
        elif layer == self.order[0]:
            self.tuner.cycle()
        pool = self._queue[0][1]
        self._read[pool].wait()
        if self._error[pool] is not None:
            error, self._error[pool] = self._error[pool], None
            self._restart(layer)  # the next get reads the span again
            raise error
        s, (lo, _) = self.spans[layer], self._aligned[layer]
        return np.frombuffer(self.pools[pool], np.uint8, s.n * s.record_bytes, s.start - lo).reshape(s.n, s.record_bytes)

    def release(self, layer: int) -> None:
        if self._queue and self._queue[0][0] == layer:
            self._free.append(self._queue.popleft()[1])
            self._fill()

    def drain(self) -> None:
        """Wait for the reads in flight (their pools stay queued)."""
        for _, pool in self._queue:
            self._read[pool].wait()

    def close(self) -> None:
        """Finish the reads in flight and stop the reading threads; idempotent."""
        self.drain()
        for t in self._threads:
            if t.is_alive():
                self._jobs.put(None)
        for t in self._threads:
            t.join()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            pool, offset, nbytes, at = job
            try:
                self.reader.read_span_into(offset, nbytes, self.pools[pool], at, count=False)
            except BaseException as e:  # handed to get(), on the engine's thread
                self._error[pool] = e
            with self._lock:
                self._left[pool] -= 1
                if self._left[pool] == 0:
                    self._read[pool].set()

    def _restart(self, layer: int) -> None:
        self.tuner.untimed()
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
            self._read[pool].clear()
            self._error[pool] = None
            self._queue.append((layer, pool))
            lo, hi = self._aligned[layer]
            step = -(-(hi - lo) // (self.tuner.pieces * self.reader.align)) * self.reader.align
            pieces = [(at, min(step, hi - lo - at)) for at in range(0, hi - lo, step)]
            self._left[pool] = len(pieces)
            sizes = [n for _, n in pieces]  # counted as issued, so a token's figures hold its own reads
            self.reader.note_requests(sizes, min(sum(sizes), self.reader.file_bytes - lo))
            for at, n in pieces:
                self._jobs.put((pool, lo + at, n, at))
