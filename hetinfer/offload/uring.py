"""Batched flash reads through io_uring, for the reader's many small requests.

A sparse layer's records are read as hundreds of small requests a token. Issued as blocking
`preadv` calls from a pool of threads, each costs the process a system call, a sleep, a wake-up and
a turn at the GIL; through io_uring one thread writes all the requests into the submission queue
with a few numpy stores, one `io_uring_enter` issues them together and waits, and the completions
are read back as one array (BENCHMARKS.md, "io_uring": a fraction of the CPU time per request).

The ring is driven through the two system calls and its shared memory directly (ctypes and numpy,
no compiler): the `liburing` binding on PyPI keeps a buffer export and a reference for every
buffer it is handed, so the staging buffers it read into could never be freed. Reads are
IORING_OP_READ (Linux 5.6); the ring is only driven through `io_uring_enter` (no polling thread),
so the kernel sees the queue entries in program order and no memory barriers are needed.

`open_ring` returns None where io_uring cannot be used (another OS or architecture, an old kernel,
a container or sysctl that refuses it), and the reader keeps its threads.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
from dataclasses import dataclass

import numpy as np

DEPTH = 256  # requests queued per io_uring_enter: the ring's entries

_SETUP, _ENTER = 425, 426  # syscall numbers, the same on every architecture since Linux 5.1
_ENTER_GETEVENTS = 1
_OP_READ = 22
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_FEAT_SINGLE_MMAP = 1

_SQE = np.dtype({"names": ["opcode", "flags", "ioprio", "fd", "off", "addr", "len", "rw_flags", "user_data"],
                 "formats": [np.uint8, np.uint8, np.uint16, np.int32, np.uint64, np.uint64, np.uint32, np.uint32,
                             np.uint64],
                 "offsets": [0, 1, 2, 4, 8, 16, 24, 28, 32], "itemsize": 64})
_CQE = np.dtype({"names": ["user_data", "res", "flags"], "formats": [np.uint64, np.int32, np.uint32],
                 "offsets": [0, 8, 12], "itemsize": 16})


class _Params(ctypes.Structure):  # struct io_uring_params
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("sq_thread_cpu", ctypes.c_uint32), ("sq_thread_idle", ctypes.c_uint32),
                ("features", ctypes.c_uint32), ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", ctypes.c_uint32 * 10),  # head tail ring_mask ring_entries flags dropped array resv1 user_addr(u64)
                ("cq_off", ctypes.c_uint32 * 10)]  # head tail ring_mask ring_entries overflow cqes flags resv1 user_addr(u64)


@dataclass
class Short:
    """A request that did not return all its bytes: `got` (< its size; 0 at the end of the file),
    or `errno`, the error the kernel returned for it."""

    index: int
    got: int
    errno: int = 0


def open_ring(depth: int | None = None) -> "Ring | None":
    """A Ring of `depth` entries, or None where io_uring is unavailable here."""
    if platform.system() != "Linux":
        return None
    try:
        return Ring(DEPTH if depth is None else depth)
    except OSError:  # ENOSYS (old kernel), EPERM (seccomp, kernel.io_uring_disabled), ENOMEM (memlock)
        return None


class Ring:
    """One io_uring instance, for one thread at a time; `read` issues a list of requests and waits for them."""

    def __init__(self, depth: int = DEPTH):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = self._libc.syscall
        self._syscall.restype = ctypes.c_long
        p = _Params()
        fd = self._syscall(ctypes.c_long(_SETUP), ctypes.c_uint(depth), ctypes.byref(p))
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_uring_setup: {os.strerror(e)}")
        self.fd, self.depth = fd, int(p.sq_entries)
        try:
            sq, cq = p.sq_off, p.cq_off
            sq_bytes = sq[6] + p.sq_entries * 4
            cq_bytes = cq[5] + p.cq_entries * _CQE.itemsize
            prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            if p.features & _FEAT_SINGLE_MMAP:
                self._sq_map = self._cq_map = mmap.mmap(fd, max(sq_bytes, cq_bytes), flags, prot, offset=_OFF_SQ_RING)
            else:
                self._sq_map = mmap.mmap(fd, sq_bytes, flags, prot, offset=_OFF_SQ_RING)
                self._cq_map = mmap.mmap(fd, cq_bytes, flags, prot, offset=_OFF_CQ_RING)
            self._sqe_map = mmap.mmap(fd, p.sq_entries * _SQE.itemsize, flags, prot, offset=_OFF_SQES)
        except BaseException:
            os.close(fd)
            raise
        u32 = lambda m, at, n=1: np.frombuffer(m, np.uint32, n, at)  # noqa: E731
        self._sq_head, self._sq_tail, self._sq_mask = u32(self._sq_map, sq[0]), u32(self._sq_map, sq[1]), int(u32(self._sq_map, sq[2])[0])
        self._sq_array = u32(self._sq_map, sq[6], p.sq_entries)
        self._cq_head, self._cq_tail, self._cq_mask = u32(self._cq_map, cq[0]), u32(self._cq_map, cq[1]), int(u32(self._cq_map, cq[2])[0])
        self._cqes = np.frombuffer(self._cq_map, _CQE, p.cq_entries, cq[5])
        self._sqes = np.frombuffer(self._sqe_map, _SQE, p.sq_entries)
        self._sqes[:] = np.zeros(1, _SQE)  # fields a read does not set stay 0
        self._sq_array[:] = np.arange(p.sq_entries, dtype=np.uint32)  # queue slot i holds entry i

    def read(self, fd: int, address: int, offsets: np.ndarray, sizes: np.ndarray, at: np.ndarray) -> tuple[int, list[Short]]:
        """Read request i (`sizes[i]` bytes at file offset `offsets[i]`) to memory `address + at[i]`, which the
        caller keeps alive; int64 arrays [n]. Returns (bytes read, the requests that came back short or
        failed). Every request has completed when it returns."""
        got, short = 0, []
        for c0 in range(0, len(offsets), self.depth):
            c1 = min(c0 + self.depth, len(offsets))
            k = c1 - c0
            tail = int(self._sq_tail[0])
            slots = (tail + np.arange(k)) & self._sq_mask  # the queue's entries are slots 0..depth-1, in order
            sqe = self._sqes[slots]
            sqe["opcode"], sqe["fd"] = _OP_READ, fd
            sqe["off"], sqe["addr"], sqe["len"] = offsets[c0:c1], address + at[c0:c1], sizes[c0:c1]
            sqe["user_data"] = np.arange(c0, c1)
            self._sqes[slots] = sqe
            self._sq_tail[0] = (tail + k) & 0xFFFFFFFF
            self._enter(k, k)
            head = int(self._cq_head[0])
            done = self._cqes[(head + np.arange(k)) & self._cq_mask].copy()
            self._cq_head[0] = (head + k) & 0xFFFFFFFF
            res, idx = done["res"].astype(np.int64), done["user_data"].astype(np.int64)
            got += int(res[res > 0].sum())
            for j in np.flatnonzero(res < sizes[idx]).tolist():
                r = int(res[j])
                short.append(Short(int(idx[j]), max(r, 0), -r if r < 0 else 0))
        return got, short

    def _enter(self, to_submit: int, wait: int) -> None:
        """Submit `to_submit` queued entries and wait until `wait` completions are in the queue (one
        system call, repeated only when a signal interrupts it)."""
        while True:
            n = self._syscall(ctypes.c_long(_ENTER), ctypes.c_uint(self.fd), ctypes.c_uint(to_submit), ctypes.c_uint(wait),
                              ctypes.c_uint(_ENTER_GETEVENTS), None, ctypes.c_size_t(0))
            if n < 0:
                e = ctypes.get_errno()
                if e not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                    raise OSError(e, f"io_uring_enter: {os.strerror(e)}")
            else:
                to_submit -= n
            if to_submit == 0 and (int(self._cq_tail[0]) - int(self._cq_head[0])) & 0xFFFFFFFF >= wait:
                return

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
