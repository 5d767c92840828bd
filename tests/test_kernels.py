"""CPU kernels against the numpy reference, on random and real SmolLM2 weights, in every format.

Tolerance, per format: |ours - reference| <= 1e-5 * (|W| @ |x|) elementwise, the reference
accumulating in float64 (measured: below 1e-7 of the bound's scale).
- f32/f16/bf16: float and exact; the kernels decode each weight exactly as `QTensor.dequantize` does
  and take x as given, so the bound is float32 summation error only.
- q8_0/q4_0/q4_1: like llama.cpp, x is quantized once per call to 8 bits per block of 32
  (`cpu.quantize_x`: d = amax / 127, q = rint(x / d), bit-identical to `reference.quantize_x`), integer
  dot products per block, float32 across blocks; the reference multiplies the same 8-bit x exactly,
  so the bound is again float32 summation error. Against float x the 8-bit x adds at most half a
  step per value: |ours - W @ x| <= sum_j |w_j| * d_x(j) / 2 + the bound above
  (`test_block_formats_against_float_x`).
Embedding rows are bit-exact. A wrong nibble order, scale or offset breaks these by orders of
magnitude.
"""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from hetinfer import kernels
from hetinfer.kernels import cpu, numba_cache
from hetinfer.kernels import threads as kernel_threads
from hetinfer.kernels import reference as ref
from hetinfer.tensors import FORMATS, QTensor, quantize

RTOL = 1e-5
ACTS = ("silu", "relu", "gelu")


def rand_q(rows, cols, qtype, seed=0, read_only=False):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    Q = quantize(w, qtype)
    if read_only:  # like weights mmapped from a GGUF file
        Q.data.setflags(write=False)
    return Q


def rand_x(*shape, seed=1):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def assert_close(ours, want, bound):
    ours = ours.numpy() if isinstance(ours, torch.Tensor) else ours
    assert ours.shape == want.shape
    err = np.abs(ours - want)
    assert np.all(err <= RTOL * bound + 1e-30), f"max err {err.max():.3g}, allowed {RTOL * bound.max():.3g}"


def bound_linear(W, x, rows=None):
    return np.abs(np.asarray(x, np.float64)) @ np.abs(W.dequantize(rows).astype(np.float64)).T


def gate_up_reference(Wg, Wu, x, act):
    """The reference act(Wg x) * (Wu x) for x [T, cols], and its bound for assert_close: the error of
    act(g) * u from g and u each within their bound (|act'| <= 1.13 for these activations)."""
    g, u = ref.linear(Wg, x), ref.linear(Wu, x)
    want = ref.act(act, g) * u
    bound = 1.2 * (bound_linear(Wg, x) * np.abs(u) + np.abs(ref.act(act, g)) * bound_linear(Wu, x))
    return want, bound + np.abs(want)


def cols_for(qtype):
    return (96, 100) if qtype in ("f32", "f16", "bf16") else (96,)  # float formats: a row tail % 32


# ---------------------------------------------------------------------------------------------
# dense
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("T", [1, 3, 9, kernels.GEMV_MAX_T + 1])  # past GEMV_MAX_T: dequantized tiles
def test_linear(qtype, T):
    for cols in cols_for(qtype):
        W, x = rand_q(70, cols, qtype, read_only=T == 3), rand_x(T, cols)
        assert_close(kernels.linear(W, x), ref.linear(W, x.numpy()), bound_linear(W, x.numpy()))


PACKABLE = ("q4_0", "q4_1")  # formats whose rows the dense kernels pack in groups of 8


def packed(W):
    """Whether the dense kernels read W's rows packed (`kernels._dense_info`)."""
    return kernels._dense_info(W)[0] in kernels.simd.PACKED.values()


def test_pack_makes_now_the_copies_the_first_dense_call_would():
    """kernels.pack packs read-only Q4 weights up front and returns their packed bytes; a writable or q8_0 weight
    is left as it is; the dense products then give to the bit what weights packed at their first call give."""
    fmts = ("q4_0", "q4_1", "q8_0")
    early = [rand_q(64, 96, f, seed=i, read_only=True) for i, f in enumerate(fmts)] + [rand_q(64, 96, "q4_1", seed=3)]
    lazy = [rand_q(64, 96, f, seed=i, read_only=True) for i, f in enumerate(fmts)] + [rand_q(64, 96, "q4_1", seed=3)]
    assert kernels.pack(early) == early[0].data.nbytes + early[1].data.nbytes
    assert [kernels.packed_nbytes(W) > 0 for W in early] == [kernels.simd.PACKS] * 2 + [False, False]
    assert not any("_dense_info" in W.__dict__ for W in lazy)
    x = rand_x(3, 96).numpy()
    for a, b in zip(early, lazy):
        assert np.array_equal(kernels.linear(a, x), kernels.linear(b, x))
        assert np.array_equal(kernels.linear(a, x[:1]), kernels.linear(b, x[:1]))
    assert kernels.pack(early) == early[0].data.nbytes + early[1].data.nbytes  # packed once: the same copies


@pytest.mark.parametrize("qtype", PACKABLE)
def test_pack_rows_round_trips(qtype):
    """cpu.pack_rows moves every byte of 8 rows into its group's interleaved place: the reference's unpacking
    gives the rows back, for 1, 2 and 3 blocks (the packed dot's loop of 2 blocks and its tail)."""
    for rows, cols in ((8, 32), (16, 64), (48, 96)):
        W = rand_q(rows, cols, qtype, seed=rows)
        out = np.zeros((rows // 8, 8 * W.row_bytes), np.uint8)
        cpu.pack_rows(cpu.FMT[qtype], W.data, out)
        assert np.array_equal(ref.unpack_rows(qtype, out), W.data)
        assert not np.array_equal(out.reshape(W.data.shape), W.data)  # moved, not copied


@pytest.mark.skipif(not kernels.simd.PACKS, reason="this CPU has no AVX2: rows are never packed")
@pytest.mark.parametrize("qtype", PACKABLE)
@pytest.mark.parametrize("threads", [1, 2])
def test_packed_rows_against_reference(qtype, threads, monkeypatch):
    """Read-only Q4 weights whose rows are a multiple of 8 (a mapped model file's) are packed at their first
    dense call: linear for 1 to 40 tokens (prompts past GEMV_MAX_T too, over several tiles of cpu.TOKEN_TILE),
    q/k/v in one call, gate_up and dense_ffn within the reference's bound; the sparse kernels still read the
    stored rows. Writable weights (a cache's records are rewritten) and other row counts are not packed, and
    a packed copy is dropped once W.data is replaced."""
    monkeypatch.setattr(kernels, "MIN_BYTES_PER_THREAD", 1)
    kernels.set_threads(threads)
    try:
        W = rand_q(64, 96, qtype, 3, read_only=True)
        for T in (1, 3, 9, kernels.GEMV_MAX_T + 1, 40):
            x = rand_x(T, 96, seed=T)
            assert_close(kernels.linear(W, x), ref.linear(W, x.numpy()), bound_linear(W, x.numpy()))
        assert packed(W)
        U, D = rand_q(64, 96, qtype, 4, read_only=True), rand_q(96, 64, qtype, 5, read_only=True)
        for h_in in (rand_x(40, 96, seed=7), rand_x(1, 96)):  # a prompt, a decode step
            h = kernels.gate_up(W, U, h_in, "silu")
            assert_close(h, *gate_up_reference(W, U, h_in.numpy(), "silu"))
            assert torch.equal(kernels.dense_ffn(W, U, D, h_in, "silu"), kernels.linear(D, h))
        x = rand_x(1, 96)
        Ws = [rand_q(n, 96, qtype, n, read_only=True) for n in (96, 32, 32)]
        for out, V in zip(kernels.linears(Ws, x), Ws):
            assert_close(out, ref.linear(V, x.numpy()), bound_linear(V, x.numpy()))
        assert all(packed(V) for V in (*Ws, U, D))
        rows = np.array([63, 3, 8])
        assert_close(kernels.gather_matvec(W, rows, x), ref.gather_matvec(W, rows, x.numpy()), bound_linear(W, x.numpy(), rows))
    finally:
        kernels.set_threads()
    assert not packed(rand_q(64, 96, qtype))  # writable
    assert not packed(rand_q(70, 96, qtype, read_only=True))  # 70 rows: not whole groups
    W.data = W.data.copy()  # a writable array now: the packed copy of the old one no longer stands for it
    assert not packed(W)


def mapped_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, ours = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0] and line[0] in "0123456789abcdef":
                ours = line.rstrip().endswith(str(path))
            elif ours and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not kernels.simd.PACKS or not os.path.exists("/proc/self/smaps"),
                    reason="needs AVX2 (packing) and Linux's /proc/self/smaps")
def test_packing_a_mapped_weight_unmaps_its_stored_pages(tmp_path):
    """A weight mapped from a file (as GGUF weights are) leaves the process's resident memory once packed: its
    whole pages are dropped from the mapping, and the sparse kernels, which read the stored rows, still read
    them right (the pages map again)."""
    W = rand_q(512, 1024, "q4_1")  # 320 KiB of rows
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 100 + W.data.tobytes())  # not page-aligned: the partial first and last pages stay
    mm = np.memmap(path, np.uint8, mode="r")
    M = QTensor("q4_1", W.shape, mm[100: 100 + W.nbytes].reshape(W.data.shape))
    assert int(M.data.astype(np.int64).sum()) == int(W.data.astype(np.int64).sum())  # every page read: resident
    before = mapped_rss_kib(path)
    x = rand_x(1, 1024)
    assert_close(kernels.linear(M, x), ref.linear(W, x.numpy()), bound_linear(W, x.numpy()))
    assert packed(M) and before >= 320 and mapped_rss_kib(path) <= 8
    rows = np.array([5, 300, 511])
    assert_close(kernels.gather_matvec(M, rows, x), ref.gather_matvec(W, rows, x.numpy()), bound_linear(W, x.numpy(), rows))


