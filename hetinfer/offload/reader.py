"""Flash reads for the offloading engine: records of a layer from the store's file into RAM rows.

The engine asks for a sorted set of record positions of one layer (records packed back to back,
position p at byte `base + p * record_bytes`) and rows of a destination array to put them in (the
window cache's slots). `plan_reads` turns the set into few aligned requests: one per run of
adjacent records (aligned to the finest block the file's reads allow: `placement.probe.read_alignment`,
512 B with O_DIRECT on many disks), neighbours merged when reading the gap costs less than a separate
request on the measured read curve, long requests split at `max_read` so the threads share them; a dense set
becomes whole-span reads on its own. `FlashReader` issues the requests with `os.preadv` through a
thread pool (each thread loops over a batch) into page-aligned staging buffers, then gathers the
asked records into the destination in one numpy copy.

The file is opened as the flash probe measured it (`placement.probe.open_uncached`): O_DIRECT, or
where the filesystem refuses it, buffered reads whose pages are dropped with posix_fadvise after
each read; `direct=False` reads through the page cache and leaves the pages there (the "page
cache" baseline).
"""
from __future__ import annotations

import mmap
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from hetinfer.offload.store import StoreError
from hetinfer.offload.uring import Ring, open_ring
from hetinfer.placement.hardware import FLASH_BLOCK, FlashTier
from hetinfer.placement.probe import open_uncached, read_alignment

DEFAULT_MERGE_GAP = 16 << 10  # without a read curve: read through gaps up to this many bytes
DEFAULT_THREADS = 8  # without a read curve: reads in flight
IO_METHODS = ("auto", "uring", "threads")  # auto: io_uring with O_DIRECT where available, else threads
STAGING_KEPT = 2  # staging buffers kept for reuse: the engine's read plus one look-ahead


class FlashReadError(StoreError):
    """A flash read failed or the file is shorter than the records asked; one line naming file and fix
    (a StoreError, as the store's own reads of an unreadable or truncated file are)."""


@dataclass
class ReadStats:
    """Cumulative counters of one reader. `FlashReader.stats` is the live object (read a field before
    and after a call); `FlashReader.snapshot()` copies it whole, and `after - before` is the change."""

    requests: int = 0  # reads issued
    bytes: int = 0  # bytes those reads returned
    requested_bytes: int = 0  # record bytes asked for (what a perfect reader would read)
    wait_s: float = 0.0  # seconds callers blocked: read_into, read_span, and Future.result() of submit
    sizes: Counter = field(default_factory=Counter)  # read size rounded up to a power of two -> reads

    def __sub__(self, other: "ReadStats") -> "ReadStats":
        sizes = Counter(self.sizes)
        sizes.subtract(other.sizes)
        return ReadStats(self.requests - other.requests, self.bytes - other.bytes,
                         self.requested_bytes - other.requested_bytes, self.wait_s - other.wait_s,
                         +sizes)


def plan_reads(positions: np.ndarray, record_bytes: int, base: int, curve: FlashTier | None,
               max_read: int, align: int = FLASH_BLOCK) -> list[tuple[int, int]]:
    """`align`-aligned (offset, nbytes) requests, ascending and disjoint, covering every asked record.

    positions: sorted int [n] record positions relative to `base`. Adjacent records start as one
    request; two neighbouring requests (sizes a and b, gap g) merge when `curve.join_pays(a, g, b)` (one
    read costs no more than two on the curve's throughput per read size at the best measured concurrency,
    counting the gap's bytes again at its best rate), else when g <= DEFAULT_MERGE_GAP. Each decision
    looks at the two requests before any merging, which for a curve whose throughput grows with read size
    merges no more than merging one by one would. Requests longer than `max_read` (a multiple of
    4 KiB) are split into equal aligned pieces of at most `max_read`.
    """
    off, size = _plan(np.asarray(positions, dtype=np.int64), record_bytes, base, curve, max_read, align)
    return list(zip(off.tolist(), size.tolist()))


