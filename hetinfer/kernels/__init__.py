"""Every per-token computation on weights goes through here.

Weights are `QTensor`s in their stored format (f32, f16, bf16, q8_0, q4_0, q4_1), read in
place by the CPU kernels (`cpu.py`, numba; their inner vector steps in `simd.py`), or
`GPUTensor`s: the same stored bytes on a GPU, the rows a call needs decoded by torch (`cuda.py`,
made by `to_cuda`). Activations are float32 numpy arrays and results are new numpy arrays
(`scatter_axpy` updates `y` in place); a CPU run never imports torch (it would cost a decode
~200 MiB of memory). torch tensors are accepted too and give torch tensors back, and `GPUTensor`
weights take and give torch tensors on their device (`cuda.py` and torch load on first use).
`reference.py` holds the plain numpy versions.

The dense calls (every row read) read a Q4 matrix's rows packed in groups of 8, interleaved block by
block (`cpu.pack_rows`, layout in `simd.py`): one copy per weight whose bytes cannot change (a mapped
model file), made by `pack` when a session sets the model up, else at its first dense call
(`_dense_info`); a group's dot spends one float scaling per block on 8 rows instead of 8 (BENCHMARKS.md,
"Q4 rows packed in groups of 8"). The sparse calls read subsets of the stored rows.

Dense:   linear, linears (several matrices, one x), gate_up (act(gate x) * up x), dense_ffn, embedding
Decoder: rms_norm, attention_decode (RoPE + KV-cache write + attention for one new token),
         attention_block (a decode step's whole attention half of a layer, in one call),
         device_attention (a layer's attention in torch on its device, where its weights are GPUTensors)
Sparse:  gather_matvec (selected output rows), scatter_axpy (y += a @ Wd_t[rows]),
         sparse_ffn (one token's FFN over the active neurons, neuron-major down projection),
         threshold_ffn (one token's FFN over the neurons whose |act(g) * u| passes a threshold, chosen inside),
         predict_rows (the neurons a low-rank predictor picks for one token),
         predicted_ffn (sparse_ffn over predict_rows' choice, in one call),
         prompt_ffn (a prompt's FFN over every neuron of a neuron-major part: an offloaded layer's records)
Bound:   attention_step, dense_ffn_step, threshold_ffn_step: those calls for one layer's weights, checked
         once, for the decode loop (per call, the checks cost as much as a few percent of a small model's token)
Setup:   transpose_down (neuron-major down, once at load), convert, to_cuda, one_blas_thread,
         pack (the packed copies of weights read in full, before the first prompt), packed_nbytes (the memory a
         weight's packed copy holds)
Threads: set_threads, get_threads, max_threads, every_thread (`threads.py`: how many threads kernels run on)
Cache:   warmup, compiled, drop_compiled (`numba_cache.py`: the kernels compiled once into numba's disk cache)
"""
from __future__ import annotations

import mmap
import os
import sys

import numba
import numpy as np

from hetinfer.tensors import BLOCK_FORMATS, FLOAT_FORMATS, GPUTensor, QTensor, quantize

if "NUMBA_THREADING_LAYER" not in os.environ:
    # OpenMP wakes its threads in ~1.5 us; the default workqueue layer needs ~140 us per parallel call.
    numba.config.THREADING_LAYER = "omp"
# After a parallel region GNU OpenMP's threads spin 300,000 rounds before they sleep (GOMP_SPINCOUNT, read when
# the threading layer loads): through a prompt they held the cores against this process's other threads, the
# BLAS shares of `prompt_ffn` and `attention_prompt` and the flash stream's readers. 10,000 rounds cover the
# microseconds between a decode's regions (BENCHMARKS.md measures both).
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from hetinfer.kernels import cpu, simd  # noqa: E402  (after the threading layer is chosen)
from hetinfer.kernels.numba_cache import compiled, drop_compiled, warmup  # noqa: E402, F401
from hetinfer.kernels.threads import (  # noqa: E402, F401
    busy_seconds, every_thread, get_threads, max_threads, set_threads, threads_for)

ACTIVATIONS = tuple(cpu.ACT)
# Below this many weight bytes per thread a kernel runs on fewer threads: waking a thread costs ~1.5 us.
MIN_BYTES_PER_THREAD = 16 << 10
# Up to GEMV_MAX_T tokens the stored rows are read once and dotted with each token's x; past it,
# tiles of TILE_BYTES float32 bytes are dequantized for numpy's GEMM (BLAS). Measured on SmolLM2 (2 threads),
# the crossover lies at 16-32 tokens: a 5-token prompt took 44 ms through the GEMM, 23 ms here. Packed
# weights (`_dense_info`) take the dots at any length: faster than the tiles at up to 512 tokens at least,
# and their stored rows are never read again.
GEMV_MAX_T = 16
TILE_BYTES = 8 << 20


# ---------------------------------------------------------------------------------------------
# argument handling
# ---------------------------------------------------------------------------------------------


def _u8(W: QTensor) -> np.ndarray:
    """The weight bytes [rows, row_bytes] the kernels read."""
    return _info(W)[1]


def _info(W: QTensor) -> tuple:
    """(format code, weight bytes [rows, row_bytes], nbytes, data), cached on W while W.data is the
    same array: the per-call attribute and flag lookups cost more than a small kernel.

    The bytes are always a read-only view: numba compiles a kernel once per argument type, and
    read-only (mmapped GGUF) and writable (converted at load) arrays are different types; one type
    halves the variants to compile and lets matrices of both origins share one call.
    Rows need not be adjacent, only each row contiguous: a row-major view into records that hold
    several matrices' rows (a neuron's gate, up and down rows bundled together) is read in place."""
    info = W.__dict__.get("_kernel_info")
    if info is not None and info[3] is W.data:
        return info
    d = W.data
    if d.ndim == 2 and d.strides[1] == d.itemsize and d.strides[0] >= d.shape[1] * d.itemsize:
        u8 = d.view(np.uint8)
    else:
        u8 = np.ascontiguousarray(d).view(np.uint8)
    u8 = u8.view()
    u8.flags.writeable = False
    info = (cpu.FMT[W.qtype], u8, u8.nbytes, d)
    W.__dict__["_kernel_info"] = info
    return info


