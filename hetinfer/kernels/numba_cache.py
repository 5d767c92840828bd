"""Compiling the CPU kernels into numba's on-disk cache, once per machine and version.

`warmup` compiles (in child processes that share the work out) or loads every kernel signature a
session can call; `compiled` says whether the cache holds this version's; `drop_compiled` empties it.
The calls that reach every signature are `_compile_steps`, made through the kernels' interface.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np

from hetinfer import heap
from hetinfer.kernels import cpu, simd
from hetinfer.kernels.threads import _cores
from hetinfer.tensors import BLOCK_FORMATS, FLOAT_FORMATS, QTensor, quantize

def warmup(dense_only: bool = False, progress: Callable[[int, int], None] | None = None) -> float:
    """Compile (or load from the on-disk cache) every CPU kernel; returns the seconds it took.
    `dense_only`: load only those a dense decode and prompt call; any other loads from the cache when
    first called (each loaded kernel holds numba memory: about a third of theirs is the sparse ones').
    `progress(done, total)` is called every half second while the kernels compile (steps of
    `_compile_steps`), not when they load. A dense session's first run compiles only its kernels (about
    half the work); the first to call the others compiles them.

    Decode timings should start after this: first-call compilation is not decode speed. When the
    cache lacks this version of the kernels, child processes compile them into it (`_compile_in_children`)
    and this process then loads them: numba's freshly compiled fastmath attention rounds differently (by
    ~1e-7) from the same code loaded from its cache, enough to change a greedy continuation, so only cached
    code runs here and the first run on a machine gives the same text as every later one."""
    t0 = time.perf_counter()
    stamp = _cache_stamp(dense_only)
    if stamp is not None and not os.environ.get(_CHILD) and not compiled(dense_only):
        _compile_in_children(stamp, dense_only, progress)
    _compile_all(dense_only)
    return time.perf_counter() - t0


def _compile_jobs() -> int:
    """How many processes compile the kernels at once: one a core this process may run on, at most 4, and
    one per COMPILE_BYTES it may still take (a memory cgroup's limit counts: an edge box's unit compiles in one)."""
    if _index_saves() is None:  # a numba whose cache saves `_compile_claimed` cannot lock: one process
        return 1
    return max(1, min(4, len(_cores()), heap.available_bytes() // COMPILE_BYTES))


def _index_saves():
    """numba's class whose `save` writes a function's cache index and code (numba 0.59-0.68), or None."""
    from numba.core import caching

    cls = getattr(caching, "IndexDataCacheFile", None)
    return cls if callable(getattr(cls, "save", None)) else None


# Memory a process compiling the kernels may take (numba compiles on one thread; ~0.56 GB at its peak).
COMPILE_BYTES = 768 << 20


def _compile_in_children(stamp: Path, dense_only: bool, progress: Callable[[int, int], None] | None = None
                         ) -> None:
    """Compile every kernel (`dense_only`: those of a dense session) into numba's cache in `_compile_jobs()`
    child processes that share out `_compile_steps` (each claims the next step no other has), then write
    `stamp`; a cache of older kernels is dropped first (`drop_compiled`). numba names a function's cached
    code from its own index file, read and rewritten on every save: two processes saving signatures of one
    function at once (a kernel both call, as matvec) could each write an index without the other's entry,
    so the children save under one lock (`_compile_claimed`). If a child fails, the stamp is not written and
    this process compiles what is missing itself."""
    ours = {_cache_stamp(False), _cache_stamp(True)}  # this version's stamps
    if not any(s.exists() for s in ours):
        drop_compiled(stamp.parent)
    with tempfile.TemporaryDirectory(prefix="hetinfer-compile-") as claims:
        code = f"from hetinfer.kernels import numba_cache; numba_cache._compile_claimed({claims!r}, {dense_only})"
        env = dict(os.environ, **{_CHILD: "1"})
        children = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(_compile_jobs())]
        try:
            total, running = len(_compile_steps(dense_only)), True
            while running:
                running = any(child.poll() is None for child in children)
                if progress is not None:
                    progress(sum(f.endswith(".done") for f in os.listdir(claims)), total)
                if running:
                    time.sleep(0.5)
        finally:  # interrupted (Ctrl-C): no child goes on compiling without us
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        codes = [child.returncode for child in children]
    if any(codes):  # compile here instead; the error, if it is ours, shows below
        warnings.warn(f"compiling the kernels in child processes failed (exit {next(c for c in codes if c)})")
        return
    try:
        for old in set(stamp.parent.glob("hetinfer-kernels-*.ready")) - ours:
            old.unlink()
        stamp.write_text(f"numba {numba.__version__}\n")
    except OSError:  # a read-only cache directory: numba then does not cache either
        pass


def _compile_claimed(claims: str, dense_only: bool = False) -> None:
    """A compiling child: run each of `_compile_steps(dense_only)` that no other child has claimed (a file it
    creates in `claims`, and NAME.done once it has run), numba's cache saves holding the lock file there."""
    import fcntl

    cls = _index_saves()
    if cls is not None:
        save = cls.save

        def locked_save(self, key, data):
            with open(os.path.join(claims, "lock"), "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes
                return save(self, key, data)

        cls.save = locked_save
    for name, step in _compile_steps(dense_only):
        try:
            os.close(os.open(os.path.join(claims, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        step()
        Path(claims, name + ".done").touch()


_CHILD = "HETINFER_KERNELS_COMPILING"


def compiled(dense_only: bool = False) -> bool:
    """Whether numba's on-disk cache holds this version of every CPU kernel (`dense_only`: of every kernel a
    dense session calls); warmup then only loads them."""
    return any(s is not None and s.exists() for s in (_cache_stamp(False), _cache_stamp(dense_only)))


def drop_compiled(cache_dir: Path) -> None:
    """Remove numba's cached CPU kernels from `cache_dir`, so the next call of each compiles it. numba keys
    a kernel's cache entry on its own module's text (cpu.py) alone, not on the simd.py steps it inlines:
    without this, a new simd.py would run with the kernels compiled from the old one."""
    for f in list(cache_dir.glob("cpu.*.nbi")) + list(cache_dir.glob("cpu.*.nbc")):
        try:
            f.unlink()
        except OSError:  # a read-only cache, or another process removed it first
            pass


def _cache_stamp(dense_only: bool = False) -> Path | None:
    """A file beside numba's cache of the CPU kernels that `warmup` writes once every kernel (`dense_only`:
    every kernel of a dense session) is in it, named for numba's version and the modification times and
    sizes of the kernel sources (cpu.py and the simd.py steps it inlines: whatever changes them makes a new
    stamp, and the children then compile every kernel afresh, see `drop_compiled`), of this module's and of
    the kernels' interface (which signatures `_compile_all` calls)."""
    interface = Path(__file__).with_name("__init__.py")
    try:
        stats = [os.stat(f) for f in (cpu.__file__, simd.__file__, __file__, interface)]
    except OSError:
        return None
    key = hashlib.sha256(repr([numba.__version__] + [(st.st_mtime_ns, st.st_size) for st in stats]).encode())
    key = key.hexdigest()[:16]
    return Path(cpu.matvec.stats.cache_path) / f"hetinfer-kernels-{key}{'.dense' if dense_only else ''}.ready"


def _compile_all(dense_only: bool = False) -> None:
    """Call the CPU kernels once on tiny inputs (numba compiles, or loads from its cache, each signature at
    its first call): those of a dense decode and prompt, then, unless `dense_only`, the sparse ones and the
    unfused attention."""
    for _, step in _compile_steps(dense_only):
        step()


def _compile_steps(dense_only: bool) -> list:
    """(name, call) for the calls that compile every kernel signature a session can call: the dense ones,
    then, unless `dense_only`, the sparse ones and the unfused attention. About the costliest to compile
    come first, so that processes sharing the steps out (`_compile_claimed`) finish at about the same time."""
    from hetinfer.kernels import (GEMV_MAX_T, attention_block, attention_decode, dense_ffn, embedding, gate_up,
                                  gather_matvec, linear, linears, predict_rows, predicted_ffn, rms_norm, scatter_axpy,
                                  sparse_ffn, threshold_ffn)

    rng = np.random.default_rng(0)
    rand = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    x = rand(1, 64)
    one, zero = np.ones(16, np.float32), np.zeros(16, np.float32)
    formats = tuple(FLOAT_FORMATS) + tuple(BLOCK_FORMATS)
    prompt = rand(GEMV_MAX_T + 1, 64)  # longer prompts go through tiles and numpy's BLAS (`_gemm`)
    rows = np.array([3, 1], np.int64)

    def attention(kv):
        def step():
            Wq, Wkv = quantize(rand(64, 64), "q8_0"), quantize(rand(32, 64), "q8_0")
            for interleaved in (False, True):
                attention_block(x.copy(), x[0], Wq, Wkv, Wkv, Wq, None, np.zeros((4, 1, 32), kv),
                                np.zeros((4, 1, 32), kv), 1, one, zero, interleaved, 1e-5, x[0])
        return step

    def dense():
        rms_norm(x, x[0], 1e-5)
        for qtype in formats:
            W = quantize(rand(8, 64), qtype)
            linears((W, W, W), x)
            linears((W, W, W), prompt)
            linear(W, x)
            gate_up(W, W, x, "silu")
            Wf = quantize(rand(32, 64), qtype)
            dense_ffn(Wf, Wf, quantize(rand(64, 32), qtype), x, "silu")
            embedding(W, [1])
        for qtype in ("q4_0", "q4_1"):  # read-only, as a model file's mapped weights: packed (`_dense_info`)
            W = quantize(rand(8, 64), qtype)
            W.data.flags.writeable = False
            linear(W, x)

    def each_format(call):
        def step():
            for qtype in formats:
                call(quantize(rand(8, 64), qtype))
        return step

    def records():
        # the offloading engine's matrices are views into neuron records (gate | up | down_t per row), so their
        # rows are a record apart: numba's 'A' layout, another type than the 'C' of a matrix of its own
        W = quantize(rand(8, 64), "q4_1")
        rb = W.data.shape[1]
        data = np.tile(W.data, (1, 3))
        return [QTensor(W.qtype, W.shape, data[:, k * rb : (k + 1) * rb]) for k in range(3)]

    def records_decode():
        gate, up, down_t = records()
        sparse_ffn(gate, up, down_t, rows, x, "silu")

    def records_prompt():
        gate, up, _ = records()
        gate_up(gate, up, rand(2, 64), "silu")  # a short prompt's pass
        gate_up(gate, up, prompt, "silu")  # a longer one's, in tiles

    def predicted():
        W1, W2_t = quantize(rand(8, 64), "f32"), quantize(rand(8, 40), "f32")
        predict_rows(W1, W2_t, x, 0.0)
        Wf = quantize(rand(40, 64), "q4_1")
        predicted_ffn(W1, W2_t, 0.0, Wf, Wf, Wf, x, "silu")

    def unfused_attention():
        for interleaved, kv in ((False, np.float32), (True, np.float32), (False, np.float16)):
            attention_decode(np.ones((1, 128), np.float32), np.ones((1, 64), np.float32),
                             np.ones((1, 64), np.float32), np.zeros((4, 2, 32), kv), np.zeros((4, 2, 32), kv), 1,
                             one, zero, interleaved)

    steps = [  # (name, whether a dense session calls it, the calls)
        ("attention_f32", True, attention(np.float32)),
        ("threshold_ffn", False, each_format(lambda W: threshold_ffn(W, W, W, x, "silu", 0.5))),
        ("records_decode", False, records_decode),
        ("records_prompt", False, records_prompt),
        ("dense", True, dense),
        ("attention_f16", True, attention(np.float16)),  # after attention_f32 has compiled what both call
        ("sparse_ffn", False, each_format(lambda W: sparse_ffn(W, W, W, rows, x, "silu"))),
        ("scatter_axpy", False, each_format(lambda W: scatter_axpy(W, rows, np.ones(2, np.float32),
                                                                   np.zeros(64, np.float32)))),
        ("predicted_ffn", False, predicted),
        ("gather_matvec", False, each_format(lambda W: gather_matvec(W, rows, x))),
        ("unfused_attention", False, unfused_attention),
    ]
    return [(name, step) for name, dense_session, step in steps if dense_session or not dense_only]
