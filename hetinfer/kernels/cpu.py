"""CPU kernels: numba, reading weights in their stored format (f32/f16/bf16/q8_0/q4_0/q4_1).

Every kernel walks a row 32 weights at a time. The inner step ("dot 32 weights with x / add
them into y") is written as a few lines of LLVM vector IR (`_make_dot`, `_make_xdot`,
`_make_axpy` below) because LLVM does not vectorize the numba-level block loop on its own
(it fully unrolls the 32-step loop into a serial FMA chain, ~3 GB/s). Float formats decode a
block into one <32 x float>; block formats (q8_0, q4_0, q4_1) dot their integer weights with
x quantized once per call to 8 bits per block of 32 (`quantize_x`, as llama.cpp does), integer
multiply-adds per block (vpmaddubsw/vpmaddwd with AVX2) and one float FMA: decoding nibbles to
floats made the Q4 GEMVs compute-bound. Float formats stay float and exact. Dots
keep 4 independent accumulators, so a row streams the weights at cache/memory speed.

Numba code around it is plain: rows are split into `nchunks` equal chunks run under
`prange` (every row costs the same, so equal counts are balanced work, also for sparse
row sets), or run directly when nchunks == 1; sums that several chunks add into (down
projections) use one partial vector per chunk, added up at the end. Kernels take the
row format as an integer code (`FMT`), weights as their raw uint8 bytes
[rows, row_bytes] (each row contiguous; rows `strides[0]` apart, so a view into records that
bundle several matrices' rows is read in place), and float32 arrays for activations. The Python-facing wrappers live
in `hetinfer/kernels/__init__.py`.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# Format codes used inside the kernels; bytes per 32 weights.
F32, F16, BF16, Q8_0, Q4_0, Q4_1 = range(6)
FMT = {"f32": F32, "f16": F16, "bf16": BF16, "q8_0": Q8_0, "q4_0": Q4_0, "q4_1": Q4_1}
ACT = {"silu": 0, "relu": 1, "gelu": 2}

# ---------------------------------------------------------------------------------------------
# LLVM IR building blocks
# ---------------------------------------------------------------------------------------------
_N = 32  # weights per block and per vector step
_F32, _HALF = ir.FloatType(), ir.HalfType()
_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_VF = ir.VectorType(_F32, _N)
_UNROLL = 4  # independent accumulators in a dot: hides the FMA latency between blocks


def _splat(b: ir.IRBuilder, s: ir.Value, n: int = _N) -> ir.Value:
    v = b.insert_element(ir.Constant(ir.VectorType(s.type, n), ir.Undefined), s, ir.Constant(_I32, 0))
    return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), [0] * n))


def _load(b: ir.IRBuilder, p: ir.Value, off: int, ty: ir.Type) -> ir.Value:
    """Unaligned load of `ty` at byte `off` of the i8* `p`."""
    q = b.gep(p, [ir.Constant(_I64, off)]) if off else p
    return b.load(b.bitcast(q, ty.as_pointer()), align=1)


def _fma(b: ir.IRBuilder, x: ir.Value, y: ir.Value, z: ir.Value) -> ir.Value:
    t = x.type
    fnty = ir.FunctionType(t, [t, t, t])
    return b.call(cgutils.get_or_insert_function(b.module, fnty, f"llvm.fmuladd.v{t.count}f32"), [x, y, z])


def _scale(b: ir.IRBuilder, p: ir.Value, off: int) -> ir.Value:
    return b.fpext(_load(b, p, off, _HALF), _F32)


def _nibbles(b: ir.IRBuilder, p: ir.Value, off: int) -> ir.Value:
    """16 packed bytes -> <32 x i8>: low nibbles are weights 0..15, high nibbles 16..31."""
    q = _load(b, p, off, ir.VectorType(_I8, 16))
    lo = b.and_(q, ir.Constant(q.type, [15] * 16))
    hi = b.lshr(q, ir.Constant(q.type, [4] * 16))
    return b.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, _N), list(range(_N))))


def _dec_f32(b, p):
    return _load(b, p, 0, _VF)


def _dec_f16(b, p):
    return b.fpext(_load(b, p, 0, ir.VectorType(_HALF, _N)), _VF)


def _dec_bf16(b, p):
    u = b.zext(_load(b, p, 0, ir.VectorType(_I16, _N)), ir.VectorType(_I32, _N))
    return b.bitcast(b.shl(u, ir.Constant(u.type, [16] * _N)), _VF)


def _dec_q8_0(b, p):  # f16 d, int8 q[32]: w = d * q
    return b.fmul(b.sitofp(_load(b, p, 2, ir.VectorType(_I8, _N)), _VF), _splat(b, _scale(b, p, 0)))


def _dec_q4_0(b, p):  # f16 d, nibbles: w = d * (q - 8), q - 8 taken in int8
    q = b.sub(_nibbles(b, p, 2), ir.Constant(ir.VectorType(_I8, _N), [8] * _N))
    return b.fmul(b.sitofp(q, _VF), _splat(b, _scale(b, p, 0)))


def _dec_q4_1(b, p):  # f16 d, f16 m, nibbles: w = d * q + m
    return _fma(b, b.uitofp(_nibbles(b, p, 4), _VF), _splat(b, _scale(b, p, 0)), _splat(b, _scale(b, p, 2)))


# (decoder, bytes per 32 weights) per format code
_DECODERS = [(_dec_f32, 128), (_dec_f16, 64), (_dec_bf16, 64), (_dec_q8_0, 34), (_dec_q4_0, 18), (_dec_q4_1, 20)]


# Block formats dot their integer weights with x quantized once per call to 8 bits per block of 32
# (`quantize_x`, llama.cpp's q8_0/q8_1 activations): int8 q[32] plus the floats (d, s = d * sum(q)).
_V8F, _V8I = ir.VectorType(_F32, 8), ir.VectorType(_I32, 8)
_VB = ir.VectorType(_I8, _N)
_VW = ir.VectorType(_I16, 16)


def _targets_avx2() -> bool:
    """Whether numba compiles for a CPU with AVX2: the host, unless NUMBA_CPU_NAME names another target
    (e.g. "generic" for a portable cache; its features are then only those in NUMBA_CPU_FEATURES). The
    on-disk cache is keyed by the same CPU name and features, so a cached kernel always matches."""
    feats = (numba.config.CPU_FEATURES or "") if numba.config.CPU_NAME else llvm.get_host_cpu_features().flatten()
    return "+avx2" in feats.split(",")


_AVX2 = _targets_avx2()


def _iweights(fmt: int, b: ir.IRBuilder, p: ir.Value) -> ir.Value:
    """A block's integer weights as <32 x i8>: q8_0 q (signed), q4_0 and q4_1 q in 0..15 (q4_0's - 8
    is applied through the block sum of x)."""
    if fmt == Q8_0:
        return _load(b, p, 2, _VB)
    return _nibbles(b, p, 4 if fmt == Q4_1 else 2)


def _idot(fmt: int, b: ir.IRBuilder, w: ir.Value, xq: ir.Value) -> ir.Value:
    """Exact <8 x i32> partial sums of the block's weights w (`_iweights`) times the int8 x block xq
    (|xq| <= 127). AVX2: vpmaddubsw (unsigned x signed bytes -> int16 pair sums, at most
    2 * 128 * 127 < 2^15: never saturates; q8_0 takes |w| and moves w's sign onto x, as llama.cpp),
    then vpmaddwd with ones. Elsewhere the sign-extend, multiply, add pattern."""
    if _AVX2:
        if fmt == Q8_0:
            xs = _call(b, "llvm.x86.avx2.psign.b", _VB, xq, w)
            w = _call(b, "llvm.abs.v32i8", _VB, w, ir.Constant(ir.IntType(1), 0))
            xq = xs
        p16 = _call(b, "llvm.x86.avx2.pmadd.ub.sw", _VW, w, xq)
        return _call(b, "llvm.x86.avx2.pmadd.wd", _V8I, p16, ir.Constant(_VW, [1] * 16))
    vi32 = ir.VectorType(_I32, _N)
    wi = b.sext(w, vi32) if fmt == Q8_0 else b.zext(w, vi32)
    prod = b.mul(wi, b.sext(xq, vi32))

    def half(v, n, first):
        return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(first, first + n))))

    s16 = b.add(half(prod, 16, 0), half(prod, 16, 16))
    return b.add(half(s16, 8, 0), half(s16, 8, 8))


def _for(b: ir.IRBuilder, start, stop, step: int, init: list, body) -> tuple:
    """`for i in range(start, stop - step + 1, step)` carrying `init` values; returns (i, values) at exit."""
    pre = b.block
    head, loop, done = b.append_basic_block("head"), b.append_basic_block("loop"), b.append_basic_block("done")
    b.branch(head)
    b.position_at_end(head)
    i = b.phi(_I64)
    i.add_incoming(start, pre)
    vals = [b.phi(v.type) for v in init]
    for phi, v in zip(vals, init):
        phi.add_incoming(v, pre)
    nxt = b.add(i, ir.Constant(_I64, step))
    b.cbranch(b.icmp_signed("<=", nxt, stop), loop, done)
    b.position_at_end(loop)
    new = body(i, vals)
    i.add_incoming(nxt, b.block)
    for phi, v in zip(vals, new):
        phi.add_incoming(v, b.block)
    b.branch(head)
    b.position_at_end(done)
    return i, vals


def _ptr(context, builder, ty, arr, off, as_bytes: bool) -> ir.Value:
    data = context.make_array(ty)(context, builder, arr).data
    if as_bytes:
        data = builder.bitcast(data, _I8.as_pointer())
    return builder.gep(data, [off])


def _prefetch_step(b: ir.IRBuilder, pp: ir.Value, i: ir.Value, nbytes: int, unroll: int) -> None:
    """Hint into L1 the lines of bytes [i * nbytes, (i + unroll) * nbytes) of the row at `pp`, the row
    read `ahead` rows later: a few lines per loop step, as fast as the current row is consumed. Hinting a
    whole row at once stalls the core on its line-fill buffers (~16) whenever the row is not yet in L2,
    which is every row of a sparse op; spread out, the hints cost ~nothing and gather_matvec over 20% of
    the rows of 11008x4096 q4_1 ran 28% faster."""
    fnty = ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
    fn = cgutils.get_or_insert_function(b.module, fnty, "llvm.prefetch.p0")
    base = b.gep(pp, [b.mul(i, ir.Constant(_I64, nbytes))])
    for j in range(0, unroll * nbytes, 64):
        b.call(fn, [b.gep(base, [ir.Constant(_I64, j)]), ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                    ir.Constant(_I32, 1)])  # read, keep in every cache level, data


def _make_dot(fmt: int):
    decode, nbytes = _DECODERS[fmt]

    @intrinsic
    def dot(typingctx, w, woff, x, xoff, nblocks, pfoff):
        """sum over `nblocks` blocks of w[woff bytes ..] * x[xoff ..] -> float32, hinting the row at
        w[pfoff bytes ..] into the cache on the way (`_prefetch_step`)."""
        sig = types.float32(w, types.intp, x, types.intp, types.intp, types.intp)

        def codegen(context, b, sig, args):
            wp = _ptr(context, b, sig.args[0], args[0], args[1], True)
            xp = _ptr(context, b, sig.args[2], args[2], args[3], False)
            pp = _ptr(context, b, sig.args[0], args[0], args[5], True)

            def step(unroll):
                def body(i, accs):
                    _prefetch_step(b, pp, i, nbytes, unroll)
                    out = []
                    for u, acc in enumerate(accs):
                        k = b.add(i, ir.Constant(_I64, u))
                        w_ = decode(b, b.gep(wp, [b.mul(k, ir.Constant(_I64, nbytes))]))
                        xv = b.load(b.bitcast(b.gep(xp, [b.mul(k, ir.Constant(_I64, _N))]), _VF.as_pointer()), align=4)
                        out.append(_fma(b, w_, xv, acc))
                    return out
                return body

            zero = ir.Constant(_VF, None)
            i, accs = _for(b, ir.Constant(_I64, 0), args[4], _UNROLL, [zero] * _UNROLL, step(_UNROLL))
            acc = accs[0]
            for a in accs[1:]:
                acc = b.fadd(acc, a)
            _, (acc,) = _for(b, i, args[4], 1, [acc], step(1))
            fnty = ir.FunctionType(_F32, [_F32, _VF])
            red = cgutils.get_or_insert_function(b.module, fnty, "llvm.vector.reduce.fadd.v32f32")
            return b.call(red, [ir.Constant(_F32, 0.0), acc], fastmath=("reassoc",))

        return sig, codegen

    return dot


def _call(b: ir.IRBuilder, name: str, ret: ir.Type, *args: ir.Value, fastmath=()) -> ir.Value:
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return b.call(cgutils.get_or_insert_function(b.module, fnty, name), args, fastmath=fastmath)


def _make_xdot(fmt: int):
    nbytes = _DECODERS[fmt][1]

    @intrinsic
    def xdot(typingctx, w, woff, xq, xs, xb, nblocks, pfoff):
        """sum over `nblocks` blocks of w[woff bytes ..] . x, x given as `quantize_x` blocks xb, xb + 1, ...

        llama.cpp's scheme: per block an exact int32 dot of the integer weights with the int8 x (`_idot`),
        scaled in float by d_w * d_x into 4 independent <8 x float> accumulators; q4_1 adds m_w * s_x
        and q4_0 -8 * d_w * s_x (s_x = d_x * sum(q_x), its weights being d_w * (q - 8)). The row at
        w[pfoff bytes ..] is hinted into the cache on the way (`_prefetch_step`)."""
        sig = types.float32(w, types.intp, xq, xs, types.intp, types.intp, types.intp)

        def codegen(context, b, sig, args):
            wp = _ptr(context, b, sig.args[0], args[0], args[1], True)
            pp = _ptr(context, b, sig.args[0], args[0], args[6], True)
            qp = _ptr(context, b, sig.args[2], args[2], b.mul(args[4], ir.Constant(_I64, _N)), True)
            sp = _ptr(context, b, sig.args[3], args[3], b.mul(args[4], ir.Constant(_I64, 2)), False)
            v2 = ir.VectorType(_F32, 2)

            def step(unroll):
                def body(i, accs):
                    _prefetch_step(b, pp, i, nbytes, unroll)
                    out = []
                    for u in range(unroll):
                        acc, sacc = accs[2 * u], accs[2 * u + 1]
                        k = b.add(i, ir.Constant(_I64, u))
                        p = b.gep(wp, [b.mul(k, ir.Constant(_I64, nbytes))])
                        xv = b.load(b.bitcast(b.gep(qp, [b.mul(k, ir.Constant(_I64, _N))]), _VB.as_pointer()), align=1)
                        f = b.sitofp(_idot(fmt, b, _iweights(fmt, b, p), xv), _V8F)
                        xs2 = b.load(b.bitcast(b.gep(sp, [b.mul(k, ir.Constant(_I64, 2))]), v2.as_pointer()), align=4)
                        if fmt == Q8_0:
                            scale = b.fmul(_scale(b, p, 0), b.extract_element(xs2, ir.Constant(_I32, 0)))
                        else:  # (d_w, m_w) * (d_x, s_x); q4_0: (d_w, d_w) * (d_x, s_x), the -8 applied at the end
                            dm = _load(b, p, 0, ir.VectorType(_HALF, 2)) if fmt == Q4_1 else _splat(b, _load(b, p, 0, _HALF), 2)
                            dm = b.fmul(b.fpext(dm, v2), xs2)
                            scale = b.extract_element(dm, ir.Constant(_I32, 0))
                            sacc = b.fadd(sacc, b.extract_element(dm, ir.Constant(_I32, 1)))
                        out += [_fma(b, f, _splat(b, scale, 8), acc), sacc]
                    return out
                return body

            init = [ir.Constant(_V8F, None), ir.Constant(_F32, 0.0)] * _UNROLL
            i, accs = _for(b, ir.Constant(_I64, 0), args[5], _UNROLL, init, step(_UNROLL))
            acc, sacc = accs[0], accs[1]
            for u in range(1, _UNROLL):
                acc, sacc = b.fadd(acc, accs[2 * u]), b.fadd(sacc, accs[2 * u + 1])
            _, (acc, sacc) = _for(b, i, args[5], 1, [acc, sacc], step(1))
            if fmt == Q4_0:
                sacc = b.fmul(sacc, ir.Constant(_F32, -8.0))
            fnty = ir.FunctionType(_F32, [_F32, _V8F])
            red = cgutils.get_or_insert_function(b.module, fnty, "llvm.vector.reduce.fadd.v8f32")
            return b.call(red, [sacc, acc], fastmath=("reassoc",))

        return sig, codegen

    return xdot


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 `bits`."""
    sig = types.float32(types.int32)

    def codegen(context, b, sig, args):
        return b.bitcast(args[0], _F32)

    return sig, codegen


_DX_MIN = 2.0**-110  # smaller block scales count as zero (1 / d must stay a finite float32)


@intrinsic
def _quantize_block(typingctx, x, xoff, xq, xs, blk):
    """`quantize_x` for the 32 floats at x[xoff ..] into block `blk` of xq and xs, as vector IR
    (numba's scalar loop took 3 ns per value, 10% of a small GEMV)."""
    sig = types.void(x, types.intp, xq, xs, types.intp)

    def codegen(context, b, sig, args):
        xp = _ptr(context, b, sig.args[0], args[0], args[1], False)
        qp = _ptr(context, b, sig.args[2], args[2], b.mul(args[4], ir.Constant(_I64, _N)), True)
        sp = _ptr(context, b, sig.args[3], args[3], b.mul(args[4], ir.Constant(_I64, 2)), False)
        v = b.load(b.bitcast(xp, _VF.as_pointer()), align=4)
        vi32 = ir.VectorType(_I32, _N)  # max |x| as integer max of the magnitude bits (a vector max tree)
        bits = b.and_(b.bitcast(v, vi32), ir.Constant(vi32, [0x7FFFFFFF] * _N))
        amax = b.bitcast(_call(b, "llvm.vector.reduce.umax.v32i32", _I32, bits), _F32)
        zero = ir.Constant(_F32, 0.0)
        chk = _call(b, "llvm.vector.reduce.fadd.v32f32", _F32, zero, b.fmul(v, ir.Constant(_VF, None)),
                    fastmath=("reassoc",))  # nan if any value is inf or nan
        d = b.fdiv(amax, ir.Constant(_F32, 127.0))
        finite = b.fcmp_ordered("==", chk, zero)
        ok = b.and_(finite, b.fcmp_ordered(">=", d, ir.Constant(_F32, _DX_MIN)))
        v = b.select(ok, v, ir.Constant(_VF, None))
        inv = b.select(ok, b.fdiv(ir.Constant(_F32, 1.0), d), zero)
        q = b.fptosi(_call(b, "llvm.rint.v32f32", _VF, b.fmul(v, _splat(b, inv))), _VB)
        b.store(q, b.bitcast(qp, _VB.as_pointer()), align=1)
        isum = _call(b, "llvm.vector.reduce.add.v32i32", _I32, b.sext(q, vi32))
        d = b.select(ok, d, b.select(finite, zero, ir.Constant(_F32, float("nan"))))
        b.store(d, sp, align=4)
        b.store(b.fmul(d, b.sitofp(isum, _F32)), b.gep(sp, [ir.Constant(_I64, 1)]), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _make_axpy(fmt: int):
    decode, nbytes = _DECODERS[fmt]

    @intrinsic
    def axpy(typingctx, w, woff, a, y, nblocks, pfoff):
        """y[: 32 * nblocks] += a * w[woff bytes ..] (with y zeroed and a = 1: dequantize), hinting the
        row at w[pfoff bytes ..] into the cache on the way (`_prefetch_step`)."""
        sig = types.void(w, types.intp, types.float32, y, types.intp, types.intp)

        def codegen(context, b, sig, args):
            wp = _ptr(context, b, sig.args[0], args[0], args[1], True)
            yp = _ptr(context, b, sig.args[3], args[3], ir.Constant(_I64, 0), False)
            pp = _ptr(context, b, sig.args[0], args[0], args[5], True)
            av = _splat(b, args[2])

            def body(i, _):
                _prefetch_step(b, pp, i, nbytes, 1)
                w_ = decode(b, b.gep(wp, [b.mul(i, ir.Constant(_I64, nbytes))]))
                p = b.bitcast(b.gep(yp, [b.mul(i, ir.Constant(_I64, _N))]), _VF.as_pointer())
                b.store(_fma(b, av, w_, b.load(p, align=4)), p, align=4)
                return []

            _for(b, ir.Constant(_I64, 0), args[4], 1, [], body)
            return context.get_dummy_value()

        return sig, codegen

    return axpy


def _make_elem(fmt: int):
    """Scalar load of one float-format weight at a byte offset (row tails when cols % 32 != 0)."""

    @intrinsic
    def elem(typingctx, w, woff):
        sig = types.float32(w, types.intp)

        def codegen(context, b, sig, args):
            p = _ptr(context, b, sig.args[0], args[0], args[1], True)
            if fmt == F32:
                return _load(b, p, 0, _F32)
            if fmt == F16:
                return b.fpext(_load(b, p, 0, _HALF), _F32)
            return b.bitcast(b.shl(b.zext(_load(b, p, 0, _I16), _I32), ir.Constant(_I32, 16)), _F32)

        return sig, codegen

    return elem


_dot_f32, _dot_f16, _dot_bf16 = (_make_dot(f) for f in (F32, F16, BF16))
_xdot_q8_0, _xdot_q4_0, _xdot_q4_1 = (_make_xdot(f) for f in (Q8_0, Q4_0, Q4_1))
_axpy_f32, _axpy_f16, _axpy_bf16, _axpy_q8_0, _axpy_q4_0, _axpy_q4_1 = (_make_axpy(f) for f in range(6))
_elem_f32, _elem_f16, _elem_bf16 = (_make_elem(f) for f in range(3))

# ---------------------------------------------------------------------------------------------
# Row primitives (numba level): one row of any format
# ---------------------------------------------------------------------------------------------


@njit(error_model="numpy", cache=True)
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
            _quantize_block(x, t * x.shape[1] + 32 * k, xq, xs, t * nb + k)


@njit(inline="always")
def _q8x(fmt):
    """Whether rows of `fmt` dot with `quantize_x`'s 8-bit x."""
    return fmt == Q8_0 or fmt == Q4_0 or fmt == Q4_1


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
def _rowdot(fmt, w, r, x, xq, xs, t, r_next):
    """w[r] . x[t] for a row of any format (xq, xs from `_prep`), hinting row `r_next` into the cache."""
    cols = x.shape[-1]
    nb = cols // 32
    off, pf = r * w.strides[0], r_next * w.strides[0]
    if fmt == Q4_1:
        return _xdot_q4_1(w, off, xq, xs, t * nb, nb, pf)
    if fmt == Q4_0:
        return _xdot_q4_0(w, off, xq, xs, t * nb, nb, pf)
    if fmt == Q8_0:
        return _xdot_q8_0(w, off, xq, xs, t * nb, nb, pf)
    xoff = t * cols
    if fmt == F32:
        s = _dot_f32(w, off, x, xoff, nb, pf)
    elif fmt == F16:
        s = _dot_f16(w, off, x, xoff, nb, pf)
    else:
        s = _dot_bf16(w, off, x, xoff, nb, pf)
    if cols % 32:
        esz = 4 if fmt == F32 else 2
        xf = x.reshape(-1)
        for j in range(nb * 32, cols):
            if fmt == F32:
                e = _elem_f32(w, off + j * esz)
            elif fmt == F16:
                e = _elem_f16(w, off + j * esz)
            else:
                e = _elem_bf16(w, off + j * esz)
            s += e * xf[xoff + j]
    return s


@njit(inline="always")
def _rowaxpy(fmt, w, r, a, y, r_next):
    """y += a * w[r] for a row of any format (y: float32 [cols]), hinting row `r_next` into the cache."""
    cols = y.shape[-1]
    nb = cols // 32
    off, pf = r * w.strides[0], r_next * w.strides[0]
    if fmt == Q8_0:
        _axpy_q8_0(w, off, a, y, nb, pf)
    elif fmt == Q4_1:
        _axpy_q4_1(w, off, a, y, nb, pf)
    elif fmt == Q4_0:
        _axpy_q4_0(w, off, a, y, nb, pf)
    elif fmt == F32:
        _axpy_f32(w, off, a, y, nb, pf)
    elif fmt == F16:
        _axpy_f16(w, off, a, y, nb, pf)
    else:
        _axpy_bf16(w, off, a, y, nb, pf)
    if cols % 32:
        esz = 4 if fmt == F32 else 2
        for j in range(nb * 32, cols):
            if fmt == F32:
                e = _elem_f32(w, off + j * esz)
            elif fmt == F16:
                e = _elem_f16(w, off + j * esz)
            else:
                e = _elem_bf16(w, off + j * esz)
            y[j] += a * e


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


@njit(parallel=_PRANGE_ONLY, error_model="numpy", cache=True)
def matvec(fmt, ws, x, outs, nchunks):
    """outs[m][t] = ws[m] @ x[t] for every matrix m in the tuple `ws` (same format and cols).

    x: [T, cols]; outs[m]: [T, rows_m]. One call for q/k/v shares the thread wake-up.
    """
    total = 0
    for m in range(len(ws)):
        total += ws[m].shape[0]
    xq, xs = _prep(fmt, x)
    if nchunks == 1:
        _matvec_rows(fmt, ws, x, xq, xs, outs, 0, total)
        return
    for c in prange(nchunks):
        lo, hi = _chunk(c, nchunks, total)
        _matvec_rows(fmt, ws, x, xq, xs, outs, lo, hi)


@njit(inline="always")
def _gather_rows(fmt, w, rows, x, xq, xs, out, lo, hi):
    pf = _ahead(w)
    for k in range(lo, hi):
        r = rows[k]
        nxt = rows[k + pf] if k + pf < hi else r
        for t in range(x.shape[0]):
            out[t, k] = _rowdot(fmt, w, r, x, xq, xs, t, nxt if t == 0 else r)


@njit(parallel=_PRANGE_ONLY, error_model="numpy", cache=True)
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


@njit(parallel=_PRANGE_ONLY, error_model="numpy", cache=True)
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
            g = _rowdot(fmt, wg, i, x, xq, xs, t, nxt if t == 0 else i)
            h[t, i] = _act(act, g) * _rowdot(fmt, wu, i, x, xq, xs, t, nxt if t == 0 else i)


@njit(parallel=_PRANGE_ONLY, error_model="numpy", cache=True)
def gate_up(fmt, wg, wu, x, act, h, nchunks):
    """h[t, i] = act(wg[i] @ x[t]) * (wu[i] @ x[t]): the dense FFN's first half in one pass."""
    n = wg.shape[0]
    xq, xs = _prep(fmt, x)
    if nchunks == 1:
        _gate_up_rows(fmt, wg, wu, x, xq, xs, act, h, 0, n)
        return
    for c in prange(nchunks):
        lo, hi = _chunk(c, nchunks, n)
        _gate_up_rows(fmt, wg, wu, x, xq, xs, act, h, lo, hi)


@njit(inline="always")
def _ffn_rows(fmt, wg, wu, fmt_d, wd_t, rows, x, xq, xs, act, y, h, lo, hi):
    pf = _ahead(wg)
    for k in range(lo, hi):
        i = rows[k]
        nxt = rows[k + pf] if k + pf < hi else i
        hk = _act(act, _rowdot(fmt, wg, i, x, xq, xs, 0, nxt)) * _rowdot(fmt, wu, i, x, xq, xs, 0, nxt)
        h[k] = hk
        _rowaxpy(fmt_d, wd_t, i, hk, y, nxt)


@njit(parallel=_PRANGE_ONLY, error_model="numpy", cache=True)
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


@njit(inline="always")
def _dequant_rows(fmt, w, rows, out, lo, hi):
    pf = _ahead(w)
    for k in range(lo, hi):
        out[k] = 0
        _rowaxpy(fmt, w, rows[k], np.float32(1.0), out[k], rows[k + pf] if k + pf < hi else rows[k])


@njit(parallel=_PRANGE_ONLY, error_model="numpy", cache=True)
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


@njit(fastmath=True, error_model="numpy", cache=True)
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
    return p * _f32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))


