"""CPU kernels: numba, reading weights in their stored format (f32/f16/bf16/q8_0/q4_0/q4_1).

Every kernel walks a row 32 weights at a time with the vector steps of `simd.py` (dot a block
with x, add a block into y). The numba code around them is plain: rows are split into `nchunks`
equal chunks run under `prange` (every row costs the same, so equal counts are balanced work,
also for sparse row sets), or run directly when nchunks == 1; sums that several chunks add into
(down projections) use one partial vector per chunk, added up at the end. Kernels take the row
format as an integer code (`FMT`), weights as their raw uint8 bytes [rows, row_bytes] (each row
contiguous; rows `strides[0]` apart, so a view into records that bundle several matrices' rows is
read in place), and float32 arrays for activations. The dense kernels (matvec, gate_up, the
threshold FFN's gate and up) also take Q4 rows packed in groups of 8 (`pack_rows`, codes
Q4_0X8 and Q4_1X8, weights [groups, 8 * row_bytes]), split into chunks by group. The
Python-facing wrappers live in `hetinfer/kernels/__init__.py`.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from hetinfer.kernels.simd import (BF16, F16, F32, GROUP_ROWS, PACKED_AHEAD, Q4_0, Q4_0X8, Q4_1, Q4_1X8, Q8_0,
                                   axpy64, axpy_bf16, axpy_f16, axpy_f32, axpy_q4_0, axpy_q4_1, axpy_q8_0,
                                   axpy_rows_bf16, axpy_rows_f16, axpy_rows_f32, axpy_rows_q4_0, axpy_rows_q4_1,
                                   axpy_rows_q8_0, dot16, dot_bf16, dot_f16, dot_f32, elem_bf16, elem_f16, elem_f32,
                                   expand_block, f32_from_bits, from_kv, prefetch_row, quantize_block, to_kv,
                                   xdot2_q4_0, xdot2_q4_1, xdot2_q8_0, xdot8_q4_0, xdot8_q4_1, xdot_q4_0, xdot_q4_1,
                                   xdot_q8_0)

FMT = {"f32": F32, "f16": F16, "bf16": BF16, "q8_0": Q8_0, "q4_0": Q4_0, "q4_1": Q4_1}
ACT = {"silu": 0, "relu": 1, "gelu": 2}

# ---------------------------------------------------------------------------------------------
# Row primitives (numba level): one row of any format
# ---------------------------------------------------------------------------------------------


@njit(error_model="numpy", cache=True, nogil=True)
def quantize_x(x, xq, xs):
    """x [T, cols] (C-contiguous, cols % 32 == 0) as the 8-bit blocks the block-format dots read
    (llama.cpp's q8_0 activations, with q8_1's block sum).

    Per block of 32, float32: d = amax / 127, q = rint(x * (1 / d)) (round to nearest even, |q| <= 127),
    so x = d * q within d / 2. xq [T, nb, 32] int8 gets q; xs [T, nb, 2] float32 gets (d, d * sum(q)).
    Blocks with inf or nan get d = nan (their results are nan); blocks with amax < 127 * 2^-110
    (1e-31) count as zero. `reference.quantize_x` is the same, bit for bit.
    """
    nb = x.shape[1] // 32
    for t in range(x.shape[0]):
        for k in range(nb):
            quantize_block(x, t * x.shape[1] + 32 * k, xq, xs, t * nb + k)


@njit(inline="always")
def _q8x(fmt):
    """Whether rows of `fmt` dot with `quantize_x`'s 8-bit x."""
    return fmt == Q8_0 or fmt == Q4_0 or fmt == Q4_1 or _packed(fmt)


@njit(inline="always")
def _packed(fmt):
    """Whether `fmt` is a packed format: weights [groups, bytes] of 8 interleaved rows (`pack_rows`)."""
    return fmt == Q4_0X8 or fmt == Q4_1X8


@njit(inline="always")
def _n_rows(fmt, w):
    """The matrix rows held by weights w of format fmt."""
    return w.shape[0] * GROUP_ROWS if _packed(fmt) else w.shape[0]


@njit(inline="always")
def _expand(fmt, xq):
    """x's blocks in the lanes the packed dots read (`expand_block`); empty for the other formats."""
    xe = np.empty((xq.shape[0], xq.shape[1] if _packed(fmt) else 0, 4 * 64), np.int8)
    if _packed(fmt):
        for t in range(xq.shape[0]):
            for k in range(xq.shape[1]):
                expand_block(xq, xe, t * xq.shape[1] + k)
    return xe


@njit(inline="always")
def _xdot8(fmt, w, g, xe, xs, t, out, ooff, first):
    """out.flat[ooff .. ooff + 8] = the dots of group g's 8 rows with token t of x; the `first` token to
    read the group hints the bytes ahead into the cache (PACKED_AHEAD), the others find them there."""
    nb, ahead = xe.shape[1], PACKED_AHEAD if first else 0
    if fmt == Q4_1X8:
        xdot8_q4_1(w, g * w.strides[0], xe, xs, t * nb, nb, out, ooff, ahead)
    else:
        xdot8_q4_0(w, g * w.strides[0], xe, xs, t * nb, nb, out, ooff, ahead)


@njit(inline="always")
def _prep(fmt, x):
    """(xq, xs) for `_rowdot`: `quantize_x`'s output for the block formats, empty otherwise."""
    nb = x.shape[1] // 32 if _q8x(fmt) else 0
    xq = np.empty((x.shape[0], nb, 32), np.int8)
    xs = np.empty((x.shape[0], nb, 2), np.float32)
    if nb:
        quantize_x(x, xq, xs)
    return xq, xs