def test_quantize_x_bit_exact_and_within_half_a_step():
    """The kernels' 8-bit x equals the reference's bit for bit, including blocks of zeros, tiny, huge,
    inf and nan values, and is within half a step d / 2 of x (d = amax / 127; |q| <= 127)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 320)) * np.exp(3 * rng.standard_normal((3, 320)))).astype(np.float32)
    x[0, :32] = 0
    x[0, 32:64] = 5e-32  # d < 2^-110: the block counts as zero
    x[0, 64:96] = 2e-31  # the smallest amax still quantized
    x[1, 70] = np.inf
    x[1, 100] = np.nan
    x[2, 128:160] = 3e38
    x[2, 131] = -3.4e38
    x[2, 160:192] *= 1e6  # an outlier block next to ordinary ones
    x[2, 192:224] = np.arange(32) - 15.5  # ties: x / d lands on .5 (rounds to even)
    xq, xs = np.empty((3, 10, 32), np.int8), np.empty((3, 10, 2), np.float32)
    cpu.quantize_x(x, xq, xs)
    q, d, s = ref.quantize_x(x)
    assert np.array_equal(xq, q)
    assert np.array_equal(xs[..., 0], d, equal_nan=True) and np.array_equal(xs[..., 1], s, equal_nan=True)
    assert np.isnan(d[1, 2]) and np.isnan(d[1, 3]) and d[0, 0] == 0 and d[0, 1] == 0 and d[0, 2] > 0
    assert np.abs(q.astype(int)).max() <= 127 and np.array_equal(np.abs(q).max(-1)[d > 0], np.full((d > 0).sum(), 127))
    xf = ref.q8_x(x)
    good = np.repeat(d > 0, 32, -1) & np.repeat(np.isfinite(d), 32, -1)
    err = np.abs(xf - x)[good]
    assert np.all(err <= 0.5 * np.repeat(d, 32, -1)[good] * (1 + 2**-20))
    assert np.array_equal(xf[0, :64], np.zeros(64))
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.array_equal(s, (d * q.astype(np.float32).sum(-1)).astype(np.float32), equal_nan=True)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
def test_block_formats_against_float_x(qtype):
    """Block-format products against the plain float64 product with x as given (no quantization), on x
    with outliers (as LLM activations have) and long rows: within half a step of x per value, the
    stated bound, and well inside it on average (the rounding errors are independent)."""
    W = rand_q(40, 4096, qtype)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 4096)) * np.exp(2 * rng.standard_normal((2, 4096)))).astype(np.float32)
    want = np.asarray(x, np.float64) @ W.dequantize().astype(np.float64).T
    _, d, _ = ref.quantize_x(x)
    half_step = np.repeat(d.astype(np.float64) / 2, 32, -1)  # [2, 4096]
    bound_q8 = half_step @ np.abs(W.dequantize().astype(np.float64)).T
    ours = kernels.linear(W, torch.from_numpy(x)).numpy()
    err = np.abs(ours - want)
    assert np.all(err <= bound_q8 + RTOL * bound_linear(W, x))
    assert err.mean() < 0.1 * bound_q8.mean()


@pytest.mark.parametrize("qtype", FORMATS)
def test_linears_fused_matches_separate(qtype):
    Ws = [rand_q(n, 64, qtype, seed=n) for n in (96, 32, 32)]
    x = rand_x(1, 64)
    for out, W in zip(kernels.linears(Ws, x), Ws):
        assert_close(out, ref.linear(W, x.numpy()), bound_linear(W, x.numpy()))
    mixed = [Ws[0], rand_q(32, 64, "q8_0" if qtype != "q8_0" else "f16")]
    for out, W in zip(kernels.linears(mixed, x), mixed):
        assert_close(out, ref.linear(W, x.numpy()), bound_linear(W, x.numpy()))


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("act", ACTS)
def test_gate_up(qtype, act):
    Wg, Wu, x = rand_q(64, 96, qtype, 2), rand_q(64, 96, qtype, 3), rand_x(2, 96)
    assert_close(kernels.gate_up(Wg, Wu, x, act), *gate_up_reference(Wg, Wu, x.numpy(), act))


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("T", [1, 3, 20])  # 20 > GEMV_MAX_T: the prompt path
def test_dense_ffn_is_gate_up_then_down(qtype, T):
    """The one-call FFN gives exactly what gate_up followed by linear gives (same kernels, same order)."""
    Wg, Wu, Wd, x = rand_q(64, 96, qtype, 2), rand_q(64, 96, qtype, 3), rand_q(96, 64, qtype, 4), rand_x(T, 96)
    want = kernels.linear(Wd, kernels.gate_up(Wg, Wu, x, "silu"))
    assert torch.equal(kernels.dense_ffn(Wg, Wu, Wd, x, "silu"), want)
    with pytest.raises(ValueError, match="do not form an FFN"):
        kernels.dense_ffn(Wg, Wu, rand_q(96, 32, qtype), x, "silu")


@pytest.mark.parametrize("qtype", FORMATS)
def test_embedding_bit_exact(qtype):
    W = rand_q(50, 64, qtype)
    ids = torch.tensor([7, 0, 49, 7])
    assert np.array_equal(kernels.embedding(W, ids).numpy(), W.dequantize(ids.numpy()))
    with pytest.raises(ValueError, match=r"0\.\.49"):
        kernels.embedding(W, torch.tensor([50]))


# ---------------------------------------------------------------------------------------------
# sparse
# ---------------------------------------------------------------------------------------------

ROW_SETS = {
    "empty": np.array([], np.int64),
    "all": np.arange(96),
    "unsorted": np.array([77, 3, 40, 0, 95, 12, 5]),
    "int32": np.array([9, 1], np.int32),
}


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("rows", ROW_SETS, ids=list(ROW_SETS))
def test_gather_matvec(qtype, rows):
    rows = ROW_SETS[rows]
    W, x = rand_q(96, 64, qtype), rand_x(64)
    out = kernels.gather_matvec(W, rows, x)
    assert out.shape == (len(rows),)
    assert_close(out, ref.gather_matvec(W, rows, x.numpy()), bound_linear(W, x.numpy(), rows))
    xt = rand_x(2, 64)
    assert_close(kernels.gather_matvec(W, torch.from_numpy(rows), xt), ref.gather_matvec(W, rows, xt.numpy()),
                 bound_linear(W, xt.numpy(), rows))


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("rows", ROW_SETS, ids=list(ROW_SETS))
def test_scatter_axpy(qtype, rows):
    rows = ROW_SETS[rows]
    Wd_t, y0 = rand_q(96, 64, qtype), rand_x(64)
    a = rand_x(len(rows), seed=4)
    y = y0.clone()
    assert kernels.scatter_axpy(Wd_t, rows, a, y) is y
    bound = np.abs(y0.numpy()) + np.abs(a.numpy()) @ np.abs(Wd_t.dequantize(rows))
    assert_close(y, ref.scatter_axpy(Wd_t, rows, a.numpy(), y0.numpy()), bound)


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rows", ROW_SETS, ids=list(ROW_SETS))
def test_sparse_ffn(qtype, act, rows):
    rows = ROW_SETS[rows]
    Wg, Wu, Wd = rand_q(96, 64, qtype, 5), rand_q(96, 64, qtype, 6), rand_q(64, 96, qtype, 7)
    Wd_t = kernels.transpose_down(Wd)
    x = rand_x(1, 64)
    y, h = kernels.sparse_ffn(Wg, Wu, Wd_t, rows, x, act, return_act=True)
    want_y, want_h = ref.sparse_ffn(Wg, Wu, Wd_t, rows, x.numpy(), act)
    g, u = ref.gather_matvec(Wg, rows, x.numpy()[0]), ref.gather_matvec(Wu, rows, x.numpy()[0])
    bound_h = 1.2 * (bound_linear(Wg, x.numpy()[0], rows) * np.abs(u) + np.abs(ref.act(act, g)) * bound_linear(Wu, x.numpy()[0], rows))
    assert_close(h, want_h, bound_h + np.abs(want_h))
    assert y.shape == x.shape
    bound_y = (bound_h + 3 * np.abs(want_h)) @ np.abs(Wd_t.dequantize(rows))  # h's error carried, plus the sum's
    assert_close(y[0], want_y, bound_y)
    assert torch.equal(kernels.sparse_ffn(Wg, Wu, Wd_t, rows, x[0], act), y[0])


def keeping(h: np.ndarray, share: float) -> float:
    """A threshold on |h| that keeps `share` of its values, halfway between two of them (none: above
    them all; all: below zero)."""
    a = np.sort(np.abs(h))
    k = round(share * len(a))
    return float(a[-1] + 1) if k == 0 else -1.0 if k == len(a) else float(a[-k - 1] + a[-k]) / 2


@pytest.mark.parametrize("qtype,read_only", [(q, False) for q in FORMATS] + [(q, True) for q in PACKABLE],
                         ids=list(FORMATS) + [f"{q}-packed" for q in PACKABLE])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("share", [0.0, 0.5, 1.0], ids=["none", "half", "all"])
@pytest.mark.parametrize("threads", [1, 2])
def test_threshold_ffn(qtype, act, share, threads, read_only, monkeypatch):
    """The fused threshold FFN against the reference: the same neurons kept, y within the bound of
    test_sparse_ffn over them; on one thread bit-identical to the calls it replaces (gate_up, the mask,
    scatter_axpy over the kept rows), on several within float32 summation of the per-thread partial sums.
    224 neurons: several groups of cpu.DECIDE, and on two threads a partial one each. Read-only Q4 gate and
    up rows (a mapped model file) are packed in groups of 8, in the fused kernel as in gate_up."""
    monkeypatch.setattr(kernels, "MIN_BYTES_PER_THREAD", 1)  # split even these small matrices among the threads
    for cols in cols_for(qtype):
        Wg, Wu, Wd = rand_q(224, cols, qtype, 5, read_only), rand_q(224, cols, qtype, 6, read_only), rand_q(cols, 224, qtype, 7)
        assert packed(Wg) == packed(Wu) == (read_only and kernels.simd.PACKS)
        Wd_t = kernels.transpose_down(Wd)
        x = rand_x(1, cols)
        threshold = keeping(ref.gate_up(Wg, Wu, x.numpy(), act)[0], share)
        try:
            kernels.set_threads(threads)
            y, kept = kernels.threshold_ffn(Wg, Wu, Wd_t, x, act, threshold)
            assert torch.equal(kernels.threshold_ffn(Wg, Wu, Wd_t, x[0], act, threshold)[0], y[0])
            h = kernels.gate_up(Wg, Wu, x, act)[0]
            r = (h.abs() > threshold).nonzero()[:, 0]
            before = kernels.scatter_axpy(Wd_t, r, h[r], torch.zeros(cols))  # on one thread too
        finally:
            kernels.set_threads()
        want_y, rows = ref.threshold_ffn(Wg, Wu, Wd_t, x.numpy(), act, threshold)
        assert kept == len(rows) and y.shape == x.shape
        assert kept == round(share * 224) or (0 < share < 1 and act == "relu" and 0 < kept < 224)  # relu: ties at 0
        _, want_h = ref.sparse_ffn(Wg, Wu, Wd_t, rows, x.numpy(), act)
        g, u = ref.gather_matvec(Wg, rows, x.numpy()[0]), ref.gather_matvec(Wu, rows, x.numpy()[0])
        bound_h = 1.2 * (bound_linear(Wg, x.numpy()[0], rows) * np.abs(u) + np.abs(ref.act(act, g)) * bound_linear(Wu, x.numpy()[0], rows))
        assert_close(y[0], want_y, (bound_h + 3 * np.abs(want_h)) @ np.abs(Wd_t.dequantize(rows)))
        if threads == 1:
            assert torch.equal(y[0], before)
        else:
            torch.testing.assert_close(y[0], before, rtol=0, atol=1e-5 * float(before.abs().max()) + 1e-30)


def test_threshold_ffn_rejects_bad_input():
    W, Wd = rand_q(96, 64, "q4_1"), rand_q(64, 96, "q8_0")
    with pytest.raises(ValueError, match="activation"):
        kernels.threshold_ffn(W, W, W, rand_x(64), "tanh", 0.0)
    with pytest.raises(ValueError, match="transpose_down"):
        kernels.threshold_ffn(W, W, Wd, rand_x(64), "silu", 0.0)
    with pytest.raises(ValueError, match="one token"):
        kernels.threshold_ffn(W, W, W, rand_x(2, 64), "silu", 0.0)
    with pytest.raises(ValueError, match="share one format"):
        kernels.threshold_ffn(W, rand_q(96, 64, "q8_0"), W, rand_x(64), "silu", 0.0)


def bundled(*Ws):
    """Views of `Ws` (same row count) into one array of records, each holding row i of every matrix
    side by side and padded to 64 bytes: the neuron bundles of a flash store, held in RAM."""
    widths = [W.row_bytes for W in Ws]
    records = np.zeros((Ws[0].shape[0], -(-sum(widths) // 64) * 64), np.uint8)
    views, at = [], 0
    for W, width in zip(Ws, widths):
        records[:, at : at + width] = W.data.view(np.uint8)
        views.append(QTensor(W.qtype, W.shape, records[:, at : at + width].view(W.data.dtype)))
        at += width
    return views


@pytest.mark.parametrize("qtype", FORMATS)
def test_rows_read_in_place_from_bundled_records(qtype):
    """Kernels read weights whose rows are not adjacent (each row contiguous) in place, with the same
    arithmetic: results are bit-identical to the same weights stored as one block."""
    rows = np.array([77, 3, 40, 0, 95, 12, 5])
    Wg, Wu, Wd = rand_q(96, 64, qtype, 5), rand_q(96, 64, qtype, 6), rand_q(64, 96, qtype, 7)
    Wd_t = kernels.transpose_down(Wd, "q8_0")
    Bg, Bu, Bd = bundled(Wg, Wu, Wd_t)
    assert not Bg.data.flags.c_contiguous and np.shares_memory(kernels._u8(Bg), Bg.data)  # read in place
    x = rand_x(1, 64)
    half = float(kernels.gate_up(Wg, Wu, x, "silu").abs().median())  # a threshold that keeps half the neurons
    for ours, want in [
        (kernels.sparse_ffn(Bg, Bu, Bd, rows, x, "silu"), kernels.sparse_ffn(Wg, Wu, Wd_t, rows, x, "silu")),
        (kernels.threshold_ffn(Bg, Bu, Bd, x, "silu", half)[0],
         kernels.threshold_ffn(Wg, Wu, Wd_t, x, "silu", half)[0]),
        (kernels.gather_matvec(Bg, rows, x), kernels.gather_matvec(Wg, rows, x)),
        (kernels.scatter_axpy(Bd, rows, x[0, :7], torch.ones(64)), kernels.scatter_axpy(Wd_t, rows, x[0, :7], torch.ones(64))),
        (kernels.linear(Bu, x), kernels.linear(Wu, x)),
        (kernels.embedding(Bd, torch.tensor(rows)), kernels.embedding(Wd_t, torch.tensor(rows))),
    ]:
        assert torch.equal(ours, want)


def test_sparse_ffn_all_rows_equals_dense_ffn():
    # the down projection in f32 (float on both paths: a q8_0 dense down would quantize h to 8 bits)
    Wg, Wu, Wd = rand_q(128, 64, "q4_1", 5), rand_q(128, 64, "q4_1", 6), kernels.convert(rand_q(64, 128, "q8_0", 7), "f32")
    x = rand_x(1, 64)
    dense = kernels.linear(Wd, kernels.gate_up(Wg, Wu, x, "silu"))
    sparse = kernels.sparse_ffn(Wg, Wu, kernels.transpose_down(Wd), np.arange(128), x, "silu")
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


@pytest.fixture
def threads(request):
    """The kernels on exactly `request.param` threads for one test (parametrize indirectly), then back to the
    default."""
    kernels.set_threads(request.param)
    yield request.param
    kernels.set_threads()


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("T", [1, kernels.GEMV_MAX_T + 4])
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_prompt_ffn(qtype, T, threads, monkeypatch):
    """A prompt's FFN over every neuron of a neuron-major part (an offloaded layer's records), against the
    reference: 70 neurons in uneven shares on 1 or 2 threads (shares of at least 8 here), each share's
    rows dequantized 16 at a time (several tiles a share)."""
    monkeypatch.setattr(kernels, "PROMPT_FFN_ROWS", 8)
    monkeypatch.setattr(kernels, "TILE_BYTES", 16 * 96 * 4)
    Wg, Wu, Wd_t, x = rand_q(70, 96, qtype, 2), rand_q(70, 96, qtype, 3), rand_q(70, 96, qtype, 4), rand_x(T, 96)
    _, bound_a = gate_up_reference(Wg, Wu, x.numpy(), "silu")
    D = np.abs(Wd_t.dequantize().astype(np.float64))
    y = kernels.prompt_ffn(Wg, Wu, Wd_t, x.numpy(), "silu")
    assert_close(y, ref.prompt_ffn(Wg, Wu, Wd_t, x.numpy(), "silu"), bound_a @ D)
    with pytest.raises(ValueError, match="do not make one FFN"):
        kernels.prompt_ffn(Wg, Wu, rand_q(69, 96, qtype, 4), x.numpy(), "silu")


@pytest.mark.parametrize("op", ["gather", "scatter", "ffn", "embedding"])
@pytest.mark.parametrize("bad", [[0, 96], [-1], [3, 1000]])
def test_out_of_range_rows_rejected(op, bad):
    W = rand_q(96, 64, "q4_0")
    x, y = rand_x(64), torch.zeros(64)
    call = {
        "gather": lambda r: kernels.gather_matvec(W, r, x),
        "scatter": lambda r: kernels.scatter_axpy(W, r, torch.ones(len(r)), y),
        "ffn": lambda r: kernels.sparse_ffn(W, W, W, r, x, "silu"),
        "embedding": lambda r: kernels.embedding(W, torch.from_numpy(r)),
    }[op]
    with pytest.raises(ValueError, match=r"out of range: valid ids are 0\.\.95"):
        call(np.array(bad))
    assert torch.equal(y, torch.zeros(64))  # nothing was written


def test_bad_arguments_rejected():
    W = rand_q(80, 64, "q8_0")
    with pytest.raises(ValueError, match="integer"):
        kernels.gather_matvec(W, np.array([1.0, 2.0]), rand_x(64))
    with pytest.raises(ValueError, match="1-D"):
        kernels.gather_matvec(W, np.array([[1, 2]]), rand_x(64))
    with pytest.raises(ValueError, match="features"):
        kernels.linear(W, rand_x(1, 65))
    with pytest.raises(ValueError, match="coefficients"):
        kernels.scatter_axpy(W, [1, 2], torch.ones(3), torch.zeros(64))
    with pytest.raises(ValueError, match="activation"):
        kernels.sparse_ffn(W, W, W, [1], rand_x(64), "tanh")
    with pytest.raises(ValueError, match="transpose_down"):
        kernels.sparse_ffn(W, W, rand_q(64, 96, "q8_0"), [1], rand_x(64), "silu")


# ---------------------------------------------------------------------------------------------
# transposed down projection, threads, warmup
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", FORMATS)
def test_transpose_down(qtype):
    Wd = rand_q(64, 96, qtype)
    Wt = kernels.transpose_down(Wd)
    assert Wt.shape == (96, 64)
    src = Wd.dequantize().T
    if qtype in ("f32", "f16", "bf16"):
        assert Wt.qtype == qtype and np.array_equal(Wt.dequantize(), src)
    else:
        assert Wt.qtype == "q8_0"
        assert_requant_error(src, Wt)


def assert_requant_error(src, Wt):
    """q8_0 round-to-nearest: each weight within half a step d = absmax/127 of its block (plus the
    f16 rounding of d, <= 127 * 2^-11 * d), i.e. <= 0.57 d."""
    blocks = src.reshape(src.shape[0], -1, 32)
    d = np.abs(blocks).max(-1, keepdims=True) / 127
    err = np.abs(Wt.dequantize().reshape(blocks.shape) - blocks)
    assert np.all(err <= 0.57 * d + 1e-12)


def test_openmp_spin_bounded_unless_set():
    """Importing the kernels bounds how long OpenMP's threads spin after a parallel region (GOMP_SPINCOUNT,
    read once when the kernels load libgomp), and keeps a value the user set."""
    code = "import os; from hetinfer import kernels; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    run = lambda: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,  # noqa: E731
                                 check=True).stdout.strip()
    assert run() == "10000"
    env["GOMP_SPINCOUNT"] = "7"
    assert run() == "7"


def test_thread_counts_agree():
    W, x = rand_q(1024, 256, "q4_1"), rand_x(1, 256)
    rows = np.random.default_rng(0).permutation(1024)[:300]
    try:
        outs = []
        for n in (1, 2):
            assert kernels.set_threads(n) == min(n, kernels.numba.config.NUMBA_NUM_THREADS)
            outs.append((kernels.linear(W, x), kernels.sparse_ffn(W, W, W, rows, x, "silu")))
        assert torch.equal(outs[0][0], outs[1][0])  # a row's dot never depends on the split
        y1, y2 = outs[0][1], outs[1][1]  # per-thread partial sums: only the summation order differs
        torch.testing.assert_close(y1, y2, rtol=0, atol=1e-5 * y1.abs().max().item())
        with pytest.raises(ValueError, match=">= 1"):
            kernels.set_threads(0)
    finally:
        kernels.set_threads()


def fake_load(monkeypatch, others: float) -> None:
    """Readings as /proc/stat would give them while other processes keep `others` cores busy: each
    reading one second later, this process having taken half a core meanwhile (subtracted)."""
    clock = iter(range(1, 10**6))

    def sample():
        t = float(next(clock))
        return t, (others + 0.5) * t, 0.5 * t

    monkeypatch.setattr(kernel_threads, "_cpu_sample", sample)
    monkeypatch.setattr(kernel_threads, "_sample", None)
    monkeypatch.setattr(kernel_threads, "_checked", -1e9)
    kernels.get_threads()  # the first reading after the patch is the baseline: choose on the second
    monkeypatch.setattr(kernel_threads, "_checked", -1e9)


@pytest.mark.parametrize("others,cores,most,want", [
    (0.0, 2, 2, 2), (0.3, 2, 2, 2), (0.67, 2, 2, 1),  # a busy core shares with our thread: 2/3 of it is seen
    (1.0, 2, 2, 1), (5.0, 2, 2, 1), (1.0, 8, 8, 7), (2.6, 8, 8, 5), (0.0, 8, 4, 4), (0.0, 1, 1, 1),
])
def test_threads_for_counts_the_cores_left_free(others, cores, most, want):
    assert kernels.threads_for(others, cores, most) == want


def test_busy_seconds_reads_the_cores_of_this_process():
    stat = ("cpu  900 0 300 5000 40 0 10 0 0 0\n"
            "cpu0 100 5 50 2500 20 1 2 3 0 0\n"   # busy: 100+5+50+1+2+3 = 161 ticks (idle, iowait not)
            "cpu1 800 0 250 2500 20 0 8 0 0 0\n"  # 1058
            "cpu11 7 0 0 0 0 0 0 0 0 0\n"
            "intr 123 4 5\nctxt 999\n")
    tick = kernel_threads._TICK
    assert kernels.busy_seconds(stat, {0}) == pytest.approx(161 / tick)
    assert kernels.busy_seconds(stat, {0, 1}) == pytest.approx(1219 / tick)
    assert kernels.busy_seconds(stat, {1, 11}) == pytest.approx(1065 / tick)
    assert kernels.busy_seconds(stat, {5}) == 0


def test_auto_threads_follow_the_cores_other_processes_leave_free(monkeypatch):
    n = kernels.set_threads()
    if n < 2:
        pytest.skip("one core: nothing to fall back from")
    try:
        for others, want in ((1.0, n - 1), (n + 3.0, 1), (0.0, n)):
            fake_load(monkeypatch, others)
            assert kernels.get_threads() == want
            assert kernels.numba.get_num_threads() == want  # numba's own count for this thread follows

            def in_thread(out: list) -> None:  # numba's count is per thread: a worker thread's follows too
                out.append((kernels.get_threads(), kernels.numba.get_num_threads()))

            got: list = []
            t = threading.Thread(target=in_thread, args=(got,))
            t.start()
            t.join()
            assert got == [(want, want)]
        fake_load(monkeypatch, n + 3.0)
        assert kernels.set_threads(n) == n and kernels.get_threads() == n  # an explicit count is kept
    finally:
        kernels.set_threads()


def test_every_thread_runs_probes_on_the_set_count_while_others_are_busy(monkeypatch):
    """A probe measures (and keys its cache by) the machine's thread count, not what auto mode chose while a
    solver's child process was busy; afterwards auto mode goes on choosing."""
    n = kernels.set_threads()
    if n < 2:
        pytest.skip("one core: nothing to fall back from")
    try:
        fake_load(monkeypatch, n + 3.0)
        assert kernels.get_threads() == 1 and kernels.max_threads() == n
        with kernels.every_thread() as threads:
            monkeypatch.setattr(kernel_threads, "_checked", -1e9)
            assert threads == n and kernels.get_threads() == n and kernels.numba.get_num_threads() == n
        assert kernels.get_threads() == 1
        monkeypatch.setattr(kernel_threads, "_checked", -1e9)
        assert kernels.get_threads() == 1  # still auto: re-chosen from the load
    finally:
        kernels.set_threads()