@njit(inline="always")
def _attend_span(q, kc, vc, lo, hi, m, l, acc):
    """Every query head (q [H, hd], rotated) over cache positions lo..hi-1, unnormalised: per head h,
    m[h] = the largest score, l[h] = sum exp(score - m[h]), acc[h] = sum exp(score - m[h]) * v.
    Keys, then values, are read once each, position by position (a sequential stream: the cache of
    a long context lives in DRAM), every kv head's row serving its whole group of query heads; a
    span's partial results merge with others' (`attention_decode`). Plain indexing, no array views
    in the loops: a view costs a reference-count update, more than a 64-wide dot."""
    H, hd = q.shape
    KV = kc.shape[1]
    group = H // KV
    scale = np.float32(1.0 / math.sqrt(hd))
    n = hi - lo
    s = np.empty((H, max(n, 1)), np.float32)
    for p in range(lo, hi):
        for h in range(H):
            g = h // group
            a = np.float32(0.0)
            for e in range(hd):
                a += q[h, e] * kc[p, g, e]
            s[h, p - lo] = a * scale
    for h in range(H):
        mx = np.float32(-np.inf)
        for i in range(n):
            mx = max(mx, s[h, i])
        total = np.float32(0.0)
        for i in range(n):
            s[h, i] = _exp_neg(s[h, i] - mx)
            total += s[h, i]
        m[h], l[h] = mx, total
        for e in range(hd):
            acc[h, e] = 0
    for p in range(lo, hi):
        for h in range(H):
            g = h // group
            w = s[h, p - lo]
            for e in range(hd):
                acc[h, e] += w * vc[p, g, e]