@njit(inline="always")
def _elem(fmt, w, off, j):
    """Weight j of the float-format row at byte `off` of w (a row's tail past its last block of 32)."""
    if fmt == F32:
        return elem_f32(w, off + 4 * j)
    if fmt == F16:
        return elem_f16(w, off + 2 * j)
    return elem_bf16(w, off + 2 * j)


@njit(inline="always")
def _rowdot(fmt, w, r, x, xq, xs, t, r_next):
    """w[r] . x[t] for a row of any format (xq, xs from `_prep`), hinting row `r_next` into the cache."""
    cols = x.shape[-1]
    nb = cols // 32
    off, pf = r * w.strides[0], r_next * w.strides[0]
    if fmt == Q4_1:
        return xdot_q4_1(w, off, xq, xs, t * nb, nb, pf)
    if fmt == Q4_0:
        return xdot_q4_0(w, off, xq, xs, t * nb, nb, pf)
    if fmt == Q8_0:
        return xdot_q8_0(w, off, xq, xs, t * nb, nb, pf)
    xoff = t * cols
    if fmt == F32:
        s = dot_f32(w, off, x, xoff, nb, pf)
    elif fmt == F16:
        s = dot_f16(w, off, x, xoff, nb, pf)
    else:
        s = dot_bf16(w, off, x, xoff, nb, pf)
    if cols % 32:
        xf = x.reshape(-1)
        for j in range(nb * 32, cols):
            s += _elem(fmt, w, off, j) * xf[xoff + j]
    return s


@njit(inline="always")
def _rowdot2(fmt, wa, wb, r, x, xq, xs, t, r_next):
    """(wa[r] . x[t], wb[r] . x[t]), the same sums as two `_rowdot` calls: a neuron's gate and up rows, whose
    block formats read x's blocks once for both."""
    nb = x.shape[-1] // 32
    oa, ob, pa, pb = r * wa.strides[0], r * wb.strides[0], r_next * wa.strides[0], r_next * wb.strides[0]
    if fmt == Q4_1:
        return xdot2_q4_1(wa, oa, wb, ob, xq, xs, t * nb, nb, pa, pb)
    if fmt == Q4_0:
        return xdot2_q4_0(wa, oa, wb, ob, xq, xs, t * nb, nb, pa, pb)
    if fmt == Q8_0:
        return xdot2_q8_0(wa, oa, wb, ob, xq, xs, t * nb, nb, pa, pb)
    return _rowdot(fmt, wa, r, x, xq, xs, t, r_next), _rowdot(fmt, wb, r, x, xq, xs, t, r_next)


@njit(inline="always")
def _rowaxpy(fmt, w, r, a, y, r_next):
    """y += a * w[r] for a row of any format (y: float32 [cols]), hinting row `r_next` into the cache."""
    cols = y.shape[-1]
    nb = cols // 32
    off, pf = r * w.strides[0], r_next * w.strides[0]
    if fmt == Q8_0:
        axpy_q8_0(w, off, a, y, nb, pf)
    elif fmt == Q4_1:
        axpy_q4_1(w, off, a, y, nb, pf)
    elif fmt == Q4_0:
        axpy_q4_0(w, off, a, y, nb, pf)
    elif fmt == F32:
        axpy_f32(w, off, a, y, nb, pf)
    elif fmt == F16:
        axpy_f16(w, off, a, y, nb, pf)
    else:
        axpy_bf16(w, off, a, y, nb, pf)
    if cols % 32:
        for j in range(nb * 32, cols):
            y[j] += a * _elem(fmt, w, off, j)


@njit(inline="always")
def _rowsaxpy(fmt, w, ids, coef, m, y):
    """y += coef[k] * w[ids[k]] for k < m, in that order (the same sums as m `_rowaxpy` calls, bit for
    bit), each block of y loaded and stored once for all m rows."""
    cols = y.shape[-1]
    nb, st = cols // 32, w.strides[0]
    if fmt == Q8_0:
        axpy_rows_q8_0(w, st, ids, coef, m, y, nb)
    elif fmt == Q4_1:
        axpy_rows_q4_1(w, st, ids, coef, m, y, nb)
    elif fmt == Q4_0:
        axpy_rows_q4_0(w, st, ids, coef, m, y, nb)
    elif fmt == F32:
        axpy_rows_f32(w, st, ids, coef, m, y, nb)
    elif fmt == F16:
        axpy_rows_f16(w, st, ids, coef, m, y, nb)
    else:
        axpy_rows_bf16(w, st, ids, coef, m, y, nb)
    if cols % 32:
        for k in range(m):
            for j in range(nb * 32, cols):
                y[j] += coef[k] * _elem(fmt, w, ids[k] * st, j)


# While a row is read, the row about this many bytes ahead is hinted into the cache (`_prefetch_step`):
# the hardware prefetcher stops at every 4 KiB page and cannot guess a sparse op's next row at all.
PREFETCH_BYTES = 2048