def _dense_info(W: QTensor) -> tuple:
    """`_info` for the kernels that read every row (dense products): W's rows packed in groups of 8
    (`cpu.pack_rows`, faster dots: BENCHMARKS.md) where that applies: q4_0 or q4_1, rows a multiple of 8,
    a CPU with AVX2 (`simd.PACKS`), and bytes that cannot change (a read-only array: a memory-mapped
    model file, not a view into a cache that is rewritten). The packed copy is made at the first dense
    call and kept on W; the stored rows' pages are let go (`_unmap`) and mapped again only if a sparse
    kernel (row subsets) reads them."""
    info = W.__dict__.get("_dense_info")
    if info is not None and info[3] is W.data:
        return info
    info = _info(W)
    if info[0] in simd.PACKED and simd.PACKS and not W.data.flags.writeable and not W.shape[0] % simd.GROUP_ROWS:
        u8 = info[1]
        packed = np.zeros((u8.shape[0] // simd.GROUP_ROWS, u8.shape[1] * simd.GROUP_ROWS), np.uint8)
        cpu.pack_rows(info[0], u8, packed)
        packed.flags.writeable = False  # one array type with the stored rows' read-only views
        info = (simd.PACKED[info[0]], packed, packed.nbytes, W.data)
        _unmap(W.data)
    W.__dict__["_dense_info"] = info
    return info


def _unmap(a: np.ndarray) -> None:
    """Drop the whole pages of `a`, if it is a contiguous view into a memory-mapped file, from this process's
    mapping (madvise DONTNEED): once packed, the stored rows are read only by a long prompt's tiles or a
    sparse kernel, and until then they need not count as the process's memory. The pages stay in the OS
    page cache, unmapped, so a memory limit reclaims them before anything in use; a read maps them again."""
    m = a
    while m is not None and not isinstance(m, mmap.mmap):
        m = getattr(m, "base", None)
    if m is None or not hasattr(m, "madvise") or not a.flags.c_contiguous:
        return
    start = a.ctypes.data - np.frombuffer(m, np.uint8).ctypes.data
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # pages that hold nothing but a's bytes
    end = (start + a.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > first:
        m.madvise(mmap.MADV_DONTNEED, first, end - first)


_PACKED = frozenset(simd.PACKED.values())  # the packed format codes


def pack(Ws) -> int:
    """Make now the packed copy (`_dense_info`) of each weight in `Ws` that the dense kernels would pack at
    their first call, so that call (a session's first prompt) does not pay for it; returns the bytes packed.
    Weights that do not pack (other formats, writable arrays, GPU tensors) are left as they are. The weights
    are shared among the kernels' threads (`cpu.pack_rows` releases the GIL)."""
    todo = list({id(W): W for W in Ws if not _is_cuda(W)}.values())
    _run_split(_dense_info, todo, _fixed_split(len(todo)))
    return sum(map(packed_nbytes, todo))


def packed_nbytes(W) -> int:
    """Bytes of W's packed copy (`_dense_info`), 0 if it has none."""
    info = getattr(W, "__dict__", {}).get("_dense_info")
    return info[2] if info is not None and info[3] is W.data and info[0] in _PACKED else 0


def _call_infos(Ws, pack: bool) -> list[tuple]:
    """The infos of matrices that one kernel call reads (same format, e.g. gate and up): `_dense_info` of
    each when `pack` and all of them pack alike, else `_info` (the stored rows)."""
    if pack:
        infos = [_dense_info(W) for W in Ws]
        if len({i[0] for i in infos}) == 1:
            return infos
    return [_info(W) for W in Ws]


_F32 = np.dtype(np.float32)


def _np(x) -> np.ndarray:
    """A C-contiguous float32 numpy view (zero-copy for contiguous float32 arrays and CPU tensors)."""
    if type(x) is np.ndarray:
        if x.dtype is _F32 and x.flags.c_contiguous:
            return x
        return np.ascontiguousarray(x, dtype=np.float32)
    if _is_torch(x):
        try:
            xn = x.numpy()  # raises for tensors that need grad, live on a GPU or have no numpy dtype
        except (RuntimeError, TypeError):
            return x.detach().cpu().float().contiguous().numpy()
        if xn.dtype is _F32 and xn.flags.c_contiguous:
            return xn
        x = xn
    return np.ascontiguousarray(x, dtype=np.float32)


def _is_torch(x) -> bool:
    """Whether x is a torch tensor (checked without importing torch: a caller holding one has loaded it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _like(x, out: np.ndarray):
    """A CPU kernel's result `out` in the kind of array its input `x` is: numpy for numpy (the engine),
    a torch tensor (zero-copy) for a torch tensor."""
    return out if type(x) is np.ndarray or not _is_torch(x) else sys.modules["torch"].from_numpy(out)


def _cuda():
    """The GPU kernels (`cuda.py`), imported with torch on first use."""
    from hetinfer.kernels import cuda

    return cuda


def _x2d(W: QTensor, x) -> np.ndarray:
    xn = _np(x)
    shape = xn.shape
    if shape[-1] != W.shape[1]:
        raise ValueError(f"input has {shape[-1]} features but the weight takes {W.shape[1]} ({W.shape} {W.qtype})")
    return xn if len(shape) == 2 else xn.reshape(-1, shape[-1])


_I64 = np.dtype(np.int64)


def _rows(rows) -> np.ndarray:
    """Row ids as a 1-D int64 array (any order, may be empty). The kernels check the range: each returns
    -1, or the position of the first id outside the matrix, before computing anything (`_check`)."""
    r = rows
    if not (type(r) is np.ndarray and r.dtype is _I64 and r.ndim == 1 and r.flags.c_contiguous):
        if _is_torch(r):
            r = r.detach().cpu().numpy()
        r = np.asarray(r)
        if r.ndim != 1 or (r.size and r.dtype.kind not in "iu"):
            raise ValueError(f"row ids must be a 1-D integer array, got shape {r.shape} dtype {r.dtype}")
        r = np.ascontiguousarray(r, dtype=np.int64)
    return r


def _check(bad: int, r: np.ndarray, n: int) -> None:
    if bad >= 0:
        raise ValueError(f"row id {int(r[bad])} (position {bad}) is out of range: valid ids are 0..{n - 1}")


def _chunks(nbytes: int) -> int:
    """Chunks (one per thread) for a kernel reading `nbytes` of weights whose rows are split among the
    threads; a row's result never depends on the split. Tiny work runs on the calling thread."""
    return _split(nbytes // MIN_BYTES_PER_THREAD, get_threads())


def _split(parts: int, threads: int) -> int:
    """Chunks for work of `parts` shares of MIN_BYTES_PER_THREAD on up to `threads` threads."""
    return 1 if parts < 2 else min(threads, parts)


def _parts(nbytes: int) -> int:
    """Parts for a kernel reading `nbytes` that adds up per-part results (partial sums)."""
    return _fixed_split(nbytes // MIN_BYTES_PER_THREAD)


def _fixed_split(n: int) -> int:
    """Up to `n` parts, as many as set_threads allows however many threads are free now; those run
    them (get_threads sets numba's count), so sums, and the text, never depend on the machine's load."""
    get_threads()
    return 1 if n < 2 else min(max_threads(), n)


def _is_cuda(W) -> bool:
    return isinstance(W, GPUTensor)


# ---------------------------------------------------------------------------------------------
# dense
# ---------------------------------------------------------------------------------------------


def linear(W: QTensor, x: np.ndarray) -> np.ndarray:
    """x [T, in] -> x @ W^T [T, out]. Decode and short prompts (T <= GEMV_MAX_T), and packed weights,
    read the stored format directly; longer prompts dequantize row tiles and use numpy's GEMM."""
    if _is_cuda(W):
        return _cuda().linear(W, x)
    xn = _x2d(W, x)
    fmt, u8, nbytes, _ = _dense_info(W)
    if xn.shape[0] > GEMV_MAX_T and fmt not in _PACKED:
        return _like(x, _gemm(W, _q8(xn) if W.qtype in BLOCK_FORMATS else xn))
    out = np.empty((xn.shape[0], W.shape[0]), np.float32)
    cpu.matvec(fmt, (u8,), xn, (out,), _chunks(nbytes))
    return _like(x, out)


def linears(Ws: tuple[QTensor, ...] | list[QTensor], x: np.ndarray) -> list[np.ndarray]:
    """[x @ W^T for W in Ws] in one kernel call when the weights share format and input size (q/k/v)."""
    W0 = Ws[0]
    if _is_cuda(W0):
        return [_cuda().linear(W, x) for W in Ws]
    xn = _x2d(W0, x)
    T = xn.shape[0]
    if T > GEMV_MAX_T and not all(_dense_info(W)[0] in _PACKED for W in Ws):
        xq = _q8(xn) if any(W.qtype in BLOCK_FORMATS for W in Ws) else None  # quantized once for them all
        return [_like(x, _gemm(W, xq if W.qtype in BLOCK_FORMATS else xn)) for W in Ws]
    fmt, u8, _, _ = _dense_info(W0)
    ws, outs, nbytes = [], [], 0
    for W in Ws:  # a plain loop: per call, generator expressions cost more than these small GEMVs
        f, w, n, _ = _dense_info(W)  # cached on W: the first one again costs a dict lookup
        if f != fmt or w.shape[1] != u8.shape[1] or w.flags.c_contiguous != u8.flags.c_contiguous:
            return [linear(W, x) for W in Ws]
        ws.append(w)
        outs.append(np.empty((T, W.shape[0]), np.float32))
        nbytes += n
    cpu.matvec(fmt, tuple(ws), xn, tuple(outs), _chunks(nbytes))
    return [_like(x, o) for o in outs]


def _q8(xn: np.ndarray) -> np.ndarray:
    """x as the block-format kernels read it (8 bits per block of 32, `cpu.quantize_x`), as float32."""
    T, cols = xn.shape
    xq, xs = np.empty((T, cols // 32, 32), np.int8), np.empty((T, cols // 32, 2), np.float32)
    cpu.quantize_x(xn, xq, xs)
    return (xq * xs[..., :1]).reshape(T, cols)


def _gemm(W: QTensor, x: np.ndarray) -> np.ndarray:
    """Prefill: x @ W^T, W dequantized `TILE_BYTES` of rows at a time and multiplied with numpy (BLAS). Block
    formats take x quantized to 8 bits as in decode (`_q8`, done by the caller, once for the matrices sharing
    x), so a token's result does not depend on the path."""
    if W.qtype == "f32":
        return x @ W.data.T
    out = np.empty((x.shape[0], W.shape[0]), np.float32)
    for lo, t in _tiles(W):
        out[:, lo : lo + len(t)] = x @ t.T
    return out


def _tiles(W: QTensor):
    """(first row, float32 [rows, cols]) for W's rows dequantized `TILE_BYTES` at a time into one buffer, on the
    calling thread: BLAS's threads spin a while after each product, and numba's after a parallel region; the
    two pools alternating on the same cores made prefill 4x slower."""
    rows, cols = W.shape
    step = max(1, TILE_BYTES // (4 * cols))
    tile = np.empty((min(step, rows), cols), np.float32)
    fmt, w = cpu.FMT[W.qtype], _u8(W)
    for lo in range(0, rows, step):
        ids = np.arange(lo, min(lo + step, rows), dtype=np.int64)
        cpu.dequantize_rows(fmt, w, ids, tile[: len(ids)], 1)
        yield lo, tile[: len(ids)]


def gate_up(Wg: QTensor, Wu: QTensor, x: np.ndarray, act: str) -> np.ndarray:
    """act(x @ Wg^T) * (x @ Wu^T) [T, n_ff]: the dense FFN's first half, fused (one pass, one call)."""
    if act not in cpu.ACT:
        raise ValueError(f"unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
    if _is_cuda(Wg):
        return _cuda().gate_up(Wg, Wu, x, act)
    xn = _x2d(Wg, x)
    (fg, ug, ng, _), (fu, uu, nu, _) = _call_infos((Wg, Wu), True)
    if (xn.shape[0] > GEMV_MAX_T and fg not in _PACKED) or fg != fu:
        g, u = linears((Wg, Wu), xn)
        return _like(x, _act(act, g) * u)
    h = np.empty((xn.shape[0], Wg.shape[0]), np.float32)
    cpu.gate_up(fg, ug, uu, xn, cpu.ACT[act], h, _chunks(ng + nu))
    return _like(x, h)


def _act(act: str, g: np.ndarray) -> np.ndarray:
    """The activation over a prompt's gate products, in float32 (decode applies it inside the kernels)."""
    if act == "silu":
        with np.errstate(over="ignore"):  # exp(-g) = inf below g = -88: g / inf = -0, silu's limit
            return g / (np.float32(1.0) + np.exp(-g))
    if act == "relu":
        return np.maximum(g, np.float32(0.0))
    c = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * g * (np.float32(1.0) + np.tanh(c * (g + np.float32(0.044715) * g * g * g)))


def embedding(W: QTensor, ids) -> np.ndarray:
    """Rows of W for token ids (a list, or an integer array or tensor), float32 [T, cols] (bit-exact
    dequantization); a torch tensor of ids gives a torch tensor."""
    if _is_cuda(W):
        return _cuda().embedding(W, ids)
    r = _rows(ids)
    out = np.empty((len(r), W.shape[1]), np.float32)
    _check(cpu.dequantize_rows(cpu.FMT[W.qtype], _u8(W), r, out, 1), r, W.shape[0])
    return _like(ids, out)


# ---------------------------------------------------------------------------------------------
# sparse
# ---------------------------------------------------------------------------------------------


def gather_matvec(W: QTensor, rows, x: np.ndarray) -> np.ndarray:
    """x @ W[rows]^T: only the selected output rows ([cols] -> [len(rows)], [T, cols] -> [T, len(rows)])."""
    if _is_cuda(W):
        return _cuda().gather_matvec(W, rows, x)
    fmt, u8, _, _ = _info(W)
    r = _rows(rows)
    xn = _x2d(W, x)
    out = np.empty((xn.shape[0], r.shape[0]), np.float32)
    _check(cpu.gather_matvec(fmt, u8, r, xn, out, _chunks(r.shape[0] * u8.shape[1])), r, u8.shape[0])
    return _like(x, out if x.ndim == 2 else out[0])


def scatter_axpy(Wd_t: QTensor, rows, a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """y += sum_i a[i] * Wd_t[rows[i]] in place (Wd_t: the down projection, neuron-major [n_ff, d]); returns y."""
    if _is_cuda(Wd_t):
        return _cuda().scatter_axpy(Wd_t, rows, a, y)
    fmt, u8, _, _ = _info(Wd_t)
    r = _rows(rows)
    an = _np(a)
    if an.ndim != 1:
        an = an.reshape(-1)
    if an.shape[0] != r.shape[0]:
        raise ValueError(f"{an.shape[0]} coefficients for {r.shape[0]} rows")
    yn = _host(y)
    if yn is None or yn.dtype is not _F32 or not yn.flags.c_contiguous or yn.size != Wd_t.shape[1]:
        raise ValueError(f"y must be a contiguous float32 array of {Wd_t.shape[1]} values, got {tuple(y.shape)} {y.dtype}")
    _check(cpu.scatter_axpy(fmt, u8, r, an, yn if yn.ndim == 1 else yn.reshape(-1),
                            _parts(r.shape[0] * u8.shape[1])),
           r, u8.shape[0])
    return y


def _ffn_parts(Wg: QTensor, Wu: QTensor, Wd_t: QTensor, act: str) -> tuple[tuple, tuple, tuple]:
    """The kernels' (format, bytes, row count, ...) of gate, up and neuron-major down, checked to make one
    FFN ([n_ff, d] each, gate and up in one format) with a known activation."""
    if act not in cpu.ACT:
        raise ValueError(f"unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
    n_ff, d = Wg.shape
    if Wu.shape != (n_ff, d) or Wd_t.shape != (n_ff, d):
        raise ValueError(f"gate {Wg.shape}, up {Wu.shape} and transposed down {Wd_t.shape} must all be [n_ff, d]; "
                         "transpose the down projection with transpose_down()")
    if Wg.qtype != Wu.qtype:
        raise ValueError(f"gate ({Wg.qtype}) and up ({Wu.qtype}) must share one format")
    return _info(Wg), _info(Wu), _info(Wd_t)


def sparse_ffn(Wg: QTensor, Wu: QTensor, Wd_t: QTensor, rows, x: np.ndarray, act: str,
               return_act: bool = False):
    """One token's FFN over the active neurons `rows`: sum_i act(g_i) u_i Wd_t[i] with g_i = Wg[i] x,
    u_i = Wu[i] x, reading each neuron's gate, up and down rows once. x [d] or [1, d] -> y of x's shape;
    with `return_act`, also h [len(rows)] = act(g) * u per neuron (for predictors and statistics)."""
    if act not in cpu.ACT:
        raise ValueError(f"unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
    if _is_cuda(Wg):
        y, h = _cuda().sparse_ffn(Wg, Wu, Wd_t, rows, x, act)
        return (y, h) if return_act else y
    (fg, ug, _, _), (_, uu, _, _), (fd, ud, _, _) = _ffn_parts(Wg, Wu, Wd_t, act)
    n_ff = Wg.shape[0]
    r = _rows(rows)
    xn = _x2d(Wg, x)
    if xn.shape[0] != 1:
        raise ValueError(f"sparse_ffn takes one token, got {xn.shape[0]}")
    y, h = np.empty(x.shape, np.float32), np.empty(r.shape[0], np.float32)
    _check(cpu.sparse_ffn(fg, ug, uu, fd, ud, r, xn, cpu.ACT[act], y if y.ndim == 1 else y.reshape(-1), h,
                          _parts(r.shape[0] * (ug.shape[1] * 2 + ud.shape[1]))), r, n_ff)
    return (_like(x, y), _like(x, h)) if return_act else _like(x, y)


def prompt_ffn(Wg: QTensor, Wu: QTensor, Wd_t: QTensor, x: np.ndarray, act: str) -> np.ndarray:
    """A prompt's FFN terms over every neuron of a neuron-major part (an offloaded layer's records):
    act(x Wg^T) * (x Wu^T) @ Wd_t, x [T, d] -> [T, d] float32. The neurons are split among the kernels'
    threads; each dequantizes its share of rows a tile at a time and multiplies with BLAS on its own
    thread, between the kernels' parallel regions (`one_blas_thread`), and the shares' sums are added in
    order, so the result depends on the thread setting, not on the machine's load."""
    if act not in cpu.ACT:
        raise ValueError(f"unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
    xn = _x2d(Wg, x)
    n, d = Wg.shape[0], Wd_t.shape[1]
    if Wu.shape[0] != n or Wd_t.shape[0] != n or Wd_t.shape[1] != xn.shape[1]:
        raise ValueError(f"gate {Wg.shape}, up {Wu.shape} and down {Wd_t.shape} (neuron-major) do not make one FFN")
    xq = _q8(xn) if BLOCK_FORMATS.keys() & {Wg.qtype, Wu.qtype} else None  # once for every share, as in `linears`
    parts = _fixed_split(-(-n // PROMPT_FFN_ROWS))
    bounds = [(j * n // parts, (j + 1) * n // parts) for j in range(parts)]
    sums = np.zeros((parts, xn.shape[0], d), np.float32)

    def share(j: int) -> None:
        lo, hi = bounds[j]
        g, u = (_gemm(_span(W, lo, hi), xq if W.qtype in BLOCK_FORMATS else xn) for W in (Wg, Wu))
        a = _act(act, g) * u  # [T, hi-lo]
        for t0, t in _tiles(_span(Wd_t, lo, hi)):
            sums[j] += a[:, t0 : t0 + len(t)] @ t

    with one_blas_thread():
        _run_split(share, range(parts), parts)
    return sums.sum(0) if parts > 1 else sums[0]


def _span(W: QTensor, lo: int, hi: int) -> QTensor:
    """Rows lo..hi-1 of W, a view."""
    return QTensor(W.qtype, (hi - lo, W.shape[1]), W.data[lo:hi])


# Fewest neurons per thread in `prompt_ffn`: below it a share's BLAS products are too small to split.
PROMPT_FFN_ROWS = 64


def threshold_ffn(Wg: QTensor, Wu: QTensor, Wd_t: QTensor, x: np.ndarray, act: str,
                  threshold: float) -> tuple[np.ndarray, int]:
    """One token's FFN over the neurons whose |h_i| > `threshold`, h_i = act(Wg[i] x) * (Wu[i] x): every
    gate and up row, the down row (Wd_t, neuron-major) of only the kept neurons, chosen inside the call.
    x [d] or [1, d] -> (y of x's shape, how many neurons were kept)."""
    if act not in cpu.ACT:
        raise ValueError(f"unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
    if _is_cuda(Wg):
        return _cuda().threshold_ffn(Wg, Wu, Wd_t, x, act, threshold)
    fixed = _threshold_fixed(Wg, Wu, Wd_t, act)
    xn = _x2d(Wg, x)
    if xn.shape[0] != 1:
        raise ValueError(f"threshold_ffn takes one token, got {xn.shape[0]}")
    y = np.empty(Wg.shape[1], np.float32)
    kept = _fused_threshold(fixed, xn, np.float32(threshold), y)
    return _like(x, y.reshape(x.shape)), kept


def threshold_ffn_step(Wg: QTensor, Wu: QTensor, Wd_t: QTensor, act: str, threshold: float):
    """`threshold_ffn` bound to one layer's weights and threshold, checked once (see `attention_step`):
    step(x) -> (y, kept). A float32 [1, d] array x takes the fused kernel directly, anything else
    `threshold_ffn`."""

    def general(x):
        return threshold_ffn(Wg, Wu, Wd_t, x, act, threshold)

    if _is_cuda(Wg):
        return general
    _threshold_fixed(Wg, Wu, Wd_t, act, pack=False)  # checked now; the weights are packed at the first call
    fixed, t, shape = None, np.float32(threshold), (1, Wg.shape[1])

    def step(x):
        nonlocal fixed
        if type(x) is not np.ndarray or x.dtype is not _F32 or x.shape != shape or not x.flags.c_contiguous:
            return general(x)
        if fixed is None:
            fixed = _threshold_fixed(Wg, Wu, Wd_t, act)
        y = np.empty(shape, np.float32)
        return y, _fused_threshold(fixed, x, t, y[0])

    return step


def _threshold_fixed(Wg: QTensor, Wu: QTensor, Wd_t: QTensor, act: str, pack: bool = True) -> tuple:
    """The fused CPU kernel's arguments that are the layer's, checked (`pack`: gate and up packed where they
    can be; they are read in full)."""
    _, _, (fd, ud, nd, _) = _ffn_parts(Wg, Wu, Wd_t, act)
    (fg, ug, ng, _), (_, uu, nu, _) = _call_infos((Wg, Wu), pack)
    return fg, ug, uu, fd, ud, cpu.ACT[act], (ng + nu + nd // 2) // MIN_BYTES_PER_THREAD  # ~half the down rows read


def _fused_threshold(fixed: tuple, x: np.ndarray, threshold: np.float32, y: np.ndarray) -> int:
    fg, ug, uu, fd, ud, code, parts = fixed
    return cpu.threshold_ffn(fg, ug, uu, fd, ud, x, code, threshold, y, _fixed_split(parts))


def predict_rows(W1: QTensor, W2_t: QTensor, h: np.ndarray, threshold: float, on_device: bool = False) -> np.ndarray:
    """The FFN neurons a low-rank predictor picks for one token, in one call: the ids i (int64,
    ascending) with (W2 @ relu(W1 @ h))[i] > threshold, for W1 [r, d], h [d] or [1, d] and W2 [n_ff, r]
    given transposed, W2_t [r, n_ff] (only the rows of the hidden units the ReLU keeps are read).
    The result is what gather_matvec / scatter_axpy / sparse_ffn take as rows: a numpy array, or with GPU
    weights and `on_device`, a tensor left on their device (where the GPU part of a layer reads it)."""
    if W2_t.shape[0] != W1.shape[0]:
        raise ValueError(f"predictor matrices {W1.shape} and transposed {W2_t.shape} do not chain ([r, d], [r, n_ff])")
    if _is_cuda(W1):
        ids = _cuda().predict_rows(W1, W2_t, h, threshold)
        return ids if on_device else ids.cpu().numpy()
    xn = _x2d(W1, h)
    if xn.shape[0] != 1:
        raise ValueError(f"predict_rows takes one token, got {xn.shape[0]}")
    f1, u1, n1, _ = _info(W1)
    f2, u2, n2, _ = _info(W2_t)
    rows = np.empty(W2_t.shape[1], np.int64)
    n = cpu.predict_rows(f1, u1, f2, u2, xn, np.float32(threshold), rows, _chunks(n1), _parts(n2 // 2))  # ~half read
    return rows[:n]


def predicted_ffn(W1: QTensor, W2_t: QTensor, threshold: float, Wg: QTensor, Wu: QTensor, Wd_t: QTensor,
                  x: np.ndarray, act: str) -> tuple[np.ndarray, int]:
    """`sparse_ffn` over the rows `predict_rows(W1, W2_t, x, threshold)` picks, in one call (predictor
    mode's decode step: one crossing into the kernels per layer, not two). x [d] or [1, d] -> (y of x's
    shape, how many neurons were computed)."""
    if act not in cpu.ACT:
        raise ValueError(f"unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
    if _is_cuda(Wg) or _is_cuda(W1):
        rows = predict_rows(W1, W2_t, x, threshold)
        return sparse_ffn(Wg, Wu, Wd_t, rows, x, act), len(rows)
    n_ff, d = Wg.shape
    if W2_t.shape != (W1.shape[0], n_ff) or W1.shape[1] != d:
        raise ValueError(f"predictor {W1.shape} and transposed {W2_t.shape} do not fit one FFN with gate {Wg.shape} "
                         f"([r, d] and [r, n_ff])")
    (fg, ug, _, _), (_, uu, _, _), (fd, ud, _, _) = _ffn_parts(Wg, Wu, Wd_t, act)
    f1, u1, n1, _ = _info(W1)
    f2, u2, n2, _ = _info(W2_t)
    xn = _x2d(Wg, x)
    if xn.shape[0] != 1:
        raise ValueError(f"predicted_ffn takes one token, got {xn.shape[0]}")
    y = np.empty(d, np.float32)
    n = cpu.predicted_ffn(f1, u1, f2, u2, np.float32(threshold), fg, ug, uu, fd, ud, xn, cpu.ACT[act], y,
                          _chunks(n1), _parts(n2 // 2), max_threads(), ug.shape[1] * 2 + ud.shape[1],
                          MIN_BYTES_PER_THREAD)
    return _like(x, y.reshape(x.shape)), n


# ---------------------------------------------------------------------------------------------
# per-token glue of the decoder (no weights matrices, but per-token work all the same)
# ---------------------------------------------------------------------------------------------


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2, -1) + eps) * w for x [T, d] (one call instead of five array ops); for an x on a GPU
    (a layer moved there: `model.place_layers`), in torch there."""
    if _is_torch(x) and x.device.type != "cpu":
        return _cuda().rms_norm(x, w, eps)
    xn = _np(x)
    out = np.empty_like(xn)
    if xn.ndim == 2:
        cpu.rms_norm(xn, _np(w), eps, out)
    else:
        cpu.rms_norm(xn.reshape(-1, xn.shape[-1]), _np(w), eps, out.reshape(-1, xn.shape[-1]))
    return _like(x, out)


def attention_decode(q: np.ndarray, k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                     pos: int, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> np.ndarray:
    """Attention of one new token at position `pos`, fused: RoPE (cos/sin [hd/2]) on q and k,
    k and v written to this layer's cache [n_ctx, n_kv_heads, hd] at `pos`, softmax attention over
    positions 0..pos with grouped kv heads. q [1, H*hd], k/v [1, KV*hd] -> [1, H*hd]. The cache is
    float32 or float16 (k and v rounded to nearest as written; read back and summed in float32)."""
    kc, vc = _kv_cache(k_cache, v_cache, pos)
    KV, hd = kc.shape[1:]
    qn, kn, vn = _np(q).reshape(-1), _np(k).reshape(-1), _np(v).reshape(-1)
    if kn.size != KV * hd or vn.size != KV * hd or qn.size % (KV * hd):
        raise ValueError(f"q ({qn.size}), k ({kn.size}), v ({vn.size}) do not fit the cache's {KV} kv heads of {hd}")
    H = qn.size // hd
    out = np.empty((H, hd), np.float32)
    cpu.attention_decode(qn, kn, vn, kc, vc, pos, _np(cos).reshape(-1), _np(sin).reshape(-1), interleaved, out,
                         _attention_chunks(pos, H * hd))
    return _like(q, out.reshape(1, -1))


def attention_prompt(q: np.ndarray, k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                     pos: int, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> np.ndarray:
    """Attention of T new tokens at positions pos..pos+T-1 (a prompt's chunk), as `attention_decode` does
    it for one: RoPE (cos/sin [T, hd/2]) on q and k, k and v written to this layer's cache at those
    positions (rounded to a float16 cache's dtype), causal softmax attention over 0..pos+T-1 with grouped
    kv heads, in float32 array operations (matrix products by BLAS). The queries go in blocks whose scores
    stay in cache, each over only the positions it sees, the blocks shared by the kernels' threads (one
    scores array of T x S floats per head went through DRAM 6 times: 70% of a 2,000-token prefill).
    q [T, H*hd], k/v [T, KV*hd] -> [T, H*hd], of q's kind."""
    qn, kn, vn = _np(q), _np(k), _np(v)
    kc, vc = _kv_cache(k_cache, v_cache, pos, bits=False)  # a float16 cache written with numpy's rounding, as decode's
    T, (KV, hd), S = qn.shape[0], kc.shape[1:], pos + qn.shape[0]
    if kn.shape != (T, KV * hd) or vn.shape != (T, KV * hd) or qn.shape[1] % (KV * hd):
        raise ValueError(f"q {qn.shape}, k {kn.shape}, v {vn.shape} do not fit the cache's {KV} kv heads of {hd}")
    if S > kc.shape[0]:
        raise ValueError(f"positions up to {S - 1} are outside the cache (0..{kc.shape[0] - 1})")
    H = qn.shape[1] // hd
    G = H // KV
    cos, sin = _np(cos)[:, None, :], _np(sin)[:, None, :]  # [T, 1, hd/2]: one rotation for every head
    kc[pos:S] = _rope(kn.reshape(T, KV, hd), cos, sin, interleaved)
    vc[pos:S] = vn.reshape(T, KV, hd)
    qr = _rope(qn.reshape(T, H, hd), cos, sin, interleaved) * np.float32(1.0 / np.sqrt(hd))
    keys = np.ascontiguousarray(kc[:S].transpose(1, 0, 2), np.float32)  # [KV, S, hd]; a float16 cache widened
    vals = np.ascontiguousarray(vc[:S].transpose(1, 0, 2), np.float32)
    qg = np.ascontiguousarray(qr.reshape(T, KV, G, hd).transpose(1, 0, 2, 3))  # [KV, T, G, hd]: head h reads kv h // G
    out = np.empty((KV, T, G, hd), np.float32)
    B = max(16, PROMPT_SCORES // (H * S))  # queries a block: its scores stay in cache, not DRAM
    blocks = range(0, T, B)

    def attend(t0: int) -> None:  # queries t0..t1-1 over the positions they see, 0..pos+t1-1
        t1 = min(t0 + B, T)
        n, m = pos + t1, (t1 - t0) * G
        scores = (qg[:, t0:t1].reshape(KV, m, hd) @ keys[:, :n].transpose(0, 2, 1)).reshape(KV, t1 - t0, G, n)
        causal = np.arange(pos + t0, n) > pos + np.arange(t0, t1)[:, None]  # [t1-t0, t1-t0]: within the block
        scores[..., pos + t0:] += np.where(causal, np.float32(-np.inf), np.float32(0))[:, None]
        scores -= scores.max(-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(-1, keepdims=True)
        out[:, t0:t1] = (scores.reshape(KV, m, n) @ vals[:, :n]).reshape(KV, t1 - t0, G, hd)

    with one_blas_thread():  # the threads below share the blocks, each product on its own thread
        _run_split(attend, blocks, _fixed_split(len(blocks)))
    return _like(q, out.transpose(1, 0, 2, 3).reshape(T, H * hd))


def device_attention(q, k, v, k_cache, v_cache, pos: int, cos, sin, interleaved: bool):
    """`attention_decode` (one token) or `attention_prompt` (T tokens) in torch on the cache's device: the
    attention of a layer whose weights are `GPUTensor`s (`model.place_layers`), its cache a torch tensor there."""
    return _cuda().attention(q, k, v, k_cache, v_cache, pos, cos, sin, interleaved)


# Scores (floats) a block of a prompt's queries holds at once in `attention_prompt` (4 MB; 2^18-2^21 tried).
PROMPT_SCORES = 1 << 20
_pool, _pool_threads = None, 0


def _run_split(fn, items, n: int) -> None:
    """fn(item) for every item, on n threads: this one and n - 1 of a pool kept for it, each taking every
    n-th item (a prompt's later blocks of queries see more positions, so a thread's share stays even).
    numpy releases the GIL in its products and ufuncs, as the nogil kernels do, so the threads compute at once."""
    global _pool, _pool_threads
    items = list(items)
    if n < 2:
        for it in items:
            fn(it)
        return
    if _pool_threads < n - 1:  # none yet, or too few for a larger thread count
        from concurrent.futures import ThreadPoolExecutor

        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_threads = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="hetinfer-split"), n - 1

    def share(j: int) -> None:
        for it in items[j::n]:
            fn(it)

    futures = [_pool.submit(share, j) for j in range(1, n)]
    share(0)
    for f in futures:
        f.result()


_blas = None


def one_blas_thread():
    """A context in which numpy's BLAS computes on the calling thread, for products that come between the
    kernels' parallel regions (a prompt's attention; an offloaded FFN's prompt terms beside packed attention):
    BLAS's threads and numba's each spin a while after their work, and alternating on 2 cores they made
    SmolLM2's 64-token prefill 5x slower (BENCHMARKS.md)."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> np.ndarray:
    """x [..., hd] rotated in pairs (2j, 2j+1) if interleaved (GGUF llama layout), else (j, j + hd/2) (HF)."""
    half = x.shape[-1] // 2
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :half], x[..., half:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return np.stack((ra, rb), -1).reshape(x.shape) if interleaved else np.concatenate((ra, rb), -1)


def _host(a) -> np.ndarray | None:
    """a numpy array, or the numpy view of a torch CPU tensor; None for anything else (a GPU or bfloat16 tensor)."""
    if type(a) is np.ndarray:
        return a
    if _is_torch(a) and a.device.type == "cpu":
        try:
            return a.numpy()
        except (TypeError, RuntimeError):  # no numpy dtype (bfloat16), or needs grad
            return None
    return None


def _kv_cache(k_cache: np.ndarray, v_cache: np.ndarray, pos: int, bits: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A layer's cache as numpy arrays, once checked to hold position `pos`; with `bits`, a float16 cache as
    its uint16 bits, what the numba kernels write (they convert: numba has no float16)."""
    kc, vc = _host(k_cache), _host(v_cache)
    if not (kc is not None and vc is not None and kc.flags.c_contiguous and vc.flags.c_contiguous
            and kc.dtype == vc.dtype and kc.dtype in (np.float32, np.float16)):
        raise ValueError("the KV cache must be contiguous float32 or float16 arrays [n_ctx, n_kv_heads, head_dim], "
                         f"both of one dtype (got {k_cache.dtype} and {v_cache.dtype})")
    if bits and kc.dtype == np.float16:
        kc, vc = kc.view(np.uint16), vc.view(np.uint16)
    if not 0 <= pos < kc.shape[0]:
        raise ValueError(f"position {pos} is outside the cache (0..{kc.shape[0] - 1})")
    return kc, vc


def _attention_chunks(pos: int, q_size: int) -> int:
    """Spans of positions attended in parallel: one per thread once the cache reads outweigh a wake-up."""
    return _fixed_split(pos + 1 if (pos + 1) * q_size >= 1 << 16 else 1)


def attention_block(x: np.ndarray, attn_norm: np.ndarray, Wq: QTensor, Wk: QTensor, Wv: QTensor, Wo: QTensor,
                    biases: tuple | None, k_cache: np.ndarray, v_cache: np.ndarray, pos: int, cos: np.ndarray,
                    sin: np.ndarray, interleaved: bool, eps: float, ffn_norm: np.ndarray) -> np.ndarray:
    """The attention half of a decoder layer for one token, in one kernel call: x [1, d] += Wo @
    attention_decode(q, k, v) with q/k/v = Wq/Wk/Wv @ rms_norm(x, attn_norm) (+ biases (bq, bk, bv)),
    x updated in place; returns rms_norm(x, ffn_norm), the FFN's input. The same arithmetic as those
    calls made one by one (which is what runs for q/k/v of different formats, and for GPU weights, whose
    attention is `device_attention` on their cache's device), equal
    to float32 rounding: the fastmath sums of the norms and the attention may be vectorized in
    another order once compiled together. `attention_step` binds a layer's weights once."""
    xn = _host(x)
    fixed = None
    if xn is not None and xn.dtype is _F32 and xn.flags.c_contiguous:
        fixed = _attention_fixed(attn_norm, Wq, Wk, Wv, Wo, biases, ffn_norm)
    if fixed is None:
        h = rms_norm(x, attn_norm, eps)
        q, k, v = linears((Wq, Wk, Wv), h)
        if biases is not None:
            q, k, v = q + biases[0], k + biases[1], v + biases[2]
        attend = device_attention if _is_cuda(Wq) else attention_decode
        x += linear(Wo, attend(q, k, v, k_cache, v_cache, pos, cos, sin, interleaved))
        return rms_norm(x, ffn_norm, eps)
    if xn.shape != (1, Wq.shape[1]):
        raise ValueError(f"x {tuple(x.shape)} must be [1, {Wq.shape[1]}]")
    kc, vc = _kv_cache(k_cache, v_cache, pos)
    _check_kv(kc, Wk)
    h = np.empty_like(xn)
    _fused_attention(fixed, xn, kc, vc, pos, _np(cos).reshape(-1), _np(sin).reshape(-1), interleaved, eps, h,
                     get_threads())
    return _like(x, h)


def attention_step(attn_norm: np.ndarray, Wq: QTensor, Wk: QTensor, Wv: QTensor, Wo: QTensor, biases: tuple | None,
                   ffn_norm: np.ndarray, eps: float, interleaved: bool):
    """`attention_block` bound to one layer's weights, checked and converted once, as gpt-fast binds a model
    after loading: step(x, k_cache, v_cache, pos, cos, sin) -> h, x updated in place. A decode step runs it on
    every layer, where `attention_block`'s checks cost ~4 us a call (BENCHMARKS.md). Per call only what
    changes is checked: x (a float32 [1, d] array, else `attention_block` runs), the cache (as there) and
    pos. cos and sin must be float32 [head_dim / 2] arrays (`Transformer`'s rope)."""

    def general(x, k_cache, v_cache, pos, cos, sin):
        return attention_block(x, attn_norm, Wq, Wk, Wv, Wo, biases, k_cache, v_cache, pos, cos, sin, interleaved, eps,
                               ffn_norm)

    if _attention_fixed(attn_norm, Wq, Wk, Wv, Wo, biases, ffn_norm, pack=False) is None:
        return general
    fixed, shape = None, (1, Wq.shape[1])  # the weights are packed at the first call: binding reads none

    def step(x, k_cache, v_cache, pos, cos, sin):
        nonlocal fixed
        if type(x) is not np.ndarray or x.dtype is not _F32 or x.shape != shape or not x.flags.c_contiguous:
            return general(x, k_cache, v_cache, pos, cos, sin)
        if fixed is None:
            fixed = _attention_fixed(attn_norm, Wq, Wk, Wv, Wo, biases, ffn_norm)
        kc, vc = _kv_cache(k_cache, v_cache, pos)
        _check_kv(kc, Wk)
        h = np.empty_like(x)
        _fused_attention(fixed, x, kc, vc, pos, cos, sin, interleaved, eps, h, get_threads())
        return h

    return step


def _attention_fixed(attn_norm, Wq: QTensor, Wk: QTensor, Wv: QTensor, Wo: QTensor, biases: tuple | None,
                     ffn_norm, pack: bool = True) -> tuple | None:
    """The fused CPU kernel's arguments that are the layer's, checked (`pack`: weights packed where they can
    be): None where it does not apply (GPU weights; q, k and v in different formats or layouts)."""
    if _is_cuda(Wq) or _is_cuda(Wo):
        return None
    (fq, uq, nq, _), (fk, uk, nk, _), (fv, uv, nv, _) = _call_infos((Wq, Wk, Wv), pack)
    if not (fq == fk == fv and uq.flags.c_contiguous == uk.flags.c_contiguous == uv.flags.c_contiguous):
        return None
    if Wo.shape[0] != Wq.shape[1] or Wv.shape != Wk.shape or Wq.shape[0] % Wk.shape[0] or Wo.shape[1] != Wq.shape[0]:
        raise ValueError(f"q {Wq.shape}, k {Wk.shape}, v {Wv.shape} and o {Wo.shape} do not make an attention block")
    bq, bk, bv = (_NO_BIAS,) * 3 if biases is None else (_np(b) for b in biases)
    ((fo, uo, no, _),) = _call_infos((Wo,), pack)
    return (_np(attn_norm), _np(ffn_norm), fq, uq, uk, uv, fo, uo, bq, bk, bv,
            (nq + nk + nv) // MIN_BYTES_PER_THREAD, no // MIN_BYTES_PER_THREAD, Wq.shape[0])


def _check_kv(kc: np.ndarray, Wk: QTensor) -> None:
    if kc.shape[1] * kc.shape[2] != Wk.shape[0]:
        raise ValueError(f"the cache's {kc.shape[1]} kv heads of {kc.shape[2]} do not fit k's {Wk.shape[0]} rows")


def _fused_attention(fixed: tuple, x, kc, vc, pos: int, cos, sin, interleaved: bool, eps: float, h,
                     threads: int) -> None:
    an, fn, fq, uq, uk, uv, fo, uo, bq, bk, bv, qkv_parts, o_parts, q_size = fixed
    cpu.attention_block(x, an, fn, eps, fq, uq, uk, uv, fo, uo, bq, bk, bv, kc, vc, pos, cos, sin, interleaved, h,
                        _split(qkv_parts, threads), _attention_chunks(pos, q_size), _split(o_parts, threads))


_NO_BIAS = np.empty(0, np.float32)


def dense_ffn(Wg: QTensor, Wu: QTensor, Wd: QTensor, h: np.ndarray, act: str) -> np.ndarray:
    """Wd @ (act(Wg @ h) * (Wu @ h)): the whole dense FFN in one kernel call (`gate_up`, then `linear`).
    `dense_ffn_step` binds a layer's weights once."""
    fixed = _dense_ffn_fixed(Wg, Wu, Wd, act)
    if fixed is None and (_is_cuda(Wg) or _is_cuda(Wd)):
        return linear(Wd, gate_up(Wg, Wu, h, act))
    xn = _x2d(Wg, h)
    if fixed is None or (xn.shape[0] > GEMV_MAX_T and not (fixed[0] in _PACKED and fixed[3] in _PACKED)):
        return _like(h, linear(Wd, gate_up(Wg, Wu, xn, act)))
    y = np.empty((xn.shape[0], Wd.shape[0]), np.float32)
    _fused_dense_ffn(fixed, xn, y, get_threads())
    return _like(h, y)


def dense_ffn_step(Wg: QTensor, Wu: QTensor, Wd: QTensor, act: str):
    """`dense_ffn` bound to one layer's weights, checked once (see `attention_step`): step(h) -> y. Only h
    is checked per call: a float32 [1, d] array takes the fused kernel directly, anything else `dense_ffn`."""

    def general(h):
        return dense_ffn(Wg, Wu, Wd, h, act)

    if _dense_ffn_fixed(Wg, Wu, Wd, act, pack=False) is None:
        return general
    fixed, shape, out = None, (1, Wg.shape[1]), (1, Wd.shape[0])  # packed at the first call, as attention_step

    def step(h):
        nonlocal fixed
        if type(h) is not np.ndarray or h.dtype is not _F32 or h.shape != shape or not h.flags.c_contiguous:
            return general(h)
        if fixed is None:
            fixed = _dense_ffn_fixed(Wg, Wu, Wd, act)
        y = np.empty(out, np.float32)
        _fused_dense_ffn(fixed, h, y, get_threads())
        return y

    return step


def _dense_ffn_fixed(Wg: QTensor, Wu: QTensor, Wd: QTensor, act: str, pack: bool = True) -> tuple | None:
    """The fused CPU kernel's arguments that are the layer's, checked (`pack`: weights packed where they can
    be): None where it does not apply (GPU weights, gate and up in different formats)."""
    if act not in cpu.ACT:
        raise ValueError(f"unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
    if Wd.shape[1] != Wg.shape[0] or Wu.shape != Wg.shape:
        raise ValueError(f"gate {Wg.shape}, up {Wu.shape} and down {Wd.shape} do not form an FFN ([n_ff, d], [n_ff, d], [d, n_ff])")
    if _is_cuda(Wg) or _is_cuda(Wd):
        return None
    (fg, ug, ng, _), (fu, uu, nu, _) = _call_infos((Wg, Wu), pack)
    ((fd, ud, nd, _),) = _call_infos((Wd,), pack)
    if fg != fu:
        return None
    return fg, ug, uu, fd, ud, cpu.ACT[act], (ng + nu) // MIN_BYTES_PER_THREAD, nd // MIN_BYTES_PER_THREAD


def _fused_dense_ffn(fixed: tuple, x: np.ndarray, y: np.ndarray, threads: int) -> None:
    fg, ug, uu, fd, ud, code, gate_up_parts, down_parts = fixed
    cpu.dense_ffn(fg, ug, uu, fd, ud, x, code, y, _split(gate_up_parts, threads), _split(down_parts, threads))


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------


def transpose_down(W_down: QTensor, qtype: str | None = None) -> QTensor:
    """The down projection [d, n_ff] as neuron-major [n_ff, d], converted once at load.

    Float formats transpose exactly (default: keep the format). Block formats store blocks
    along n_ff, so the transposed copy is requantized: default q8_0, each weight within 0.45%
    of its block's largest magnitude (relative RMS error 0.55% on SmolLM2's Q4_1 down
    projections, against 8% for q4_1 and 0.02% for f16 at twice the bytes; see the tests)."""
    qtype = qtype or (W_down.qtype if W_down.qtype in FLOAT_FORMATS else "q8_0")
    if qtype == W_down.qtype and qtype in FLOAT_FORMATS:
        return QTensor(qtype, (W_down.shape[1], W_down.shape[0]), np.ascontiguousarray(W_down.data.T))
    return quantize(np.ascontiguousarray(W_down.dequantize().T), qtype)


HOST = "cpu"  # where numpy arrays live; a torch device (even torch's "cpu", the GPU tier's stand-in) is another


def to_device(x, device):
    """x moved to `device`: HOST gives a numpy array, a torch device a tensor there (zero-copy between
    numpy and a torch CPU tensor)."""
    if device == HOST:
        return x if type(x) is np.ndarray else x.detach().cpu().numpy()
    torch = sys.modules["torch"]  # a device other than the host: its weights loaded torch
    return (torch.from_numpy(x) if type(x) is np.ndarray else x).to(device)


def to_cuda(W: QTensor, device="cuda") -> GPUTensor:
    """The GPU form of a weight that every function here accepts: its stored bytes copied once to
    `device` (a torch device or its name), decoded per call only for the rows used (see `cuda.py`)."""
    return _cuda().to_cuda(W, device)


def convert(W: QTensor, weights: str) -> QTensor:
    """The engine's weight flag: "native" keeps the stored format, "f16"/"f32" convert once at load."""
    if weights == "native" or W.qtype == weights:
        return W
    if weights not in ("f16", "f32"):
        raise ValueError(f"weights must be native, f16 or f32, got {weights!r}")
    return quantize(W.dequantize(), weights)