@njit(parallel=_PRANGE_ONLY, fastmath=True, error_model="numpy", cache=True)
def attention_decode(q, k, v, kc, vc, pos, cos, sin, interleaved, out, nchunks):
    """One new token's attention. q [H*hd], k and v [KV*hd] (unrotated projections); kc/vc
    [n_ctx, KV, hd] this layer's cache, which gets rotated k and v at `pos`; out [H, hd] =
    softmax(rope(q_h) K^T / sqrt(hd)) V over positions 0..pos, query head h reading kv head
    h // (H / KV). With nchunks > 1 the positions are split into spans attended in parallel and
    merged by their softmax maxima (split-K, as flash-decoding does): threads share the cache reads
    at any head count, long contexts included."""
    KV, hd = kc.shape[1], kc.shape[2]
    H = q.shape[0] // hd
    for g in range(KV):
        for j in range(hd // 2):
            i0, i1, a, b = _rope(k, g * hd, j, cos, sin, interleaved)
            kc[pos, g, i0], kc[pos, g, i1] = a, b
        for j in range(hd):
            vc[pos, g, j] = v[g * hd + j]
    qr = np.empty((H, hd), np.float32)
    for h in range(H):
        for j in range(hd // 2):
            i0, i1, a, b = _rope(q, h * hd, j, cos, sin, interleaved)
            qr[h, i0], qr[h, i1] = a, b
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


@njit(error_model="numpy", cache=True)
def attention_block(x, attn_norm, ffn_norm, eps, fmt, wq, wk, wv, fmt_o, wo, bq, bk, bv, kc, vc, pos, cos, sin,
                    interleaved, h, nchunks_qkv, nchunks_att, nchunks_o):
    """The attention half of a decoder layer for one token: x += wo @ attention(q, k, v) with
    q/k/v = wq/wk/wv @ rms_norm(x, attn_norm) (+ biases, empty arrays when the model has none),
    then h = rms_norm(x, ffn_norm), the FFN's input. x [1, d] is updated in place; the cache gets
    this token's rotated key and its value at `pos` (see `attention_decode`)."""
    hn = np.empty_like(x)
    rms_norm(x, attn_norm, eps, hn)
    q = np.empty((1, wq.shape[0]), np.float32)
    k = np.empty((1, wk.shape[0]), np.float32)
    v = np.empty((1, wv.shape[0]), np.float32)
    matvec(fmt, (wq, wk, wv), hn, (q, k, v), nchunks_qkv)
    for j in range(bq.shape[0]):
        q[0, j] += bq[j]
    for j in range(bk.shape[0]):
        k[0, j] += bk[j]
    for j in range(bv.shape[0]):
        v[0, j] += bv[j]
    att = np.empty((q.shape[1] // kc.shape[2], kc.shape[2]), np.float32)
    attention_decode(q[0], k[0], v[0], kc, vc, pos, cos, sin, interleaved, att, nchunks_att)
    o = np.empty((1, wo.shape[0]), np.float32)
    matvec(fmt_o, (wo,), att.reshape(1, -1), (o,), nchunks_o)
    for j in range(x.shape[1]):
        x[0, j] += o[0, j]
    rms_norm(x, ffn_norm, eps, h)


@njit(error_model="numpy", cache=True)
def dense_ffn(fmt, wg, wu, fmt_d, wd, x, act, y, nchunks_gate_up, nchunks_down):
    """y = wd @ (act(wg @ x) * (wu @ x)) for x [T, d] (T <= a few tokens): `gate_up`, then `matvec`."""
    a = np.empty((x.shape[0], wg.shape[0]), np.float32)
    gate_up(fmt, wg, wu, x, act, a, nchunks_gate_up)
    matvec(fmt_d, (wd,), a, (y,), nchunks_down)


@njit(error_model="numpy", cache=True)
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