@njit(inline="always")
def _ahead(w):
    """How many rows ahead of the current one to prefetch."""
    return max(1, PREFETCH_BYTES // w.shape[1])


@njit(inline="always")
def _act(act, g):
    if act == 0:
        return g / (np.float32(1.0) + math.exp(-g))
    if act == 1:
        return max(g, np.float32(0.0))
    # gelu, tanh approximation (what `hetinfer.model` uses)
    return np.float32(0.5) * g * (np.float32(1.0) + math.tanh(np.float32(0.7978845608028654) * (g + np.float32(0.044715) * g * g * g)))


@njit(inline="always")
def _chunk(c, nchunks, n):
    return c * n // nchunks, (c + 1) * n // nchunks


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@njit(inline="always")
def check_rows(rows, n):
    """Index of the first id outside [0, n), or -1."""
    for k in range(rows.shape[0]):
        if rows[k] < 0 or rows[k] >= n:
            return k
    return -1


# Only prange loops run in parallel: numba would otherwise also turn array expressions
# (y[:] = 0, np.zeros, y += part) into parallel regions of their own; outside prange, the
# kernels below also write such updates as explicit loops, which numba never parallelizes.
_PRANGE_ONLY = dict(prange=True, numpy=False, setitem=False, reduction=False, comprehension=False,
                    stencil=False, fusion=False, inplace_binop=False)

# Each kernel is a loop body over a range of rows (`_*_rows`, inlined) and an entry point that
# runs it directly when nchunks == 1 (no parallel region: no thread to wake, no barrier, which
# matters on a loaded machine) or over `nchunks` equal chunks under prange.


@njit(inline="always")
def _matvec_rows(fmt, ws, x, xq, xs, outs, lo, hi):
    base = 0
    for m in range(len(ws)):
        w, out = ws[m], outs[m]
        n = w.shape[0]
        end = min(hi - base, n)
        pf = _ahead(w)
        for r in range(max(lo - base, 0), end):
            nxt = r + pf if r + pf < end else r
            for t in range(x.shape[0]):
                out[t, r] = _rowdot(fmt, w, r, x, xq, xs, t, nxt if t == 0 else r)
        base += n


# A prompt's tokens are taken this many at a time over each chunk of packed groups: their expanded x stays in
# L2 while the groups' weights stream (all tokens per group spilled L2 past ~200 tokens of a 1536-wide x).
TOKEN_TILE = 16


@njit(inline="always")
def _matvec_groups(fmt, ws, xe, xs, outs, lo, hi):
    """`_matvec_rows` for packed weights, lo and hi counting groups of 8 rows."""
    T = xe.shape[0]
    for t0 in range(0, T, TOKEN_TILE):
        base = 0
        for m in range(len(ws)):
            w, out = ws[m], outs[m]
            end = min(hi - base, w.shape[0])
            for g in range(max(lo - base, 0), end):
                for t in range(t0, min(t0 + TOKEN_TILE, T)):
                    _xdot8(fmt, w, g, xe, xs, t, out, t * out.shape[1] + GROUP_ROWS * g, t == t0)
            base += w.shape[0]


@njit(inline="always")
def _matvec_any(fmt, ws, x, xq, xs, xe, outs, lo, hi):
    if _packed(fmt):
        _matvec_groups(fmt, ws, xe, xs, outs, lo, hi)
    else:
        _matvec_rows(fmt, ws, x, xq, xs, outs, lo, hi)


@njit(parallel=_PRANGE_ONLY, error_model="numpy", cache=True, nogil=True)
def matvec(fmt, ws, x, outs, nchunks):
    """outs[m][t] = ws[m] @ x[t] for every matrix m in the tuple `ws` (same format and cols; packed
    weights split into chunks by group).

    x: [T, cols]; outs[m]: [T, rows_m]. One call for q/k/v shares the thread wake-up.
    """
    total = 0
    for m in range(len(ws)):
        total += ws[m].shape[0]
    xq, xs = _prep(fmt, x)
    xe = _expand(fmt, xq)
    if nchunks == 1:
        _matvec_any(fmt, ws, x, xq, xs, xe, outs, 0, total)
        return
    for c in prange(nchunks):
        lo, hi = _chunk(c, nchunks, total)
        _matvec_any(fmt, ws, x, xq, xs, xe, outs, lo, hi)


@njit(inline="always")
def _gather_rows(fmt, w, rows, x, xq, xs, out, lo, hi):
    pf = _ahead(w)
    for k in range(lo, hi):
        r = rows[k]
        nxt = rows[k + pf] if k + pf < hi else r
        for t in range(x.shape[0]):
            out[t, k] = _rowdot(fmt, w, r, x, xq, xs, t, nxt if t == 0 else r)


@njit(parallel=_PRANGE_ONLY, error_model="numpy", cache=True, nogil=True)
def gather_matvec(fmt, w, rows, x, out, nchunks):
    """out[t, k] = w[rows[k]] @ x[t]; returns -1, or the position of an id outside w (nothing computed)."""
    n = rows.shape[0]
    bad = check_rows(rows, w.shape[0])
    if bad >= 0:
        return bad
    xq, xs = _prep(fmt, x)
    if nchunks == 1:
        _gather_rows(fmt, w, rows, x, xq, xs, out, 0, n)
        return -1
    for c in prange(nchunks):
        lo, hi = _chunk(c, nchunks, n)
        _gather_rows(fmt, w, rows, x, xq, xs, out, lo, hi)
    return -1


@njit(inline="always")
def _scatter_rows(fmt, w, rows, a, y, lo, hi):
    pf = _ahead(w)
    for k in range(lo, hi):
        _rowaxpy(fmt, w, rows[k], a[k], y, rows[k + pf] if k + pf < hi else rows[k])


@njit(parallel=_PRANGE_ONLY, error_model="numpy", cache=True, nogil=True)
def scatter_axpy(fmt, w, rows, a, y, nchunks):
    """y += sum_k a[k] * w[rows[k]]   (y: [cols]); chunks add into their own partial vector.
    Returns -1, or the position of an id outside w (y untouched)."""
    n = rows.shape[0]
    bad = check_rows(rows, w.shape[0])
    if bad >= 0:
        return bad
    if nchunks == 1:
        _scatter_rows(fmt, w, rows, a, y, 0, n)
        return -1
    part = np.empty((nchunks, y.shape[0]), np.float32)
    for c in prange(nchunks):
        lo, hi = _chunk(c, nchunks, n)
        acc = np.zeros(y.shape[0], np.float32)  # see sparse_ffn on why each thread allocates its own
        _scatter_rows(fmt, w, rows, a, acc, lo, hi)
        part[c] = acc
    for c in range(nchunks):
        for j in range(y.shape[0]):
            y[j] += part[c, j]
    return -1


@njit(inline="always")
def _gate_up_rows(fmt, wg, wu, x, xq, xs, act, h, lo, hi):
    pf = _ahead(wg)
    for i in range(lo, hi):
        nxt = i + pf if i + pf < hi else i
        for t in range(x.shape[0]):
            g, u = _rowdot2(fmt, wg, wu, i, x, xq, xs, t, nxt if t == 0 else i)
            h[t, i] = _act(act, g) * u


@njit(inline="always")
def _gate_up_groups(fmt, wg, wu, xe, xs, act, h, lo, hi):
    """`_gate_up_rows` for packed weights, lo and hi counting groups of 8 neurons."""
    u = np.empty(GROUP_ROWS, np.float32)
    T = h.shape[0]
    for t0 in range(0, T, TOKEN_TILE):
        for g in range(lo, hi):
            for t in range(t0, min(t0 + TOKEN_TILE, T)):
                _gate_up_group(fmt, wg, wu, xe, xs, act, h, u, g, t, t == t0)


@njit(inline="always")
def _gate_up_group(fmt, wg, wu, xe, xs, act, h, u, g, t, first):
    """h[t] of group g's 8 neurons (u: room for their up products; first: see `_xdot8`)."""
    _xdot8(fmt, wg, g, xe, xs, t, h, t * h.shape[1] + GROUP_ROWS * g, first)
    _xdot8(fmt, wu, g, xe, xs, t, u, 0, first)
    for r in range(GROUP_ROWS):
        h[t, GROUP_ROWS * g + r] = _act(act, h[t, GROUP_ROWS * g + r]) * u[r]


@njit(inline="always")
def _gate_up_any(fmt, wg, wu, x, xq, xs, xe, act, h, lo, hi):
    if _packed(fmt):
        _gate_up_groups(fmt, wg, wu, xe, xs, act, h, lo, hi)
    else:
        _gate_up_rows(fmt, wg, wu, x, xq, xs, act, h, lo, hi)


@njit(parallel=_PRANGE_ONLY, error_model="numpy", cache=True, nogil=True)
def gate_up(fmt, wg, wu, x, act, h, nchunks):
    """h[t, i] = act(wg[i] @ x[t]) * (wu[i] @ x[t]): the dense FFN's first half in one pass."""
    n = wg.shape[0]  # rows, or groups of 8 packed rows
    xq, xs = _prep(fmt, x)
    xe = _expand(fmt, xq)
    if nchunks == 1:
        _gate_up_any(fmt, wg, wu, x, xq, xs, xe, act, h, 0, n)
        return
    for c in prange(nchunks):
        lo, hi = _chunk(c, nchunks, n)
        _gate_up_any(fmt, wg, wu, x, xq, xs, xe, act, h, lo, hi)


# Neurons a thread takes at a time in the sparse FFNs: their gate and up rows first, then their down rows
# added into y in one `_rowsaxpy` (each block of y loaded and stored once a group, not once a neuron).
DECIDE = 32  # a multiple of GROUP_ROWS


@njit(inline="always")
def _ffn_rows(fmt, wg, wu, fmt_d, wd_t, rows, x, xq, xs, act, y, h, lo, hi):
    """Neurons rows[lo..hi-1]: h[k] = act(gate . x) * (up . x), and y += h[k] * wd_t[rows[k]] in order, a
    group of DECIDE at a time, each group's down rows hinted into the cache while its gate and up rows are read."""
    pf = _ahead(wg)
    for start in range(lo, hi, DECIDE):
        end = min(start + DECIDE, hi)
        for k in range(start, end):
            i = rows[k]
            nxt = rows[k + pf] if k + pf < hi else i
            g, u = _rowdot2(fmt, wg, wu, i, x, xq, xs, 0, nxt)
            h[k] = _act(act, g) * u
            prefetch_row(wd_t, i * wd_t.strides[0], wd_t.shape[1])
        _rowsaxpy(fmt_d, wd_t, rows[start:end], h[start:end], end - start, y)


@njit(parallel=_PRANGE_ONLY, error_model="numpy", cache=True, nogil=True)
def sparse_ffn(fmt, wg, wu, fmt_d, wd_t, rows, x, act, y, h, nchunks):
    """For each active neuron i = rows[k]: h[k] = act(wg[i] @ x) * (wu[i] @ x); y = sum_k h[k] * wd_t[i].

    One pass over each neuron's three rows (gate, up, transposed down); y is overwritten.
    Returns -1, or the position of an id outside the matrices (nothing computed).
    """
    n = rows.shape[0]
    bad = check_rows(rows, min(wg.shape[0], wu.shape[0], wd_t.shape[0]))
    if bad >= 0:
        return bad
    for j in range(y.shape[0]):
        y[j] = 0
    xq, xs = _prep(fmt, x)
    if nchunks == 1:
        _ffn_rows(fmt, wg, wu, fmt_d, wd_t, rows, x, xq, xs, act, y, h, 0, n)
        return -1
    part = np.empty((nchunks, y.shape[0]), np.float32)
    for c in prange(nchunks):
        lo, hi = _chunk(c, nchunks, n)
        # Each thread sums into a vector it allocates itself, far from the others': rows of one shared
        # array share cache lines (or prefetched line pairs) at their ends, which then bounce between
        # the cores on every neuron (a 2-thread scatter_axpy over 1536x576 took as long as 1 thread).
        acc = np.zeros(y.shape[0], np.float32)
        _ffn_rows(fmt, wg, wu, fmt_d, wd_t, rows, x, xq, xs, act, acc, h, lo, hi)
        part[c] = acc
    for c in range(nchunks):
        for j in range(y.shape[0]):
            y[j] += part[c, j]
    return -1


# The threshold FFN decides on DECIDE neurons at a time. A group's gate and up rows are read first, its
# |h| compared with the threshold after, without a branch: a branch on each neuron as its dot ends is
# mispredicted for about every other neuron at 50% sparsity, and each miss throws away the next neuron's
# dots already under way (BENCHMARKS.md, issue 18). The kept neurons' down rows are hinted into the cache
# while the next group's gate and up rows are read, then added into y (added at once, or hinted only a row
# ahead, the run waited on them).


@njit(inline="always")
def _threshold_rows(fmt, wg, wu, fmt_d, wd_t, x, xq, xs, xe, act, threshold, y, lo, hi):
    """Neurons lo..hi-1: gate and up rows of each, then the down rows of those with |h| > threshold
    added into y in ascending order; returns how many were kept."""
    pf = _ahead(wg)
    u = np.empty(GROUP_ROWS, np.float32)
    ids = np.empty((2, DECIDE), np.int64)  # two groups: the one being decided, the one being added
    coef = np.empty((2, DECIDE), np.float32)
    h = np.empty(DECIDE, np.float32)
    kept = m_last = 0
    for start in range(lo, hi, DECIDE):
        g, n = (start - lo) // DECIDE % 2, min(DECIDE, hi - start)
        for k in range(n):
            if k < m_last:
                prefetch_row(wd_t, ids[1 - g, k] * wd_t.strides[0], wd_t.shape[1])
            i = start + k
            if _packed(fmt):  # a group's 8 neurons at its first (lo, hi and DECIDE are multiples of 8)
                if k % GROUP_ROWS == 0:
                    _xdot8(fmt, wg, i // GROUP_ROWS, xe, xs, 0, h, k, True)
                    _xdot8(fmt, wu, i // GROUP_ROWS, xe, xs, 0, u, 0, True)
                    for r in range(GROUP_ROWS):
                        h[k + r] = _act(act, h[k + r]) * u[r]
            else:
                nxt = i + pf if i + pf < hi else i
                gate, up = _rowdot2(fmt, wg, wu, i, x, xq, xs, 0, nxt)
                h[k] = _act(act, gate) * up
        m = 0
        for k in range(n):
            ids[g, m], coef[g, m] = start + k, h[k]
            m += abs(h[k]) > threshold
        _rowsaxpy(fmt_d, wd_t, ids[1 - g], coef[1 - g], m_last, y)
        kept, m_last = kept + m, m
    last = (hi - 1 - lo) // DECIDE % 2  # the last group's slot
    _rowsaxpy(fmt_d, wd_t, ids[last], coef[last], m_last, y)
    return kept


@njit(parallel=_PRANGE_ONLY, error_model="numpy", cache=True, nogil=True)
def threshold_ffn(fmt, wg, wu, fmt_d, wd_t, x, act, threshold, y, nchunks):
    """One token's FFN over the neurons whose |h_i| > threshold, h_i = act(wg[i] @ x) * (wu[i] @ x):
    y = sum of h_i * wd_t[i] over them (y overwritten); returns how many neurons were kept.

    Each thread reads the gate and up rows of its range of neurons once and adds the down rows of the
    kept ones into its own partial y (see sparse_ffn), so only the kept neurons' down rows are read.
    """
    n = min(_n_rows(fmt, wg), _n_rows(fmt, wu), wd_t.shape[0])
    unit = GROUP_ROWS if _packed(fmt) else 1  # chunks split packed rows at group boundaries
    for j in range(y.shape[0]):
        y[j] = 0
    xq, xs = _prep(fmt, x)
    xe = _expand(fmt, xq)
    if nchunks == 1:
        return _threshold_rows(fmt, wg, wu, fmt_d, wd_t, x, xq, xs, xe, act, threshold, y, 0, n)
    part = np.empty((nchunks, y.shape[0]), np.float32)
    kept = np.empty(nchunks, np.int64)
    for c in prange(nchunks):
        lo, hi = _chunk(c, nchunks, n // unit)
        acc = np.zeros(y.shape[0], np.float32)  # thread-local, see sparse_ffn
        kept[c] = _threshold_rows(fmt, wg, wu, fmt_d, wd_t, x, xq, xs, xe, act, threshold, acc, lo * unit,
                                  hi * unit)
        part[c] = acc
    total = 0
    for c in range(nchunks):
        total += kept[c]
        for j in range(y.shape[0]):
            y[j] += part[c, j]
    return total


@njit(inline="always")
def _dequant_rows(fmt, w, rows, out, lo, hi):
    pf = _ahead(w)
    for k in range(lo, hi):
        out[k] = 0
        _rowaxpy(fmt, w, rows[k], np.float32(1.0), out[k], rows[k + pf] if k + pf < hi else rows[k])


@njit(parallel=_PRANGE_ONLY, error_model="numpy", cache=True, nogil=True)
def dequantize_rows(fmt, w, rows, out, nchunks):
    """out[k] = w[rows[k]] as float32 (embedding lookups, prefill tiles); returns -1, or the position
    of an id outside w (nothing written)."""
    n = rows.shape[0]
    bad = check_rows(rows, w.shape[0])
    if bad >= 0:
        return bad
    if nchunks == 1:
        _dequant_rows(fmt, w, rows, out, 0, n)
        return -1
    for c in prange(nchunks):
        lo, hi = _chunk(c, nchunks, n)
        _dequant_rows(fmt, w, rows, out, lo, hi)
    return -1


@njit(error_model="numpy", cache=True, nogil=True)
def pack_rows(fmt, w, out):
    """Rows w [8 G, row_bytes] of q4_0 or q4_1 (fmt) into out [G, 8 row_bytes] (zeroed), their groups of 8
    rows interleaved block by block as the packed dots read them (layout in simd.py): the same bytes,
    moved; `reference.unpack_rows` undoes it."""
    bb = 20 if fmt == Q4_1 else 18  # bytes of a row's block; its nibbles start at qoff
    qoff = 4 if fmt == Q4_1 else 2
    head = 32 if fmt == Q4_1 else 16  # a group block's scales (d[8], then q4_1's m[8]) before its nibbles
    for g in range(out.shape[0]):
        for k in range(w.shape[1] // bb):
            o, src = k * GROUP_ROWS * bb, k * bb
            for r in range(GROUP_ROWS):
                row = w[GROUP_ROWS * g + r]
                out[g, o + 2 * r], out[g, o + 2 * r + 1] = row[src], row[src + 1]
                if fmt == Q4_1:
                    out[g, o + 16 + 2 * r], out[g, o + 17 + 2 * r] = row[src + 2], row[src + 3]
                for j in range(32):
                    q = (np.int64(row[src + qoff + j % 16]) >> (4 * (j // 16))) & 15  # weight j's nibble
                    t, lane = j // 8, r + GROUP_ROWS * (j % 8 // 4)
                    at = o + head + 64 * (t % 2) + 4 * lane + j % 4  # P0: vectors 0, 2; P1: 1, 3
                    out[g, at] |= np.uint8(q << (4 * (t // 2)))


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def rms_norm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w."""
    d = x.shape[1]
    for t in range(x.shape[0]):
        ss = np.float32(0.0)
        for j in range(d):
            ss += x[t, j] * x[t, j]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(d) + np.float32(eps))
        for j in range(d):
            out[t, j] = x[t, j] * inv * w[j]


@njit(inline="always")
def _rope(x, base, j, cos, sin, interleaved):
    """The j-th rotated pair of the head x[base : base + hd]: (i0, i1, x'[i0], x'[i1]) with pairs
    (2j, 2j+1) when interleaved (GGUF llama), else (j, j + hd/2) (HF)."""
    half = cos.shape[0]
    i0, i1 = (2 * j, 2 * j + 1) if interleaved else (j, j + half)
    a, b = x[base + i0], x[base + i1]
    return i0, i1, a * cos[j] - b * sin[j], a * sin[j] + b * cos[j]


@njit(inline="always")
def _exp_neg(x):
    """exp(x) for x <= 0 in float32 arithmetic LLVM can vectorize (math.exp is a scalar libm call, the
    bulk of long-context attention): 2^k * e^f with k = round(x / ln 2) and f = x - k ln 2 (ln 2 split
    in two parts, Cephes' expf, so f is exact to float32), |f| <= ln 2 / 2, e^f by its Taylor series to
    degree 6; x below -87 counts as -87 (e^-87 = 1.6e-38: nothing next to the maximum's weight of 1)."""
    x = max(x, np.float32(-87.0))
    k = np.float32(math.floor(x * np.float32(1.4426950408889634) + np.float32(0.5)))
    f = x - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
    p = np.float32(1.0) + f * (np.float32(1.0) + f * (np.float32(0.5) + f * (np.float32(1.0 / 6) + f * (
        np.float32(1.0 / 24) + f * (np.float32(1.0 / 120) + f * np.float32(1.0 / 720))))))
    return p * f32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))


VALUE_BLOCK = 32  # positions whose value rows a kv head's query heads add in turn


@njit(inline="always")
def _row_max(s, h, n, lanes):
    """max of s[h, :n] as 16 running maxima (`lanes`, 16 scratch floats): LLVM leaves a float max reduced
    into one scalar unvectorized, one dependent max per element (4-5x slower over 2000 scores)."""
    for j in range(16):
        lanes[j] = -np.inf
    i = 0
    while i + 16 <= n:
        for j in range(16):
            lanes[j] = max(lanes[j], s[h, i + j])
        i += 16
    mx = np.float32(-np.inf)
    for j in range(16):
        mx = max(mx, lanes[j])
    for i in range(i, n):
        mx = max(mx, s[h, i])
    return mx


@njit(inline="always")
def _attend_span(q, kc, vc, lo, hi, m, l, acc):
    """Every query head (q [H, hd], rotated and divided by sqrt(hd)) over cache positions lo..hi-1,
    unnormalised: per head h, m[h] = the largest score, l[h] = sum exp(score - m[h]), acc[h] = sum
    exp(score - m[h]) * v. Keys, then values, are read once each in order (a sequential stream: the cache
    of a long context lives in L3 or DRAM), every kv head's rows serving its whole group of query heads:
    the scores 16 positions at a time (`dot16`), the values in blocks of positions (`axpy64`), 4 at a time
    for head sizes those do not take; a span's partial results merge with others' (`attention_decode`).
    Entries are widened to float32 as read (`from_kv`), so a float16 cache streams half the bytes and
    accumulates as a float32 one. Plain indexing, no array views in the loops: a view costs a
    reference-count update, more than a 64-wide dot."""
    H, hd = q.shape
    KV = kc.shape[1]
    group = H // KV
    n = hi - lo
    s = np.empty((H, max(n, 1)), np.float32)
    p = lo
    if hd % 16 == 0:  # sixteen positions at a time, reduced together (`dot16`)
        while p + 16 <= hi:
            for g in range(KV):
                for h in range(g * group, (g + 1) * group):  # the query heads reading kv head g
                    dot16(kc, (p * KV + g) * hd, KV * hd, q, h * hd, hd, s, h * s.shape[1] + p - lo)
            p += 16
    while p + 4 <= hi:  # four positions at a time: each head's row of q is read once for four keys
        for g in range(KV):
            for h in range(g * group, (g + 1) * group):
                a0 = a1 = a2 = a3 = np.float32(0.0)
                for e in range(hd):
                    qe = q[h, e]
                    a0 += qe * from_kv(kc[p, g, e])
                    a1 += qe * from_kv(kc[p + 1, g, e])
                    a2 += qe * from_kv(kc[p + 2, g, e])
                    a3 += qe * from_kv(kc[p + 3, g, e])
                i = p - lo
                s[h, i], s[h, i + 1], s[h, i + 2], s[h, i + 3] = a0, a1, a2, a3
        p += 4
    for p in range(p, hi):
        for g in range(KV):
            for h in range(g * group, (g + 1) * group):
                a = np.float32(0.0)
                for e in range(hd):
                    a += q[h, e] * from_kv(kc[p, g, e])
                s[h, p - lo] = a
    lanes = np.empty(16, np.float32)
    for h in range(H):
        mx = _row_max(s, h, n, lanes)
        total = np.float32(0.0)
        for i in range(n):
            s[h, i] = _exp_neg(s[h, i] - mx)
            total += s[h, i]
        m[h], l[h] = mx, total
        for e in range(hd):
            acc[h, e] = 0
    if hd % 64 == 0:  # blocks of positions whose values stay in L1 for the group's heads (`axpy64`)
        for p in range(lo, hi, VALUE_BLOCK):
            k = min(VALUE_BLOCK, hi - p)
            for g in range(KV):
                for h in range(g * group, (g + 1) * group):
                    for c in range(0, hd, 64):
                        axpy64(vc, (p * KV + g) * hd + c, KV * hd, s, h * s.shape[1] + p - lo, k, acc, h * hd + c)
        return
    p = lo
    while p + 4 <= hi:  # four positions at a time: each head's acc row is loaded and stored once for four
        for g in range(KV):
            for h in range(g * group, (g + 1) * group):
                i = p - lo
                w0, w1, w2, w3 = s[h, i], s[h, i + 1], s[h, i + 2], s[h, i + 3]
                for e in range(hd):
                    acc[h, e] += (w0 * from_kv(vc[p, g, e]) + w1 * from_kv(vc[p + 1, g, e])
                                  + w2 * from_kv(vc[p + 2, g, e]) + w3 * from_kv(vc[p + 3, g, e]))
        p += 4
    for p in range(p, hi):
        for g in range(KV):
            for h in range(g * group, (g + 1) * group):
                w = s[h, p - lo]
                for e in range(hd):
                    acc[h, e] += w * from_kv(vc[p, g, e])


@njit(parallel=_PRANGE_ONLY, fastmath=True, error_model="numpy", cache=True, nogil=True)
def attention_decode(q, k, v, kc, vc, pos, cos, sin, interleaved, out, nchunks):
    """One new token's attention. q [H*hd], k and v [KV*hd] (unrotated projections); kc/vc
    [n_ctx, KV, hd] this layer's cache (float32, or float16 held as uint16 bits: written rounded,
    `to_kv`, read widened to float32), which gets rotated k and v at `pos`; out [H, hd] =
    softmax(rope(q_h) K^T / sqrt(hd)) V over positions 0..pos, query head h reading kv head
    h // (H / KV). With nchunks > 1 the positions are split into spans attended in parallel and
    merged by their softmax maxima (split-K, as flash-decoding does): threads share the cache reads
    at any head count, long contexts included."""
    KV, hd = kc.shape[1], kc.shape[2]
    H = q.shape[0] // hd
    for g in range(KV):
        for j in range(hd // 2):
            i0, i1, a, b = _rope(k, g * hd, j, cos, sin, interleaved)
            kc[pos, g, i0], kc[pos, g, i1] = to_kv(a, kc), to_kv(b, kc)
        for j in range(hd):
            vc[pos, g, j] = to_kv(v[g * hd + j], vc)
    qr = np.empty((H, hd), np.float32)  # rotated, divided by sqrt(hd) once for every span
    scale = np.float32(1.0 / math.sqrt(hd))
    for h in range(H):
        for j in range(hd // 2):
            i0, i1, a, b = _rope(q, h * hd, j, cos, sin, interleaved)
            qr[h, i0], qr[h, i1] = a * scale, b * scale
    S = pos + 1
    m, l = np.empty((nchunks, H), np.float32), np.empty((nchunks, H), np.float32)
    acc = np.empty((nchunks, H, hd), np.float32)
    if nchunks == 1:
        _attend_span(qr, kc, vc, 0, S, m[0], l[0], acc[0])
    else:
        for c in prange(nchunks):  # spans of positions (split-K): every thread reads its own keys and values
            lo, hi = _chunk(c, nchunks, S)
            mc, lc, ac = np.empty(H, np.float32), np.empty(H, np.float32), np.empty((H, hd), np.float32)
            _attend_span(qr, kc, vc, lo, hi, mc, lc, ac)  # thread-local, see sparse_ffn
            m[c], l[c], acc[c] = mc, lc, ac
    for h in range(H):
        mx = np.float32(-np.inf)
        for c in range(nchunks):
            mx = max(mx, m[c, h])
        total = np.float32(0.0)
        for j in range(hd):
            out[h, j] = 0
        for c in range(nchunks):
            if l[c, h] > 0:  # an empty span (fewer positions than chunks) adds nothing
                f = math.exp(m[c, h] - mx)
                total += f * l[c, h]
                for j in range(hd):
                    out[h, j] += f * acc[c, h, j]
        for j in range(hd):
            out[h, j] /= total

# ---------------------------------------------------------------------------------------------
# Decoder blocks: one call from Python for what a decode step otherwise makes several calls for.
# Each call from Python costs 2-5 us (argument conversion, dispatch), comparable to a whole
# SmolLM2-sized GEMV; these run the kernels above back to back inside compiled code.
# ---------------------------------------------------------------------------------------------


@njit(error_model="numpy", cache=True, nogil=True)
def attention_block(x, attn_norm, ffn_norm, eps, fmt, wq, wk, wv, fmt_o, wo, bq, bk, bv, kc, vc, pos, cos, sin,
                    interleaved, h, nchunks_qkv, nchunks_att, nchunks_o):
    """The attention half of a decoder layer for one token: x += wo @ attention(q, k, v) with
    q/k/v = wq/wk/wv @ rms_norm(x, attn_norm) (+ biases, empty arrays when the model has none),
    then h = rms_norm(x, ffn_norm), the FFN's input. x [1, d] is updated in place; the cache gets
    this token's rotated key and its value at `pos` (see `attention_decode`)."""
    hn = np.empty_like(x)
    rms_norm(x, attn_norm, eps, hn)
    q = np.empty((1, _n_rows(fmt, wq)), np.float32)
    k = np.empty((1, _n_rows(fmt, wk)), np.float32)
    v = np.empty((1, _n_rows(fmt, wv)), np.float32)
    matvec(fmt, (wq, wk, wv), hn, (q, k, v), nchunks_qkv)
    for j in range(bq.shape[0]):
        q[0, j] += bq[j]
    for j in range(bk.shape[0]):
        k[0, j] += bk[j]
    for j in range(bv.shape[0]):
        v[0, j] += bv[j]
    att = np.empty((q.shape[1] // kc.shape[2], kc.shape[2]), np.float32)
    attention_decode(q[0], k[0], v[0], kc, vc, pos, cos, sin, interleaved, att, nchunks_att)
    o = np.empty((1, _n_rows(fmt_o, wo)), np.float32)
    matvec(fmt_o, (wo,), att.reshape(1, -1), (o,), nchunks_o)
    for j in range(x.shape[1]):
        x[0, j] += o[0, j]
    rms_norm(x, ffn_norm, eps, h)


@njit(error_model="numpy", cache=True, nogil=True)
def dense_ffn(fmt, wg, wu, fmt_d, wd, x, act, y, nchunks_gate_up, nchunks_down):
    """y = wd @ (act(wg @ x) * (wu @ x)) for x [T, d] (T <= a few tokens): `gate_up`, then `matvec`."""
    a = np.empty((x.shape[0], _n_rows(fmt, wg)), np.float32)
    gate_up(fmt, wg, wu, x, act, a, nchunks_gate_up)
    matvec(fmt_d, (wd,), a, (y,), nchunks_down)


@njit(error_model="numpy", cache=True, nogil=True)
def predict_rows(fmt1, w1, fmt2, w2_t, x, threshold, rows, nchunks1, nchunks2):
    """A low-rank predictor's choice for one token: rows[:n] = the ids i, ascending, with
    (w2 @ relu(w1 @ x))[i] > threshold; returns n. w2 comes transposed, w2_t [r, n_ff], so that the
    second product adds only the rows of w2_t whose hidden unit the ReLU left positive (about half)."""
    r = w1.shape[0]
    z = np.empty((1, r), np.float32)
    matvec(fmt1, (w1,), x, (z,), nchunks1)
    hidden = np.empty(r, np.int64)
    coef = np.empty(r, np.float32)
    m = 0
    for j in range(r):
        if z[0, j] > 0:
            hidden[m], coef[m] = j, z[0, j]
            m += 1
    logits = np.zeros(rows.shape[0], np.float32)  # rows: room for all n_ff ids
    scatter_axpy(fmt2, w2_t, hidden[:m], coef[:m], logits, nchunks2)
    n = 0
    for i in range(logits.shape[0]):
        if logits[i] > threshold:
            rows[n] = i
            n += 1
    return n


@njit(error_model="numpy", cache=True, nogil=True)
def predicted_ffn(fmt1, w1, fmt2, w2_t, threshold, fmt, wg, wu, fmt_d, wd_t, x, act, y, nchunks1, nchunks2,
                  most_parts, neuron_bytes, min_bytes):
    """One token's FFN over the neurons a low-rank predictor picks (`predict_rows`, then `sparse_ffn`
    over them), in one call from Python; returns how many. The FFN is split into parts as the
    wrappers' `_parts` would for that many neurons: one per `min_bytes` of their rows, 1 to most_parts."""
    rows = np.empty(wg.shape[0], np.int64)
    n = predict_rows(fmt1, w1, fmt2, w2_t, x, threshold, rows, nchunks1, nchunks2)
    parts = n * neuron_bytes // min_bytes
    sparse_ffn(fmt, wg, wu, fmt_d, wd_t, rows[:n], x, act, y, np.empty(n, np.float32),
               1 if parts < 2 else min(most_parts, parts))
    return n