def _plan(positions: np.ndarray, record_bytes: int, base: int, curve: FlashTier | None,
          max_read: int, align: int) -> tuple[np.ndarray, np.ndarray]:
    """`plan_reads` as two int64 arrays [r]: offsets and sizes."""
    if max_read <= 0 or max_read % FLASH_BLOCK:
        raise ValueError(f"max_read must be a positive multiple of {FLASH_BLOCK}, got {max_read}")
    if positions.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    start = base + positions * record_bytes
    lo = start // align * align  # [n] each record's aligned span
    hi = -(-(start + record_bytes) // align) * align
    first = np.empty(positions.size, dtype=bool)  # record opens a run of touching aligned spans
    first[0] = True
    np.greater(lo[1:], hi[:-1], out=first[1:])
    last = np.append(first[1:], True)
    run_lo, run_hi = lo[first], hi[last]  # [k] (spans are sorted, so a run ends at its last record)
    gap = run_lo[1:] - run_hi[:-1]  # [k-1], > 0
    if curve is None:
        merge = gap <= DEFAULT_MERGE_GAP
    else:
        size = run_hi - run_lo
        merge = curve.join_pays(size[:-1], gap, size[1:])
    req_lo = run_lo[np.append(True, ~merge)]
    req_hi = run_hi[np.append(~merge, True)]
    n = req_hi - req_lo
    if n.max() <= max_read:
        return req_lo, n
    pieces = -(-n // max_read)  # [r] equal aligned pieces, each <= max_read, the last the remainder
    step = -(-n // (pieces * align)) * align
    req = np.repeat(np.arange(n.size), pieces)
    k = np.arange(req.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    off = req_lo[req] + k * step[req]
    return off, np.minimum(step[req], req_hi[req] - off)


def best_threads(curve: FlashTier | None, nbytes: int = FLASH_BLOCK) -> int:
    """Reads in flight at which the flash probe measured the best throughput for reads of about
    `nbytes` (the nearest measured size; 4 KiB: a sparse layer's reads); DEFAULT_THREADS without one."""
    if curve is None:
        return DEFAULT_THREADS
    row = int(np.argmin(np.abs(np.log(curve.read_sizes) - np.log(nbytes))))
    return int(curve.concurrency[int(np.argmax(curve.bytes_per_s[row]))])


class FlashReader:
    """Reads records (and plain spans) of one file through io_uring or a pool of threads; thread-safe.

    `io`: "auto" issues record requests through io_uring when the file is read with O_DIRECT and
    the kernel allows it (`self.io` says which was chosen), "threads" always through the pool,
    "uring" refuses to open without it. `threads` is the pool's reads in flight; io_uring keeps
    `uring.DEPTH` in flight. Span reads (`read_span_into`) are one request on the calling thread.

    Staging memory: a call holds one page-aligned buffer of its requests' bytes, at most
    `staging_bytes` (a larger call reads in rounds of that size), and STAGING_KEPT buffers are kept
    for reuse between calls. Submitted reads run one after another on one coordinating thread, so in
    flight the reader holds `staging_bytes` for the submitted read plus that per thread blocked in
    read_into; idle, at most STAGING_KEPT * `staging_bytes`. read_span returns a new buffer of its
    own and stages nothing.
    """

    def __init__(self, path: str, curve: FlashTier | None = None, threads: int | None = None,
                 direct: bool | None = None, max_read: int = 1 << 20, staging_bytes: int = 64 << 20,
                 io: str = "auto"):
        if io not in IO_METHODS:
            raise ValueError(f"io must be one of {', '.join(IO_METHODS)}, got {io!r}")
        if max_read <= 0 or max_read % FLASH_BLOCK:
            raise ValueError(f"max_read must be a positive multiple of {FLASH_BLOCK}, got {max_read}")
        if staging_bytes < max_read:
            raise ValueError(f"staging_bytes ({staging_bytes}) must be at least max_read ({max_read})")
        self.path, self.curve, self.max_read, self.staging_bytes = str(path), curve, max_read, staging_bytes
        self.threads = max(1, threads if threads is not None else best_threads(curve))
        self.method, self._fd = _open(self.path, direct)
        self.align = read_alignment(self._fd, self.method)  # offsets and sizes of reads are multiples of it
        self.file_bytes = os.fstat(self._fd).st_size
        self._pool = ThreadPoolExecutor(max(1, self.threads - 1), thread_name_prefix="hetinfer-read")
        self._submitted = ThreadPoolExecutor(1, thread_name_prefix="hetinfer-read-submit")
        self._lock = threading.Lock()
        self.stats = ReadStats()  # cumulative, updated in place under self._lock
        self._staging: list[mmap.mmap] = []
        self._rings: list[Ring] = []  # one per thread that has read through io_uring
        self._local = threading.local()
        self.io = "threads"  # how record requests are issued: "uring" or "threads"
        if io != "threads" and self.method == "o_direct":
            ring = open_ring()
            if ring is not None:
                self.io = "uring"
                self._keep_ring(ring)
        if io == "uring" and self.io != "uring":
            self.close()
            raise FlashReadError(f"{self.path}: io_uring reads are not available here ("
                                 + ("the file is not read with O_DIRECT" if self.method != "o_direct" else
                                    "the kernel refuses io_uring: too old, a seccomp profile or kernel.io_uring_disabled")
                                 + "); use io='threads'")

    # ------------------------------------------------------------------------------ public calls

    def snapshot(self) -> ReadStats:
        """A copy of `stats` taken between updates (its fields agree with each other)."""
        with self._lock:
            return replace(self.stats, sizes=Counter(self.stats.sizes))

    def read_into(self, base: int, record_bytes: int, positions: np.ndarray, dst: np.ndarray,
                  dst_rows: np.ndarray) -> None:
        """Copy the records at `positions` (sorted int [n], relative to `base`) into `dst[dst_rows]`
        (dst: uint8 [m, record_bytes], any row stride, each row contiguous; dst_rows: int [n]);
        blocks until done."""
        args = self._checked(base, record_bytes, positions, dst, dst_rows)
        t = time.perf_counter()
        try:
            self._read_records(*args)
        finally:
            self._add_wait(time.perf_counter() - t)

    def submit(self, base: int, record_bytes: int, positions: np.ndarray, dst: np.ndarray,
               dst_rows: np.ndarray) -> Future:
        """`read_into` in the background (look-ahead): arguments are checked now, and the returned
        Future's result() (None) re-raises a read's FlashReadError. `dst` must stay alive and
        unread until then; positions and rows are copied."""
        base, record_bytes, positions, dst, dst_rows = self._checked(base, record_bytes, positions, dst, dst_rows)
        future = _TimedFuture(self._add_wait)
        args = (base, record_bytes, positions.copy(), dst, dst_rows.copy())

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    self._read_records(*args)
                except BaseException as e:  # handed to whoever waits on the future
                    future.set_exception(e)
                else:
                    future.set_result(None)

        self._submitted.submit(run)
        return future

    def read_span_into(self, offset: int, nbytes: int, dst: mmap.mmap, at: int = 0, count: bool = True) -> None:
        """Read the file's bytes [offset, offset + nbytes) into dst[at:at + nbytes] with one request on the
        calling thread, straight into `dst` with no staging (the streaming engine's span pieces, each read by
        a thread of its own). offset, nbytes and at: multiples of `align`; dst: page-aligned (an mmap).
        `count=False`: the caller counted the request already (`note_requests`, when it issued it)."""
        self._check_open()
        if offset % self.align or nbytes % self.align or at % self.align or nbytes <= 0 or len(dst) < at + nbytes:
            raise ValueError(f"a span read needs an offset, size and place that are multiples of {self.align} and "
                             f"a buffer that holds it, got {offset}, {nbytes} at {at} into {len(dst)} bytes")
        if offset + nbytes > -(-self.file_bytes // self.align) * self.align:
            raise FlashReadError(f"{self.path}: bytes [{offset}, {offset + nbytes}) are not inside the file "
                                 f"({self.file_bytes} bytes); the store is truncated or belongs to another file")
        view = memoryview(dst)
        try:
            got = self._read_batch(view, [offset], [nbytes], [at])
        finally:
            view.release()
        if count:
            self.note_requests([nbytes], got)

    def note_requests(self, sizes: list[int] | np.ndarray, got: int, requested: int | None = None) -> None:
        """Count requests of `sizes` bytes that returned `got` bytes in all, asked for `requested` bytes (default:
        the requests' own). The span threads' few requests come as a list of ints (no numpy call to hold the
        GIL for); a call's planned requests as an int64 array, counted in a few numpy calls rather than a Python
        step per request (a prompt pass plans hundreds)."""
        if isinstance(sizes, np.ndarray):
            count = np.bincount(np.frexp(sizes - 1)[1])  # [bits] requests by (n - 1).bit_length()
            bits = np.flatnonzero(count)
            sizes_by_power = {1 << b: c for b, c in zip(bits.tolist(), count[bits].tolist())}
            n, total = int(sizes.size), int(sizes.sum())
        else:
            sizes_by_power = Counter(1 << (n - 1).bit_length() for n in sizes)
            n, total = len(sizes), sum(sizes)
        with self._lock:
            s = self.stats
            s.requests += n
            s.bytes += got
            s.requested_bytes += total if requested is None else requested
            s.sizes.update(sizes_by_power)

    def read_span(self, offset: int, nbytes: int) -> np.ndarray:
        """uint8 [nbytes]: the file's bytes [offset, offset + nbytes), any alignment, read in `max_read`
        pieces by all threads into a new aligned buffer (the GPU tier's start-up load; the engine reads its
        RAM tier with `read_into` and streams with `read_span_into`)."""
        self._check_open()
        if offset < 0 or nbytes < 0 or offset + nbytes > self.file_bytes:
            raise FlashReadError(f"{self.path}: bytes [{offset}, {offset + nbytes}) are not inside the file "
                                 f"({self.file_bytes} bytes); the store is truncated or belongs to another file")
        if nbytes == 0:
            return np.zeros(0, np.uint8)
        t = time.perf_counter()
        lo = offset // self.align * self.align
        hi = -(-(offset + nbytes) // self.align) * self.align
        buf = mmap.mmap(-1, hi - lo)
        off = np.arange(lo, hi, self.max_read, dtype=np.int64)
        size = np.minimum(self.max_read, hi - off)
        try:
            got = self._read_requests(buf, off, size, off - lo)
            self.note_requests(size, got, nbytes)
        finally:
            self._add_wait(time.perf_counter() - t)
        return np.frombuffer(buf, np.uint8)[offset - lo:offset - lo + nbytes]

    def release_staging(self) -> None:
        """Unmap the staging buffers kept for reuse (a streaming engine, done with its start-up reads, stages
        nothing more)."""
        with self._lock:
            self._staging.clear()

    def close(self) -> None:
        """Finish submitted reads, stop the threads, close the file; idempotent."""
        if self._fd < 0:
            return
        self._submitted.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        os.close(self._fd)
        self._fd = -1
        self._staging.clear()
        for ring in self._rings:
            ring.close()
        self._rings.clear()

    def __enter__(self) -> "FlashReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ internals

    def _checked(self, base: int, record_bytes: int, positions, dst: np.ndarray, dst_rows) -> tuple:
        """The arguments as the reader uses them; ValueError for calls the engine got wrong,
        FlashReadError for records past the end of the file."""
        self._check_open()
        positions = np.asarray(positions, dtype=np.int64)
        dst_rows = np.asarray(dst_rows, dtype=np.int64)
        if positions.ndim != 1 or dst_rows.shape != positions.shape:
            raise ValueError(f"positions and dst_rows must be 1-D of one length, got {positions.shape} "
                             f"and {dst_rows.shape}")
        if record_bytes <= 0 or base < 0:
            raise ValueError(f"record_bytes must be positive and base non-negative, got {record_bytes}, {base}")
        if (not isinstance(dst, np.ndarray) or dst.dtype != np.uint8 or dst.ndim != 2
                or dst.shape[1] != record_bytes or (dst.strides[1] != 1 and dst.size)):
            raise ValueError(f"dst must be a uint8 array [rows, {record_bytes}] with contiguous rows, got "
                             f"{getattr(dst, 'dtype', type(dst))} {getattr(dst, 'shape', '')}")
        if positions.size:
            if positions[0] < 0 or np.any(positions[1:] <= positions[:-1]):
                raise ValueError("positions must be non-negative and strictly increasing")
            if dst_rows.min() < 0 or dst_rows.max() >= dst.shape[0]:
                raise ValueError(f"dst_rows must lie in [0, {dst.shape[0]})")
            end = base + (int(positions[-1]) + 1) * record_bytes
            if end > self.file_bytes:
                raise FlashReadError(
                    f"{self.path}: record {positions[-1]} ({record_bytes} bytes, section at {base}) ends at byte "
                    f"{end}, past the end of the file ({self.file_bytes} bytes); the store is truncated or "
                    f"belongs to another file: rebuild it")
        return base, record_bytes, positions, dst, dst_rows

    def _check_open(self) -> None:
        if self._fd < 0:
            raise ValueError(f"FlashReader for {self.path} is closed")

    def _read_records(self, base: int, record_bytes: int, positions: np.ndarray, dst: np.ndarray,
                      dst_rows: np.ndarray) -> None:
        """Plan, read in rounds of at most `staging_bytes`, and gather the records into dst."""
        if positions.size == 0:
            return
        off, size = _plan(positions, record_bytes, base, self.curve, self.max_read, self.align)
        stage = np.cumsum(size) - size  # [r] where each request lands when all are laid end to end
        start = base + positions * record_bytes
        req = np.searchsorted(off, start, side="right") - 1
        # [n] each record's place in that layout: a record split between two pieces of a long request
        # stays contiguous there, since the pieces are adjacent in the file and in the layout
        src = stage[req] + (start - off[req])
        rows = dst.view(np.dtype((np.void, record_bytes)))[:, 0]  # [m] opaque records: one memcpy each
        ends = stage + size
        got, i0 = 0, 0
        while i0 < off.size:
            i1 = max(i0 + 1, int(np.searchsorted(ends, stage[i0] + self.staging_bytes, side="right")))
            s0, s1 = int(stage[i0]), int(ends[i1 - 1])
            buf = self._take_staging(s1 - s0)
            try:
                got += self._read_requests(buf, off[i0:i1], size[i0:i1], stage[i0:i1] - s0)
                _gather(buf, s0, s1, src, record_bytes, dst, rows, dst_rows)
            finally:
                self._give_staging(buf)
            i0 = i1
        self.note_requests(size, got, int(positions.size) * record_bytes)

    def _read_requests(self, buf: mmap.mmap, off: np.ndarray, size: np.ndarray, at: np.ndarray) -> int:
        """Read request i (`size[i]` bytes at file offset `off[i]`) into buf[at[i]:]: through the calling
        thread's io_uring, or the calling thread and up to threads - 1 pool threads each loop over every
        threads-th request. Returns bytes read."""
        if self.io == "uring":
            return self._read_uring(buf, off, size, at)
        off, size, at = off.tolist(), size.tolist(), at.tolist()
        view = memoryview(buf)
        n = min(self.threads, len(off))
        futures = [self._pool.submit(self._read_batch, view, off[b::n], size[b::n], at[b::n]) for b in range(1, n)]
        errors, got = [], 0
        try:
            got += self._read_batch(view, off[0::n], size[0::n], at[0::n])
        except FlashReadError as e:
            errors.append(e)
        for f in futures:  # every batch finishes before buf is reused
            try:
                got += f.result()
            except FlashReadError as e:
                errors.append(e)
        view.release()
        if errors:
            raise errors[0]
        return got

    def _read_uring(self, buf: mmap.mmap, off: np.ndarray, size: np.ndarray, at: np.ndarray) -> int:
        ring = getattr(self._local, "ring", None)
        if ring is None:
            ring = open_ring()
            if ring is None:
                raise FlashReadError(f"{self.path}: io_uring refused a new ring for this thread (memlock limit?); "
                                     "read with io='threads'")
            self._keep_ring(ring)
        address = np.frombuffer(buf, np.uint8).ctypes.data  # buf stays mapped until the reads are done
        got, short = ring.read(self._fd, address, off.astype(np.int64), size.astype(np.int64), at.astype(np.int64))
        if short:
            with memoryview(buf) as view:
                for c in short:
                    o, n, a = int(off[c.index]), int(size[c.index]), int(at[c.index])
                    if c.errno:
                        raise self._failed(n, o, os.strerror(c.errno))
                    if o + c.got < self.file_bytes:  # short of the end of the file: the rest as _read_batch reads it
                        got += self._read_batch(view, [o + c.got], [n - c.got], [a + c.got])
        return got

    def _failed(self, n: int, off: int, why: str) -> FlashReadError:
        """The one-line error of a read the kernel failed (either way of issuing it)."""
        return FlashReadError(f"{self.path}: reading {n} bytes at offset {off} failed: {why}; check the disk (dmesg) "
                              "and the file")

    def _keep_ring(self, ring: Ring) -> None:
        self._local.ring = ring
        with self._lock:
            self._rings.append(ring)

    def _read_batch(self, view: memoryview, offsets: list[int], sizes: list[int], at: list[int]) -> int:
        fd, drop, got_all = self._fd, self.method == "fadvise", 0
        for off, n, dst in zip(offsets, sizes, at):
            got = 0
            try:
                while got < n:  # EINTR is retried by os.preadv; a read short of the end of the file
                    k = os.preadv(fd, [view[dst + got:dst + n]], off + got)  # resumes (O_DIRECT: if aligned)
                    got += k
                    if k == 0 or off + got >= self.file_bytes:
                        break
                if drop:
                    os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
            except OSError as e:
                raise self._failed(n, off, e.strerror or str(e)) from None
            if got < min(n, self.file_bytes - off):
                raise FlashReadError(f"{self.path}: the file ended at byte {off + got}, before the "
                                     f"{self.file_bytes} bytes it had when opened; the store was truncated: rebuild it")
            got_all += got
        return got_all

    def _add_wait(self, seconds: float) -> None:
        with self._lock:
            self.stats.wait_s += seconds

    def _take_staging(self, nbytes: int) -> mmap.mmap:
        with self._lock:
            for i, buf in enumerate(self._staging):
                if len(buf) >= nbytes:
                    return self._staging.pop(i)
        return mmap.mmap(-1, min(self.staging_bytes, -(-nbytes // (1 << 20)) << 20))  # page aligned

    def _give_staging(self, buf: mmap.mmap) -> None:
        with self._lock:
            self._staging.append(buf)
            self._staging.sort(key=len, reverse=True)
            del self._staging[STAGING_KEPT:]  # unmapped when the last view goes


class _TimedFuture(Future):
    """A Future whose result() adds the time it blocked to the reader's wait_s."""

    def __init__(self, on_wait):
        super().__init__()
        self._on_wait = on_wait

    def result(self, timeout: float | None = None):
        if self.done():
            return super().result(timeout)
        t = time.perf_counter()
        try:
            return super().result(timeout)
        finally:
            self._on_wait(time.perf_counter() - t)


def _open(path: str, direct: bool | None) -> tuple[str, int]:
    """(method, fd): "o_direct", "fadvise" (O_DIRECT refused; a notice on stderr) or "page_cache"."""
    try:
        if direct is False:
            return "page_cache", os.open(path, os.O_RDONLY)
        method, fd = open_uncached(path)
    except OSError as e:
        raise FlashReadError(f"cannot open {path} for reading: {e.strerror or e}") from None
    if method != "o_direct":
        if direct:
            os.close(fd)
            raise FlashReadError(f"{path}: the filesystem refuses O_DIRECT reads; put the store on another "
                                 f"disk, or let the reader fall back to buffered reads (direct=None)")
        print(f"hetinfer: {path}: the filesystem refuses O_DIRECT, so flash reads go through the page cache "
              f"and drop their pages after each read (posix_fadvise)", file=sys.stderr)
    return method, fd


def _gather(buf: mmap.mmap, s0: int, s1: int, src: np.ndarray, record_bytes: int, dst: np.ndarray,
            rows: np.ndarray, dst_rows: np.ndarray) -> None:
    """Copy the records that lie (partly) in the staged bytes [s0, s1) of the layout into their rows.

    buf holds those bytes from 0; src [n] is each record's offset in the layout, ascending. Records
    wholly inside go in one gather + scatter of opaque records (`rows`: dst as [m] such records); one
    cut by the round's ends (only when a call reads in several rounds) is copied piecewise.
    """
    lo = int(np.searchsorted(src + record_bytes, s0, side="right"))  # first record ending after s0
    hi = int(np.searchsorted(src, s1, side="left"))  # first record starting at or after s1
    part = src[lo:hi]
    whole = (part >= s0) & (part + record_bytes <= s1)
    staged = np.ndarray((s1 - s0 - record_bytes + 1,) if s1 - s0 >= record_bytes else (0,),
                        dtype=np.dtype((np.void, record_bytes)), buffer=buf, strides=(1,))  # a record at each byte
    which = np.flatnonzero(whole) + lo
    rows[dst_rows[which]] = staged[src[which] - s0]
    flat = np.frombuffer(buf, np.uint8)
    for j in (np.flatnonzero(~whole) + lo).tolist():
        a, b = max(int(src[j]), s0), min(int(src[j]) + record_bytes, s1)
        dst[dst_rows[j], a - int(src[j]):b - int(src[j])] = flat[a - s0:b - s0]