def test_results_do_not_depend_on_how_many_cores_are_free(monkeypatch):
    """Sums split into parts (sparse FFN, attention spans) are split as set_threads allows, whatever
    runs them, and torch (a prompt's matrix products, whose sums its threads may split too) keeps its count:
    the same bits with every core free and with one, so text never depends on the load."""
    n = kernels.set_threads()
    if n < 2:
        pytest.skip("one core: nothing to compare")
    W, x = rand_q(4096, 256, "q4_1"), rand_x(1, 256)
    rows = np.random.default_rng(0).permutation(4096)[:1500]
    n_ctx, KV, H, hd, pos = 700, 3, 9, 64, 650
    rng = np.random.default_rng(1)
    kc0 = torch.from_numpy(rng.standard_normal((n_ctx, KV, hd), dtype=np.float32))
    vc = torch.from_numpy(rng.standard_normal((n_ctx, KV, hd), dtype=np.float32))
    q, k, v = rand_x(1, H * hd, seed=3), rand_x(1, KV * hd, seed=4), rand_x(1, KV * hd, seed=5)
    cos, sin = torch.ones(hd // 2), torch.zeros(hd // 2)
    outs = []
    try:
        for others in (0.0, n - 1.0):
            fake_load(monkeypatch, others)
            assert kernels.get_threads() == n - int(others)
            outs.append((kernels.sparse_ffn(W, W, W, rows, x, "silu"),
                         kernels.attention_decode(q, k, v, kc0.clone(), vc, pos, cos, sin, False),
                         rand_x(5, 1536, seed=6) @ rand_x(1536, 576, seed=7)))  # skinny: split along the sum
    finally:
        kernels.set_threads()
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_warmup_reports_seconds():
    s = kernels.warmup()
    assert isinstance(s, float) and s >= 0


def test_drop_compiled_removes_only_the_cpu_kernels(tmp_path):
    """numba keys a kernel's cache on cpu.py's text alone, so when the stamp says a kernel source changed
    (simd.py included) the compiling child drops cpu.py's compiled kernels and nothing else."""
    names = ["cpu.matvec-296.py311.nbi", "cpu.matvec-296.py311.1.nbc", "other.f-3.py311.nbi",
             "hetinfer-kernels-0123456789abcdef.ready"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    kernels.drop_compiled(tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(names[2:])
    kernels.drop_compiled(tmp_path / "missing")  # no cache directory yet: nothing to drop


def test_compiling_children_run_only_the_steps_no_other_has_claimed(tmp_path):
    """The processes compiling a cold cache share `_compile_steps` out by claiming each with a file: a child
    finding every step but one claimed runs that one alone (here loading it from the compiled cache), claims
    it, and says when it is done."""
    names = [name for name, _ in numba_cache._compile_steps(False)]
    assert len(set(names)) == len(names) and {"attention_f32", "dense", "gather_matvec"} <= set(names)
    for name in names:
        if name != "gather_matvec":
            (tmp_path / name).touch()
    code = f"""
from hetinfer.kernels import cpu, numba_cache
numba_cache._compile_claimed({str(tmp_path)!r})
print(sorted(name for name, k in vars(cpu).items() if getattr(k, "signatures", None)))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["['gather_matvec']"], p.stdout
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(names + ["gather_matvec.done"])


def test_one_process_compiles_with_a_numba_whose_cache_saves_cannot_be_locked(monkeypatch):
    from numba.core import caching

    assert numba_cache._index_saves() is caching.IndexDataCacheFile  # the numba this project pins
    monkeypatch.delattr(caching, "IndexDataCacheFile")
    assert numba_cache._index_saves() is None and numba_cache._compile_jobs() == 1


def test_dense_warmup_loads_only_the_dense_kernels():
    """`warmup(dense_only=True)` in a fresh process (the cache is compiled): the dense kernels are loaded, the
    sparse ones are not, and one called afterwards loads from numba's cache, never compiling in-process."""
    code = """
import numpy as np
from hetinfer import kernels
from hetinfer.kernels import cpu
from hetinfer.tensors import quantize
kernels.warmup(dense_only=True)
print(len(cpu.dense_ffn.signatures) > 0, len(cpu.attention_block.signatures) > 0, len(cpu.sparse_ffn.signatures))
W = quantize(np.ones((8, 64), np.float32), "q4_1")
kernels.sparse_ffn(W, W, W, np.array([1, 3]), np.ones((1, 64), np.float32), "silu")
print(len(cpu.sparse_ffn.signatures), cpu.sparse_ffn.stats.cache_hits and not cpu.sparse_ffn.stats.cache_misses)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "True", "0", "1", "True"], p.stdout


def test_dense_warmup_loads_every_kernel_a_dense_session_calls(model_path):
    """After `warmup(dense_only=True)` (as `generate`/`run` start), a dense session's short and long prompts and
    its decode call no kernel signature warmup did not load (one loaded later, when numba's cache lacks it, is
    compiled in the middle of the user's first prompt)."""
    code = f"""
from hetinfer import kernels
from hetinfer.generate import Session
from hetinfer.kernels import cpu
from hetinfer.loader import load_model
kernels.warmup(dense_only=True)
loaded = lambda: {{name: len(k.signatures) for name, k in vars(cpu).items() if hasattr(k, "signatures")}}
before = loaded()
m = load_model({model_path!r})
for kv in ("f32", "f16"):
    s = Session(m, n_ctx=64, kv=kv)
    m.transformer.forward(list(range(100, 103)), s.cache, None)
    m.transformer.forward(list(range(200, 240)), s.cache, None)
    m.transformer.forward([5], s.cache, None)
print({{name: n - before[name] for name, n in loaded().items() if n != before[name]}})
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "{}", p.stdout


# An AVX2 target without VNNI (numba's "haswell", its features named, as for a portable cache).
AVX2_ONLY = {"NUMBA_CPU_NAME": "haswell",
             "NUMBA_CPU_FEATURES": "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,"
                                   "+popcnt,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3"}


@pytest.mark.skipif(not kernels.simd._VNNI, reason="this CPU has no VNNI: every other test runs the AVX2 dots")
def test_vnni_dots_equal_the_avx2_dots(tmp_path):
    """On a CPU with VNNI the block dots use vpdpbusd; compiled for AVX2 without it (in a child process, its own
    numba cache), they use vpmaddubsw and vpmaddwd: the same integer sums, so every block format's GEMV, and
    gate_up (two rows per loop), is bit-identical; also with Q4 rows packed in groups of 8 (40 rows: 5 groups)."""
    code = """
import sys
import numpy as np
from hetinfer import kernels
from hetinfer.tensors import quantize
assert kernels.simd._AVX2 and not kernels.simd._VNNI
rng = np.random.default_rng(0)
x = rng.standard_normal((1, 96)).astype(np.float32)
out = {}
for q in ("q8_0", "q4_0", "q4_1"):
    W, U = (quantize(rng.standard_normal((40, 96)).astype(np.float32), q) for _ in range(2))
    out[q], out[q + " gate_up"] = kernels.linear(W, x), kernels.gate_up(W, U, x, "silu")
    for M in (W, U):
        M.data.flags.writeable = False  # packed where the format allows
    out[q + " packed"], out[q + " packed gate_up"] = kernels.linear(W, x), kernels.gate_up(W, U, x, "silu")
np.savez(sys.argv[1], **out)
"""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), **AVX2_ONLY)
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "avx2.npz")], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 96)).astype(np.float32)
    avx2 = np.load(tmp_path / "avx2.npz")
    for q in ("q8_0", "q4_0", "q4_1"):
        W, U = (quantize(rng.standard_normal((40, 96)).astype(np.float32), q) for _ in range(2))
        assert np.array_equal(kernels.linear(W, x), avx2[q]), q
        assert np.array_equal(kernels.gate_up(W, U, x, "silu"), avx2[q + " gate_up"]), q
        for M in (W, U):
            M.data.flags.writeable = False
        assert np.array_equal(kernels.linear(W, x), avx2[q + " packed"]), q
        assert np.array_equal(kernels.gate_up(W, U, x, "silu"), avx2[q + " packed gate_up"]), q


def test_convert():
    W = rand_q(32, 64, "q4_1")
    assert kernels.convert(W, "native") is W
    for qtype in ("f16", "f32"):
        C = kernels.convert(W, qtype)
        assert C.qtype == qtype and np.allclose(C.dequantize(), W.dequantize(), rtol=2**-10, atol=0)
    with pytest.raises(ValueError, match="native, f16 or f32"):
        kernels.convert(W, "q2_k")


# ---------------------------------------------------------------------------------------------
# real SmolLM2 weights (read-only views into the mmapped GGUF)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(model_path):
    from hetinfer.gguf_file import GGUFModel

    g = GGUFModel(model_path)
    names = {"gate": "blk.5.ffn_gate.weight", "up": "blk.5.ffn_up.weight", "down": "blk.5.ffn_down.weight",
             "q": "blk.5.attn_q.weight", "k": "blk.5.attn_k.weight", "embed": "token_embd.weight"}
    return {k: g.weight(v) for k, v in names.items()}


@pytest.mark.slow
def test_real_weights_native(real):
    assert real["gate"].qtype == "q4_1" and real["embed"].qtype == "q8_0" and not real["gate"].data.flags.writeable
    x, x_ff = rand_x(1, 576), rand_x(1, 1536)
    for key in ("gate", "q", "k", "embed"):
        W = real[key]
        assert_close(kernels.linear(W, x), ref.linear(W, x.numpy()), bound_linear(W, x.numpy()))
    W = real["down"]
    assert_close(kernels.linear(W, x_ff), ref.linear(W, x_ff.numpy()), bound_linear(W, x_ff.numpy()))
    q, k = kernels.linears((real["q"], real["k"]), x)
    assert_close(k, ref.linear(real["k"], x.numpy()), bound_linear(real["k"], x.numpy()))
    ids = torch.tensor([0, 1, 49151, 1234])
    assert np.array_equal(kernels.embedding(real["embed"], ids).numpy(), real["embed"].dequantize(ids.numpy()))


@pytest.mark.slow
@pytest.mark.parametrize("qtype", FORMATS)
def test_real_weights_sparse_every_format(real, qtype):
    """Real SmolLM2 layer-5 FFN converted to each format; a random half of the neurons active."""
    Wg, Wu = (real[k] if qtype == "q4_1" else quantize(real[k].dequantize(), qtype) for k in ("gate", "up"))
    Wd_t = kernels.transpose_down(real["down"], qtype if qtype in ("f32", "f16", "bf16", "q8_0") else None)
    rows = np.random.default_rng(0).permutation(1536)[:768]
    x = rand_x(1, 576)
    h_ref = ref.gate_up(Wg, Wu, x.numpy(), "silu")[0]
    assert_close(kernels.gather_matvec(Wg, rows, x[0]), ref.gather_matvec(Wg, rows, x.numpy()[0]),
                 bound_linear(Wg, x.numpy()[0], rows))
    y, h = kernels.sparse_ffn(Wg, Wu, Wd_t, rows, x, "silu", return_act=True)
    want_y, want_h = ref.sparse_ffn(Wg, Wu, Wd_t, rows, x.numpy(), "silu")
    np.testing.assert_allclose(h.numpy(), want_h, rtol=1e-4, atol=1e-5 * np.abs(h_ref).max())
    np.testing.assert_allclose(y[0].numpy(), want_y, rtol=1e-4, atol=1e-5 * np.abs(want_y).max())
    y2 = torch.zeros(576)
    kernels.scatter_axpy(Wd_t, rows, torch.from_numpy(want_h.astype(np.float32)), y2)
    np.testing.assert_allclose(y2.numpy(), want_y, rtol=1e-4, atol=1e-5 * np.abs(want_y).max())


@pytest.mark.slow
def test_real_weights_read_in_place_from_bundled_records(real):
    """SmolLM2's layer-5 FFN (Q4_1 gate/up, Q8_0 neuron-major down) bundled per neuron gives what the
    separate matrices give, bit for bit."""
    Wd_t = kernels.transpose_down(real["down"])
    Bg, Bu, Bd = bundled(real["gate"], real["up"], Wd_t)
    rows, x = np.sort(np.random.default_rng(0).permutation(1536)[:768]), rand_x(1, 576)
    want = kernels.sparse_ffn(real["gate"], real["up"], Wd_t, rows, x, "silu")
    assert torch.equal(kernels.sparse_ffn(Bg, Bu, Bd, rows, x, "silu"), want)


@pytest.mark.slow
def test_real_down_transposed_to_q8_0(real):
    """The neuron-major copy of the Q4_1 down projection, requantized to q8_0: the bound of
    `assert_requant_error`, and its relative RMS error (measured 0.0055; f16 would be 0.0002)."""
    src = real["down"].dequantize().T
    Wt = kernels.transpose_down(real["down"])
    assert Wt.qtype == "q8_0" and Wt.shape == (1536, 576)
    assert_requant_error(src, Wt)
    rel_rms = np.sqrt(np.mean((Wt.dequantize() - src) ** 2) / np.mean(src**2))
    assert rel_rms < 0.01


# ---------------------------------------------------------------------------------------------
# decoder glue: RMSNorm, fused decode attention (float32; tolerances relative to the values' scale)
# ---------------------------------------------------------------------------------------------


def test_rms_norm():
    x, w = rand_x(3, 576), rand_x(576, seed=2)
    np.testing.assert_allclose(kernels.rms_norm(x, w, 1e-5).numpy(), ref.rms_norm(x.numpy(), w.numpy(), 1e-5),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("pos", [0, 1, 37])
def test_attention_decode(interleaved, pos):
    n_ctx, KV, H, hd = 40, 3, 9, 64
    rng = np.random.default_rng(pos)
    kc = torch.from_numpy(rng.standard_normal((n_ctx, KV, hd), dtype=np.float32))
    vc = torch.from_numpy(rng.standard_normal((n_ctx, KV, hd), dtype=np.float32))
    q, k, v = rand_x(1, H * hd, seed=3), rand_x(1, KV * hd, seed=4), rand_x(1, KV * hd, seed=5)
    ang = (pos + 0.5) * rng.uniform(0, 1, hd // 2)
    cos, sin = torch.from_numpy(np.cos(ang).astype(np.float32)), torch.from_numpy(np.sin(ang).astype(np.float32))
    want, want_k, want_v = ref.attention_decode(q.numpy(), k.numpy(), v.numpy(), kc.numpy(), vc.numpy(), pos,
                                                cos.numpy(), sin.numpy(), interleaved)
    kc0 = kc.clone()
    out = kernels.attention_decode(q, k, v, kc, vc, pos, cos, sin, interleaved)
    assert out.shape == (1, H * hd)
    np.testing.assert_allclose(out[0].numpy(), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(kc.numpy(), want_k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vc.numpy(), want_v, rtol=0, atol=0)
    assert torch.equal(kc[pos + 1:], kc0[pos + 1:])  # nothing after pos is touched
    with pytest.raises(ValueError, match="outside the cache"):
        kernels.attention_decode(q, k, v, kc, vc, n_ctx, cos, sin, interleaved)


def test_attention_exp_is_exact_to_float32():
    """The vectorizable exp of the softmax (x <= 0) against float64 exp: within 3e-7 relative down to
    -87, and the far tail (where it clamps) no larger than e^-87 = 1.6e-38."""
    from numba import njit

    @njit
    def ev(x, out):
        for i in range(x.shape[0]):
            out[i] = cpu._exp_neg(x[i])

    x = -np.linspace(0, 87, 100001, dtype=np.float32)
    out = np.empty_like(x)
    ev(x, out)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - want) / want) < 3e-7
    tail = np.array([-88, -1e4, -np.inf], np.float32)
    ev(tail, out[:3])
    assert np.all((0 <= out[:3]) & (out[:3] <= 1.7e-38))


@pytest.mark.parametrize("pos,nchunks", [(2, 7), (150, 1), (150, 2), (699, 3)])
def test_attention_decode_split_over_positions(pos, nchunks):
    """Positions split into spans (one per thread) and merged by their softmax maxima give the
    reference's attention, also with more spans than positions (empty spans)."""
    n_ctx, KV, H, hd = 700, 3, 9, 64
    rng = np.random.default_rng(pos)
    kc = rng.standard_normal((n_ctx, KV, hd), dtype=np.float32) * 2  # scores spread wide: merging matters
    vc = rng.standard_normal((n_ctx, KV, hd), dtype=np.float32)
    q, k, v = (rng.standard_normal(n, dtype=np.float32) for n in (H * hd, KV * hd, KV * hd))
    ang = (pos + 0.5) * rng.uniform(0, 1, hd // 2)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    want = ref.attention_decode(q, k, v, kc, vc, pos, cos, sin, False)[0]
    out = np.empty((H, hd), np.float32)
    cpu.attention_decode(q, k, v, kc, vc, pos, cos, sin, False, out, nchunks)
    np.testing.assert_allclose(out.reshape(-1), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hd,H,KV", [(128, 8, 2), (80, 4, 4), (40, 6, 1)])
@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("pos,nchunks", [(0, 1), (18, 1), (300, 2)])
def test_attention_decode_head_sizes(hd, H, KV, kv, pos, nchunks):
    """Every path of a span against the reference: scores 16 positions at a time (head size a multiple of 16)
    or 4 at a time, values 64 dimensions at a time in blocks of positions (a multiple of 64) or 4 positions
    at a time; query groups of 4 and 6 heads and plain multi-head; positions that leave remainders."""
    rng = np.random.default_rng(hd + pos)
    dt = np.float32 if kv == "f32" else np.float16
    kc = (rng.standard_normal((320, KV, hd), dtype=np.float32) * 2).astype(dt)
    vc = rng.standard_normal((320, KV, hd), dtype=np.float32).astype(dt)
    q, k, v = (rng.standard_normal(n, dtype=np.float32) for n in (H * hd, KV * hd, KV * hd))
    ang = (pos + 0.5) * rng.uniform(0, 1, hd // 2)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    out = np.empty((H, hd), np.float32)
    bits = (lambda a: a) if kv == "f32" else (lambda a: a.view(np.uint16))
    cpu.attention_decode(q, k, v, bits(kc), bits(vc), pos, cos, sin, False, out, nchunks)
    qr = ref.rope(q.reshape(H, hd), cos, sin, False)
    want = ref.attention(qr, kc[: pos + 1], vc[: pos + 1])  # over the entries the kernel wrote at pos
    np.testing.assert_allclose(out.reshape(-1), want.reshape(-1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("interleaved,pos,nchunks", [(False, 0, 1), (True, 37, 1), (False, 699, 1), (True, 699, 3)])
def test_attention_decode_f16_cache(interleaved, pos, nchunks):
    """A float16 cache: v written exactly as numpy rounds it, the rotated k within one float16 step
    of the reference's (the kernel rotates in float32, the reference in float64, so a value by a
    rounding midpoint may go either way), nothing else touched; the attention over the float16
    entries it holds equal to the float64 reference's over the same entries, in one span or several."""
    n_ctx, KV, H, hd = 700, 3, 9, 64
    rng = np.random.default_rng(pos)
    kc = (rng.standard_normal((n_ctx, KV, hd), dtype=np.float32) * 2).astype(np.float16)
    vc = rng.standard_normal((n_ctx, KV, hd), dtype=np.float32).astype(np.float16)
    q, k, v = (rng.standard_normal(n, dtype=np.float32) for n in (H * hd, KV * hd, KV * hd))
    ang = (pos + 0.5) * rng.uniform(0, 1, hd // 2)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    _, want_k, want_v = ref.attention_decode(q, k, v, kc, vc, pos, cos, sin, interleaved)
    assert want_k.dtype == want_v.dtype == np.float16
    kt, vt = torch.from_numpy(kc.copy()), torch.from_numpy(vc.copy())
    if nchunks == 1:
        out = kernels.attention_decode(*map(torch.from_numpy, (q[None], k[None], v[None])), kt, vt, pos,
                                       torch.from_numpy(cos), torch.from_numpy(sin), interleaved)[0].numpy()
    else:
        out = np.empty((H, hd), np.float32)
        cpu.attention_decode(q, k, v, kt.numpy().view(np.uint16), vt.numpy().view(np.uint16), pos, cos, sin,
                             interleaved, out, nchunks)
    assert np.array_equal(vt.numpy(), want_v)
    others = np.arange(n_ctx) != pos
    assert np.array_equal(kt.numpy()[others], kc[others])
    assert np.all(np.abs(kt.numpy()[pos].astype(np.float32) - want_k[pos]) <= np.spacing(np.abs(want_k[pos])))
    qr = ref.rope(q.reshape(H, hd), cos, sin, interleaved)
    want = ref.attention(qr, kt.numpy()[: pos + 1], vt.numpy()[: pos + 1])
    np.testing.assert_allclose(out.reshape(-1), want.reshape(-1), rtol=1e-4, atol=1e-5)


def test_attention_decode_refuses_other_caches():
    """Mixed dtypes, another dtype, a strided cache: one error naming what the cache must be."""
    q, k, v, cos, sin = torch.ones(1, 128), torch.ones(1, 64), torch.ones(1, 64), torch.ones(16), torch.zeros(16)
    for kc, vc in ((torch.zeros(4, 2, 32, dtype=torch.float16), torch.zeros(4, 2, 32)),
                   (torch.zeros(4, 2, 32, dtype=torch.bfloat16), torch.zeros(4, 2, 32, dtype=torch.bfloat16)),
                   (torch.zeros(4, 32, 2, dtype=torch.float16).transpose(1, 2), torch.zeros(4, 2, 32, dtype=torch.float16))):
        with pytest.raises(ValueError, match="float32 or float16 arrays"):
            kernels.attention_decode(q, k, v, kc, vc, 1, cos, sin, False)


@pytest.mark.parametrize("kv", [np.float32, np.float16])
@pytest.mark.parametrize("interleaved,pos,T", [(False, 0, 1), (False, 0, 7), (True, 5, 7), (False, 30, 10),
                                                (True, 3, 35), (False, 0, 37)])
@pytest.mark.parametrize("threads", [2], indirect=True)
def test_attention_prompt(kv, interleaved, pos, T, monkeypatch, threads):
    """A prompt's chunk of T tokens after `pos` cached ones: k and v written to the cache at pos..pos+T-1
    (v exactly as numpy rounds it, k within one step of the float64 rotation), nothing else touched, and
    each token's attention equal to the float64 reference's over the positions up to its own. Queries
    come in blocks of 16 here (the fewest), shared by 2 threads: past 16 tokens, several blocks."""
    monkeypatch.setattr(kernels, "PROMPT_SCORES", 1)
    n_ctx, KV, H, hd = 40, 3, 9, 64
    rng = np.random.default_rng(pos + T)
    kc = rng.standard_normal((n_ctx, KV, hd), dtype=np.float32).astype(kv)
    vc = rng.standard_normal((n_ctx, KV, hd), dtype=np.float32).astype(kv)
    q, k, v = (rng.standard_normal((T, n), dtype=np.float32) for n in (H * hd, KV * hd, KV * hd))
    ang = np.outer(np.arange(pos, pos + T) + 0.5, rng.uniform(0, 1, hd // 2))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    kc0, vc0 = kc.copy(), vc.copy()
    out = kernels.attention_prompt(q, k, v, kc, vc, pos, cos, sin, interleaved)
    assert out.shape == (T, H * hd) and type(out) is np.ndarray
    new = slice(pos, pos + T)
    want_k = ref.rope(k.reshape(T, KV, hd), cos[:, None], sin[:, None], interleaved)
    assert np.all(np.abs(kc[new].astype(np.float64) - want_k) <= np.spacing(np.abs(want_k).astype(kv)) + 1e-6)
    assert np.array_equal(vc[new], v.reshape(T, KV, hd).astype(kv))
    others = np.r_[0:pos, pos + T:n_ctx]
    assert np.array_equal(kc[others], kc0[others]) and np.array_equal(vc[others], vc0[others])
    for t in range(T):
        qr = ref.rope(q[t].reshape(H, hd), cos[t], sin[t], interleaved)
        want = ref.attention(qr, kc[: pos + t + 1], vc[: pos + t + 1])
        np.testing.assert_allclose(out[t], want.reshape(-1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="outside the cache"):
        kernels.attention_prompt(q, k, v, kc, vc, n_ctx - T + 1, cos, sin, interleaved)


@pytest.mark.slow
def test_attention_decode_matches_model_attention(model):
    """The engine's prompt attention (`attention_prompt`, a one-token chunk) and the fused decode kernel
    agree on a real layer."""
    tr, L = model.transformer, model.weights.layers[2]
    ids = model.tokenizer.encode("Memory hierarchies trade capacity for speed.")
    h = rand_x(1, 576, seed=9).numpy()
    outs = []
    for attend in (kernels.attention_prompt, kernels.attention_decode):
        cache = tr.new_cache(64)
        tr.forward(ids, cache)
        pos = cache.pos
        cos, sin = tr._rope(pos, 1)
        q, k, v = kernels.linears((L.wq, L.wk, L.wv), h)
        if attend is kernels.attention_decode:
            cos, sin = cos[0], sin[0]
        outs.append(attend(q, k, v, cache.k[2], cache.v[2], pos, cos, sin, tr.interleaved))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank", [8, 62])  # below and not a multiple of one 32-block
def test_predict_rows(rank):
    """The ids where W2 relu(W1 h) exceeds the threshold, ascending, against float64 numpy (ids whose
    logit lies within float32 rounding of the threshold may go either way); none and all at the extremes."""
    W1, W2_t, h = rand_q(rank, 96, "f32", 1), rand_q(rank, 200, "f32", 2), rand_x(96, seed=3)
    logits = np.maximum(W1.dequantize().astype(np.float64) @ h.numpy(), 0) @ W2_t.dequantize().astype(np.float64)
    thr = float(np.median(logits))
    rows = kernels.predict_rows(W1, W2_t, h, thr)
    near = np.abs(logits - thr) < 1e-4 * np.abs(logits).max()
    want = np.flatnonzero(logits > thr)
    assert rows.dtype == np.int64 and np.all(np.diff(rows) > 0)
    assert set(rows) - set(np.flatnonzero(near)) == set(want) - set(np.flatnonzero(near))
    assert len(kernels.predict_rows(W1, W2_t, h[None], 1e30)) == 0
    assert np.array_equal(kernels.predict_rows(W1, W2_t, h, -1e30), np.arange(200))
    with pytest.raises(ValueError, match="do not chain"):
        kernels.predict_rows(W1, rand_q(rank + 1, 200, "f32"), h, thr)
    with pytest.raises(ValueError, match="one token"):
        kernels.predict_rows(W1, W2_t, rand_x(2, 96), thr)


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("threads", [1, 2])
def test_predicted_ffn_is_predict_rows_then_sparse_ffn(qtype, threads, monkeypatch):
    """One call, the same arithmetic as its two calls (bit for bit), at thresholds that keep some,
    none and all of the neurons."""
    monkeypatch.setattr(kernels, "MIN_BYTES_PER_THREAD", 1)  # split even these small matrices among the threads
    W1, W2_t = rand_q(16, 64, "f32", 1), rand_q(16, 224, "f32", 2)
    Wg, Wu, Wd_t = rand_q(224, 64, qtype, 5), rand_q(224, 64, qtype, 6), kernels.transpose_down(rand_q(64, 224, qtype, 7))
    x = rand_x(1, 64)
    try:
        kernels.set_threads(threads)
        for thr in (0.0, 1e30, -1e30):
            rows = kernels.predict_rows(W1, W2_t, x, thr)
            y, n = kernels.predicted_ffn(W1, W2_t, thr, Wg, Wu, Wd_t, x, "silu")
            assert n == len(rows) and torch.equal(y, kernels.sparse_ffn(Wg, Wu, Wd_t, rows, x, "silu"))
            assert torch.equal(kernels.predicted_ffn(W1, W2_t, thr, Wg, Wu, Wd_t, x[0], "silu")[0], y[0])
        assert 0 < len(kernels.predict_rows(W1, W2_t, x, 0.0)) < 224
    finally:
        kernels.set_threads()
    with pytest.raises(ValueError, match="do not fit one FFN"):
        kernels.predicted_ffn(W1, rand_q(16, 96, "f32"), 0.0, Wg, Wu, Wd_t, x, "silu")
    with pytest.raises(ValueError, match="one token"):
        kernels.predicted_ffn(W1, W2_t, 0.0, Wg, Wu, Wd_t, rand_x(2, 64), "silu")


def one_by_one_attention(x, L, biases, kc, vc, pos, cos, sin, interleaved, eps=1e-5):
    """What attention_block does, as separate kernel calls."""
    h = kernels.rms_norm(x, L["attn_norm"], eps)
    q, k, v = kernels.linears((L["q"], L["k"], L["v"]), h)
    if biases is not None:
        q, k, v = q + biases[0], k + biases[1], v + biases[2]
    x = x + kernels.linear(L["o"], kernels.attention_decode(q, k, v, kc, vc, pos, cos, sin, interleaved))
    return x, kernels.rms_norm(x, L["ffn_norm"], eps)


def assert_same_block(got, want, got_cache, want_cache):
    """Same kernels in the same order, but the fastmath sums (norms, attention) may be vectorized
    differently once compiled into the block: equal to float32 rounding, values and cache."""
    for g, w in zip(got + (got_cache,), want + (want_cache,)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def run_attention_block(x, L, biases, kc, vc, pos, cos, sin, interleaved, eps=1e-5):
    x = x.clone()
    h = kernels.attention_block(x, L["attn_norm"], L["q"], L["k"], L["v"], L["o"], biases, kc, vc, pos, cos, sin,
                                interleaved, eps, L["ffn_norm"])
    return x, h


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("pos,bias,interleaved", [(0, False, False), (37, True, True), (300, False, True)])
def test_attention_block_matches_its_calls_one_by_one(qtype, pos, bias, interleaved):
    """One call for norm, q/k/v (+ biases), RoPE, cache write, attention, o, residual and the FFN norm:
    the same numbers as the calls made one by one, cache writes included. Position 300 attends in
    parallel spans; a q/k/v of mixed formats takes the one-by-one path and still agrees."""
    d, KV, H, hd, n_ctx = 128, 2, 4, 32, 320
    L = {"q": rand_q(H * hd, d, qtype, 1), "k": rand_q(KV * hd, d, qtype, 2), "v": rand_q(KV * hd, d, qtype, 3),
         "o": rand_q(d, H * hd, qtype, 4), "attn_norm": rand_x(d, seed=5), "ffn_norm": rand_x(d, seed=6)}
    biases = (rand_x(H * hd, seed=7), rand_x(KV * hd, seed=8), rand_x(KV * hd, seed=9)) if bias else None
    rng = np.random.default_rng(pos)
    cache = torch.from_numpy(rng.standard_normal((2, n_ctx, KV, hd), dtype=np.float32))
    ang = (pos + 0.5) * rng.uniform(0, 1, hd // 2)
    cos, sin = torch.from_numpy(np.cos(ang).astype(np.float32)), torch.from_numpy(np.sin(ang).astype(np.float32))
    x = rand_x(1, d, seed=10)
    for L_ in (L, dict(L, v=rand_q(KV * hd, d, "q8_0" if qtype != "q8_0" else "f16", 3))):
        want_cache, got_cache = cache.clone(), cache.clone()
        want = one_by_one_attention(x, L_, biases, want_cache[0], want_cache[1], pos, cos, sin, interleaved)
        got = run_attention_block(x, L_, biases, got_cache[0], got_cache[1], pos, cos, sin, interleaved)
        assert_same_block(got, want, got_cache, want_cache)
    with pytest.raises(ValueError, match="outside the cache"):
        run_attention_block(x, L, biases, cache[0], cache[1], n_ctx, cos, sin, interleaved)
    with pytest.raises(ValueError, match="must be \\[1, 128\\]"):
        run_attention_block(rand_x(1, 64), L, biases, cache[0], cache[1], pos, cos, sin, interleaved)


@pytest.mark.parametrize("pos", [0, 300])
def test_attention_block_f16_cache(pos):
    """attention_block over a float16 cache: the numbers of its calls one by one over the same cache,
    the written entries within one float16 step (a float32 rounding difference of k or v, see
    assert_same_block, may round to the neighbouring float16), the cache left float16."""
    d, KV, H, hd, n_ctx = 128, 2, 4, 32, 320
    L = {"q": rand_q(H * hd, d, "q8_0", 1), "k": rand_q(KV * hd, d, "q8_0", 2), "v": rand_q(KV * hd, d, "q8_0", 3),
         "o": rand_q(d, H * hd, "q8_0", 4), "attn_norm": rand_x(d, seed=5), "ffn_norm": rand_x(d, seed=6)}
    rng = np.random.default_rng(pos)
    cache = torch.from_numpy(rng.standard_normal((2, n_ctx, KV, hd), dtype=np.float32)).half()
    ang = (pos + 0.5) * rng.uniform(0, 1, hd // 2)
    cos, sin = torch.from_numpy(np.cos(ang).astype(np.float32)), torch.from_numpy(np.sin(ang).astype(np.float32))
    x = rand_x(1, d, seed=10)
    want_cache, got_cache = cache.clone(), cache.clone()
    want = one_by_one_attention(x, L, None, want_cache[0], want_cache[1], pos, cos, sin, False)
    got = run_attention_block(x, L, None, got_cache[0], got_cache[1], pos, cos, sin, False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert got_cache.dtype == torch.float16 and not torch.equal(got_cache[:, pos], cache[:, pos])
    torch.testing.assert_close(got_cache.float(), want_cache.float(), rtol=2**-10, atol=0)


@pytest.mark.parametrize("qtype,read_only", [("q4_1", False), ("q4_1", True), ("f16", False)],
                         ids=["q4_1", "q4_1-packed", "f16"])
@pytest.mark.parametrize("kv", [np.float32, np.float16])
def test_bound_steps_equal_the_calls_they_bind(qtype, read_only, kv):
    """attention_step, dense_ffn_step and threshold_ffn_step check a layer's weights once, then call the kernel
    directly: bit for bit what attention_block, dense_ffn and threshold_ffn give, cache writes included, for
    numpy inputs (the direct path) and torch ones (the unbound call); a bad position or cache is still an error.
    Read-only Q4 weights (a mapped model file) run packed in both."""
    d, KV, H, hd, n_ctx, pos, n_ff = 128, 2, 4, 32, 320, 37, 96
    q = lambda rows, cols, seed: rand_q(rows, cols, qtype, seed, read_only)
    L = {"q": q(H * hd, d, 1), "k": q(KV * hd, d, 2), "v": q(KV * hd, d, 3),
         "o": q(d, H * hd, 4), "attn_norm": rand_x(d, seed=5).numpy(), "ffn_norm": rand_x(d, seed=6).numpy()}
    biases = (rand_x(H * hd, seed=7).numpy(), rand_x(KV * hd, seed=8).numpy(), rand_x(KV * hd, seed=9).numpy())
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((2, n_ctx, KV, hd)).astype(kv)
    ang = (pos + 0.5) * rng.uniform(0, 1, hd // 2)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    x = rand_x(1, d, seed=10).numpy()
    step = kernels.attention_step(L["attn_norm"], L["q"], L["k"], L["v"], L["o"], biases, L["ffn_norm"], 1e-5, True)
    assert not any("_dense_info" in L[k].__dict__ for k in "qkvo")  # binding packs nothing: packing reads the weights
    for wrap in (np.array, torch.from_numpy):
        got_x, got_cache, want_x, want_cache = wrap(x.copy()), wrap(cache.copy()), wrap(x.copy()), wrap(cache.copy())
        got = step(got_x, got_cache[0], got_cache[1], pos, cos, sin)
        want = kernels.attention_block(want_x, L["attn_norm"], L["q"], L["k"], L["v"], L["o"], biases, want_cache[0],
                                       want_cache[1], pos, cos, sin, True, 1e-5, L["ffn_norm"])
        assert type(got) is type(want) and all(np.array_equal(np.asarray(g), np.asarray(w)) for g, w in
                                               ((got, want), (got_x, want_x), (got_cache, want_cache)))
    with pytest.raises(ValueError, match="outside the cache"):
        step(x.copy(), cache[0], cache[1], n_ctx, cos, sin)
    with pytest.raises(ValueError, match="do not fit"):
        step(x.copy(), *np.ascontiguousarray(cache[:, :, :1]), pos, cos, sin)

    Wg, Wu, Wd = q(n_ff, d, 11), q(n_ff, d, 12), q(d, n_ff, 13)
    ffn = kernels.dense_ffn_step(Wg, Wu, Wd, "silu")
    assert not any("_dense_info" in W.__dict__ for W in (Wg, Wu, Wd))  # an offloaded model's FFN is never read
    assert all(packed(W) == read_only for W in (L["q"], L["k"], L["v"], L["o"]))
    for h in (x, rand_x(3, d).numpy(), torch.from_numpy(x)):  # one token, a prompt, a torch tensor
        assert np.array_equal(np.asarray(ffn(h)), np.asarray(kernels.dense_ffn(Wg, Wu, Wd, h, "silu")))
    assert all(packed(W) == read_only for W in (Wg, Wu, Wd))
    Wd_t = kernels.transpose_down(Wd)
    t = float(np.median(np.abs(kernels.gate_up(Wg, Wu, x, "silu"))))
    thr = kernels.threshold_ffn_step(Wg, Wu, Wd_t, "silu", t)
    for h in (x, x[0]):
        (y, kept), (want_y, want_kept) = thr(h), kernels.threshold_ffn(Wg, Wu, Wd_t, h, "silu", t)
        assert kept == want_kept == n_ff // 2 and y.shape == h.shape and np.array_equal(y, want_y)
    with pytest.raises(ValueError, match="unknown activation"):
        kernels.dense_ffn_step(Wg, Wu, Wd, "swish")
    with pytest.raises(ValueError, match="do not form an FFN"):
        kernels.dense_ffn_step(Wg, Wu, rand_q(d, 64, qtype), "silu")


@pytest.mark.slow
def test_attention_block_on_real_layer(model):
    """SmolLM2's layer 5 after a real prompt: the one-call block equals its calls one by one."""
    tr, W = model.transformer, model.weights.layers[5]
    L = {"q": W.wq, "k": W.wk, "v": W.wv, "o": W.wo, "attn_norm": W.attn_norm, "ffn_norm": W.ffn_norm}
    cache = tr.new_cache(64)
    tr.forward(model.tokenizer.encode("Memory hierarchies trade capacity for speed."), cache)
    pos = cache.pos
    cos, sin = (t[0] for t in tr._rope(pos, 1))
    x = rand_x(1, model.config.d_model, seed=11)
    k5, v5 = torch.from_numpy(cache.k[5]), torch.from_numpy(cache.v[5])
    kc, vc = k5.clone(), v5.clone()
    want = one_by_one_attention(x, L, None, kc, vc, pos, cos, sin, tr.interleaved, model.config.norm_eps)
    got = run_attention_block(x, L, None, k5, v5, pos, cos, sin, tr.interleaved, model.config.norm_eps)
    assert_same_block(got, want, torch.stack((k5, v5))[:, : pos + 1], torch.stack((kc, vc))[:, : pos + 1])
