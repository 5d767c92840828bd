"""The inner step of every CPU kernel, as LLVM vector IR: one block of 32 weights of any stored
format (f32/f16/bf16/q8_0/q4_0/q4_1) dotted with x, or added into y.

LLVM does not vectorize the numba-level block loop on its own (it fully unrolls the 32-step loop
into a serial FMA chain, ~3 GB/s), so each step is written here as a few lines of IR and exposed
to numba as an intrinsic. Float formats decode a block into one <32 x float>; block formats
(q8_0, q4_0, q4_1) dot their integer weights with x quantized once per call to 8 bits per block
of 32 (`quantize_block`, as llama.cpp does), integer multiply-adds per block (vpmaddubsw/vpmaddwd
with AVX2) and one float FMA: decoding nibbles to floats made the Q4 GEMVs compute-bound. Float
formats stay float and exact. Dots keep 4 independent accumulators, so a row streams the weights
at cache/memory speed. The kernels that use these steps are in `cpu.py`.
"""
from __future__ import annotations

import numba
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# Format codes used inside the kernels.
F32, F16, BF16, Q8_0, Q4_0, Q4_1 = range(6)

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


def _scaled_ints(fmt: int, b: ir.IRBuilder, p: ir.Value):
    """A block of a format whose weights are d * ints: (the ints as floats, d)."""
    if fmt == Q8_0:
        return b.sitofp(_load(b, p, 2, ir.VectorType(_I8, _N)), _VF), _scale(b, p, 0)
    q = b.sub(_nibbles(b, p, 2), ir.Constant(ir.VectorType(_I8, _N), [8] * _N))
    return b.sitofp(q, _VF), _scale(b, p, 0)


def _axpy_block(fmt: int, b: ir.IRBuilder, p: ir.Value, a: ir.Value, acc: ir.Value) -> ir.Value:
    """acc + a * (the block at p): for d * ints formats the scalar a * d scales the ints, one vector
    multiply fewer per block than decoding first (the row axpys are bound by vector ops, not bytes)."""
    if fmt in (Q8_0, Q4_0):
        q, d = _scaled_ints(fmt, b, p)
        return _fma(b, _splat(b, b.fmul(a, d)), q, acc)
    return _fma(b, _splat(b, a), _DECODERS[fmt][0](b, p), acc)


# Block formats dot their integer weights with x quantized once per call to 8 bits per block of 32
# (`quantize_x`, llama.cpp's q8_0/q8_1 activations): int8 q[32] plus the floats (d, s = d * sum(q)).
_V8F, _V8I = ir.VectorType(_F32, 8), ir.VectorType(_I32, 8)
_VB = ir.VectorType(_I8, _N)
_VW = ir.VectorType(_I16, 16)


def _target_features() -> set[str]:
    """The features numba compiles for: the host's, unless NUMBA_CPU_NAME names another target (e.g.
    "generic" for a portable cache; its features are then only those in NUMBA_CPU_FEATURES). The on-disk
    cache is keyed by the same CPU name and features, so a cached kernel always matches."""
    feats = (numba.config.CPU_FEATURES or "") if numba.config.CPU_NAME else llvm.get_host_cpu_features().flatten()
    return set(feats.split(","))


_FEATURES = _target_features()
_AVX2 = "+avx2" in _FEATURES
# 256-bit VNNI (AVX-VNNI, or AVX512-VNNI with AVX512-VL): vpdpbusd does vpmaddubsw and vpmaddwd's work in one
_VNNI = _AVX2 and ("+avxvnni" in _FEATURES or {"+avx512vnni", "+avx512vl"} <= _FEATURES)


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
        if _VNNI:  # the same sums of four products per lane, in one instruction
            return _call(b, "llvm.x86.avx512.vpdpbusd.256", _V8I, ir.Constant(_V8I, [0] * 8),
                         b.bitcast(w, _V8I), b.bitcast(xq, _V8I))
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


def _prefetch(b: ir.IRBuilder, p: ir.Value) -> None:
    """Hint the cache line at the i8* p into every cache level for reading (never faults)."""
    fnty = ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
    fn = cgutils.get_or_insert_function(b.module, fnty, "llvm.prefetch.p0")
    b.call(fn, [p, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])  # read, all levels, data


def _prefetch_step(b: ir.IRBuilder, pp: ir.Value, i: ir.Value, nbytes: int, unroll: int) -> None:
    """Hint into L1 the lines of bytes [i * nbytes, (i + unroll) * nbytes) of the row at `pp`, the row
    read `ahead` rows later: a few lines per loop step, as fast as the current row is consumed. Hinting a
    whole row at once stalls the core on its line-fill buffers (~16) whenever the row is not yet in L2,
    which is every row of a sparse op; spread out, the hints cost ~nothing and gather_matvec over 20% of
    the rows of 11008x4096 q4_1 ran 28% faster."""
    base = b.gep(pp, [b.mul(i, ir.Constant(_I64, nbytes))])
    for j in range(0, unroll * nbytes, 64):
        _prefetch(b, b.gep(base, [ir.Constant(_I64, j)]))


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


def _xdot_codegen(fmt: int, b: ir.IRBuilder, rows: list, qp: ir.Value, sp: ir.Value, nblocks: ir.Value) -> list:
    """`xdot`'s sums for each row in `rows`, a list of (weight pointer, prefetch pointer), in one loop over
    the blocks: every row gets the same operations in the same order as alone, only x's loads are shared."""
    nbytes = _DECODERS[fmt][1]
    v2 = ir.VectorType(_F32, 2)
    R = len(rows)

    def step(unroll):
        def body(i, accs):
            for _, pp in rows:
                _prefetch_step(b, pp, i, nbytes, unroll)
            out = [None] * len(accs)
            for u in range(unroll):
                k = b.add(i, ir.Constant(_I64, u))
                xv = b.load(b.bitcast(b.gep(qp, [b.mul(k, ir.Constant(_I64, _N))]), _VB.as_pointer()), align=1)
                xs2 = b.load(b.bitcast(b.gep(sp, [b.mul(k, ir.Constant(_I64, 2))]), v2.as_pointer()), align=4)
                for r, (wp, _) in enumerate(rows):
                    at = 2 * (u * R + r)
                    acc, sacc = accs[at], accs[at + 1]
                    p = b.gep(wp, [b.mul(k, ir.Constant(_I64, nbytes))])
                    f = b.sitofp(_idot(fmt, b, _iweights(fmt, b, p), xv), _V8F)
                    if fmt == Q8_0:
                        scale = b.fmul(_scale(b, p, 0), b.extract_element(xs2, ir.Constant(_I32, 0)))
                    else:  # (d_w, m_w) * (d_x, s_x); q4_0: (d_w, d_w) * (d_x, s_x), the -8 applied at the end
                        if fmt == Q4_1:
                            dm = _load(b, p, 0, ir.VectorType(_HALF, 2))
                        else:
                            dm = _splat(b, _load(b, p, 0, _HALF), 2)
                        dm = b.fmul(b.fpext(dm, v2), xs2)
                        scale = b.extract_element(dm, ir.Constant(_I32, 0))
                        sacc = b.fadd(sacc, b.extract_element(dm, ir.Constant(_I32, 1)))
                    out[at], out[at + 1] = _fma(b, f, _splat(b, scale, 8), acc), sacc
            return out
        return body

    init = [ir.Constant(_V8F, None), ir.Constant(_F32, 0.0)] * (_UNROLL * R)
    i, accs = _for(b, ir.Constant(_I64, 0), nblocks, _UNROLL, init, step(_UNROLL))
    tail = []
    for r in range(R):
        acc, sacc = accs[2 * r], accs[2 * r + 1]
        for u in range(1, _UNROLL):
            at = 2 * (u * R + r)
            acc, sacc = b.fadd(acc, accs[at]), b.fadd(sacc, accs[at + 1])
        tail += [acc, sacc]
    _, tail = _for(b, i, nblocks, 1, tail, step(1))
    fnty = ir.FunctionType(_F32, [_F32, _V8F])
    red = cgutils.get_or_insert_function(b.module, fnty, "llvm.vector.reduce.fadd.v8f32")
    sums = []
    for r in range(R):
        acc, sacc = tail[2 * r], tail[2 * r + 1]
        if fmt == Q4_0:
            sacc = b.fmul(sacc, ir.Constant(_F32, -8.0))
        sums.append(b.call(red, [sacc, acc], fastmath=("reassoc",)))
    return sums


def _make_xdot(fmt: int):
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
            return _xdot_codegen(fmt, b, [(wp, pp)], qp, sp, args[5])[0]

        return sig, codegen

    return xdot


def _make_xdot2(fmt: int):
    @intrinsic
    def xdot2(typingctx, wa, aoff, wb, boff, xq, xs, xb, nblocks, apf, bpf):
        """(`xdot` of wa's row at aoff bytes, `xdot` of wb's row at boff bytes) with the same x, in one loop:
        the same sums to the bit as two xdot calls, x's blocks loaded once for both (a FFN's gate and up
        rows of one neuron). The rows at apf and bpf bytes are hinted into the cache on the way."""
        sig = types.UniTuple(types.float32, 2)(wa, types.intp, wb, types.intp, xq, xs, types.intp, types.intp,
                                              types.intp, types.intp)

        def codegen(context, b, sig, args):
            ta, tb = sig.args[0], sig.args[2]
            rows = [(_ptr(context, b, ta, args[0], args[1], True), _ptr(context, b, ta, args[0], args[8], True)),
                    (_ptr(context, b, tb, args[2], args[3], True), _ptr(context, b, tb, args[2], args[9], True))]
            qp = _ptr(context, b, sig.args[4], args[4], b.mul(args[6], ir.Constant(_I64, _N)), True)
            sp = _ptr(context, b, sig.args[5], args[5], b.mul(args[6], ir.Constant(_I64, 2)), False)
            return context.make_tuple(b, sig.return_type, _xdot_codegen(fmt, b, rows, qp, sp, args[7]))

        return sig, codegen

    return xdot2


@intrinsic
def f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 `bits`."""
    sig = types.float32(types.int32)

    def codegen(context, b, sig, args):
        return b.bitcast(args[0], _F32)

    return sig, codegen


_DX_MIN = 2.0**-110  # smaller block scales count as zero (1 / d must stay a finite float32)


@intrinsic
def quantize_block(typingctx, x, xoff, xq, xs, blk):
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
    nbytes = _DECODERS[fmt][1]

    @intrinsic
    def axpy(typingctx, w, woff, a, y, nblocks, pfoff):
        """y[: 32 * nblocks] += a * w[woff bytes ..] (with y zeroed and a = 1: dequantize), hinting the
        row at w[pfoff bytes ..] into the cache on the way (`_prefetch_step`)."""
        sig = types.void(w, types.intp, types.float32, y, types.intp, types.intp)

        def codegen(context, b, sig, args):
            wp = _ptr(context, b, sig.args[0], args[0], args[1], True)
            yp = _ptr(context, b, sig.args[3], args[3], ir.Constant(_I64, 0), False)
            pp = _ptr(context, b, sig.args[0], args[0], args[5], True)

            def body(i, _):
                _prefetch_step(b, pp, i, nbytes, 1)
                p = b.bitcast(b.gep(yp, [b.mul(i, ir.Constant(_I64, _N))]), _VF.as_pointer())
                acc = _axpy_block(fmt, b, b.gep(wp, [b.mul(i, ir.Constant(_I64, nbytes))]), args[2],
                                  b.load(p, align=4))
                b.store(acc, p, align=4)
                return []

            _for(b, ir.Constant(_I64, 0), args[4], 1, [], body)
            return context.get_dummy_value()

        return sig, codegen

    return axpy


# Blocks of y that axpy_rows carries through its loop over rows at once: independent FMA chains, so a
# row's blocks do not wait on each other's latency (one chain per block ran the loop latency-bound).
AXPY_TILE = 6


def _make_axpy_rows(fmt: int):
    nbytes = _DECODERS[fmt][1]

    @intrinsic
    def axpy_rows(typingctx, w, stride, ids, coef, m, y, nblocks):
        """y[: 32 * nblocks] += sum over k < m of coef[k] * w[ids[k] * stride bytes ..], AXPY_TILE blocks
        at a time: each 32 values of y are loaded once, the m rows added in order and stored once. Every
        value gets the same operations in the same order as m calls of axpy, so the sums are the same to
        the bit; only the loads and stores of y are shared."""
        sig = types.void(w, types.intp, ids, coef, types.intp, y, types.intp)

        def codegen(context, b, sig, args):
            wp = _ptr(context, b, sig.args[0], args[0], ir.Constant(_I64, 0), True)
            ip = _ptr(context, b, sig.args[2], args[2], ir.Constant(_I64, 0), False)
            cp = _ptr(context, b, sig.args[3], args[3], ir.Constant(_I64, 0), False)
            yp = _ptr(context, b, sig.args[5], args[5], ir.Constant(_I64, 0), False)

            def tile(n):
                def blocks(i, _):
                    ps = [b.bitcast(b.gep(yp, [b.mul(b.add(i, ir.Constant(_I64, t)), ir.Constant(_I64, _N))]),
                                    _VF.as_pointer()) for t in range(n)]
                    boff = b.mul(i, ir.Constant(_I64, nbytes))

                    def row(k, accs):
                        base = b.gep(wp, [b.add(b.mul(b.load(b.gep(ip, [k])), args[1]), boff)])
                        c = b.load(b.gep(cp, [k]))
                        return [_axpy_block(fmt, b, b.gep(base, [ir.Constant(_I64, t * nbytes)]), c, acc)
                                for t, acc in enumerate(accs)]

                    _, accs = _for(b, ir.Constant(_I64, 0), args[4], 1, [b.load(p, align=4) for p in ps], row)
                    for p, acc in zip(ps, accs):
                        b.store(acc, p, align=4)
                    return []
                return blocks

            i, _ = _for(b, ir.Constant(_I64, 0), args[6], AXPY_TILE, [], tile(AXPY_TILE))
            _for(b, i, args[6], 1, [], tile(1))
            return context.get_dummy_value()

        return sig, codegen

    return axpy_rows


@intrinsic
def prefetch_row(typingctx, w, woff, nbytes):
    """Hint the `nbytes` bytes of w from byte `woff` into the cache (a row read soon, at an address no
    prefetcher can guess)."""
    sig = types.void(w, types.intp, types.intp)

    def codegen(context, b, sig, args):
        p = _ptr(context, b, sig.args[0], args[0], args[1], True)

        def line(i, _):
            _prefetch(b, b.gep(p, [i]))
            return []

        _for(b, ir.Constant(_I64, 0), b.add(args[2], ir.Constant(_I64, 63)), 64, [], line)
        return context.get_dummy_value()

    return sig, codegen


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


# ---------------------------------------------------------------------------------------------
# Row groups: 8 rows of a nibble format interleaved block by block (`pack_rows`, in cpu.py)
# ---------------------------------------------------------------------------------------------
# One dot per row spends most of its instructions on each block's float scaling, not on its 32
# weights (the Q4 GEMVs ran compute-bound at ~20 GB/s). Interleaving 8 rows, as llama.cpp's
# repacked formats do, lets one 512-bit vpdpbusd (or its AVX2 sequence) multiply 4 weights of each
# of 8 rows twice over, and one <8 x float> FMA scale a block of all 8 rows. A group's block b, at b * GROUP_BLOCK[fmt]:
#   d[8] (f16, row r's scale), for q4_1 m[8] (f16), then 128 bytes P0 | P1 of nibbles:
#   weight j of row r sits in vector t = j // 8 (0..3), lane l = r + 8 * (j % 8 // 4), byte j % 4,
#   and P0 holds vectors 0 (low nibbles) and 2 (high), P1 vectors 1 and 3.
# x is expanded to the same lanes once per call (`expand_block`): byte 4 * l + e of vector t is
# x[8 * t + 4 * (l // 8) + e].
GROUP_ROWS = 8
# Packed formats, their codes, and bytes per block of a group (8 blocks of the row format)
Q4_0X8, Q4_1X8 = 6, 7
PACKED = {Q4_0: Q4_0X8, Q4_1: Q4_1X8}
GROUP_BLOCK = {Q4_0X8: 8 * 18, Q4_1X8: 8 * 20}
# Where the 64-byte dot below has an instruction sequence (AVX2 and up), the kernels pack Q4 rows
PACKS = _AVX2
_VNNI512 = {"+avx512vnni", "+avx512bw", "+avx512f"} <= _FEATURES
_V16I, _V64B = ir.VectorType(_I32, 16), ir.VectorType(_I8, 64)


def _dot64(b: ir.IRBuilder, acc: ir.Value, w: ir.Value, x: ir.Value) -> ir.Value:
    """acc <16 x i32> + the sums of 4 adjacent products of u8 w and s8 x <64 x i8> per lane (vpdpbusd's):
    one 512-bit vpdpbusd with AVX512-VNNI, two 256-bit ones with VNNI on 256 bits, else per half vpmaddubsw
    (w <= 15 here: its pair sums never saturate) and vpmaddwd with ones; the same exact sums everywhere."""
    if _VNNI512:
        return _call(b, "llvm.x86.avx512.vpdpbusd.512", _V16I, acc, b.bitcast(w, _V16I), b.bitcast(x, _V16I))

    def half(v, h, n):
        return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(h * n, h * n + n))))

    parts = []
    for h in range(2):
        wh, xh, ah = half(w, h, 32), half(x, h, 32), half(acc, h, 8)
        if _VNNI:
            parts.append(_call(b, "llvm.x86.avx512.vpdpbusd.256", _V8I, ah, b.bitcast(wh, _V8I), b.bitcast(xh, _V8I)))
        elif _AVX2:
            p16 = _call(b, "llvm.x86.avx2.pmadd.ub.sw", _VW, wh, xh)
            parts.append(b.add(ah, _call(b, "llvm.x86.avx2.pmadd.wd", _V8I, p16, ir.Constant(_VW, [1] * 16))))
        else:  # no packing here (PACKS); valid code all the same
            prod = b.mul(b.zext(wh, ir.VectorType(_I32, 32)), b.sext(xh, ir.VectorType(_I32, 32)))
            for e in range(4):
                ah = b.add(ah, b.shuffle_vector(prod, prod, ir.Constant(_V8I, [4 * k + e for k in range(8)])))
            parts.append(ah)
    return b.shuffle_vector(parts[0], parts[1], ir.Constant(_V16I, list(range(16))))


# How far ahead of a packed group's block its dot hints bytes into the cache (`xdot8`'s ahead): a dense
# decode streams its packed weights from L3 (a layer's outgrow L2), and the hardware prefetcher stops at
# every 4 KiB page. SmolLM2, 2 threads: 2.79 -> 2.64 ms a token (0, 1, 2, 4, 8 and 16 KiB tried).
PACKED_AHEAD = 4096


def _xdot8_codegen(fmt: int, b: ir.IRBuilder, wp: ir.Value, ep: ir.Value, sp: ir.Value, op: ir.Value,
                   nblocks: ir.Value, ahead: ir.Value) -> None:
    """The 8 rows' dots of the group at wp with the expanded x at ep (scales at sp), stored at op; unless
    `ahead` is 0, each block hints the bytes `ahead` past it into the cache."""
    gb = GROUP_BLOCK[fmt]
    qoff = 32 if fmt == Q4_1X8 else 16
    v8h = ir.VectorType(_HALF, 8)
    f15, f4 = ir.Constant(_V64B, [15] * 64), ir.Constant(_V64B, [4] * 64)
    zero = ir.Constant(_V8F, None)

    def block(k, acc, macc):
        p = b.gep(wp, [b.mul(k, ir.Constant(_I64, gb))])
        with b.if_then(b.icmp_signed("!=", ahead, ir.Constant(_I64, 0))):
            for j in range(0, gb, 64):
                _prefetch(b, b.gep(p, [b.add(ahead, ir.Constant(_I64, j))]))
        d = b.fpext(_load(b, p, 0, v8h), _V8F)
        p0, p1 = _load(b, p, qoff, _V64B), _load(b, p, qoff + 64, _V64B)
        e = b.gep(ep, [b.mul(k, ir.Constant(_I64, 4 * 64))])
        isum = ir.Constant(_V16I, [0] * 16)
        for t, w in enumerate((b.and_(p0, f15), b.and_(p1, f15), b.lshr(p0, f4), b.lshr(p1, f4))):
            isum = _dot64(b, isum, w, _load(b, e, 64 * t, _V64B))
        lo = b.shuffle_vector(isum, isum, ir.Constant(_V8I, list(range(8))))
        hi = b.shuffle_vector(isum, isum, ir.Constant(_V8I, list(range(8, 16))))
        s2 = b.gep(sp, [b.mul(k, ir.Constant(_I64, 2))])
        dx, sx = b.load(s2), b.load(b.gep(s2, [ir.Constant(_I64, 1)]))
        acc = _fma(b, b.sitofp(b.add(lo, hi), _V8F), b.fmul(d, _splat(b, dx, 8)), acc)
        # q4_1: + m * s_x; q4_0 (w = d * (q - 8)): - 8 d * s_x, the d * s_x summed here, times -8 at the end
        m = b.fpext(_load(b, p, 16, v8h), _V8F) if fmt == Q4_1X8 else d
        return acc, _fma(b, m, _splat(b, sx, 8), macc)

    def two(i, accs):  # two blocks a step: independent FMA chains
        a0, m0 = block(i, accs[0], accs[1])
        a1, m1 = block(b.add(i, ir.Constant(_I64, 1)), accs[2], accs[3])
        return [a0, m0, a1, m1]

    i, (a0, m0, a1, m1) = _for(b, ir.Constant(_I64, 0), nblocks, 2, [zero] * 4, two)
    _, (acc, macc) = _for(b, i, nblocks, 1, [b.fadd(a0, a1), b.fadd(m0, m1)],
                          lambda k, accs: list(block(k, accs[0], accs[1])))
    if fmt == Q4_0X8:
        macc = b.fmul(macc, ir.Constant(_V8F, [-8.0] * 8))
    b.store(b.fadd(acc, macc), b.bitcast(op, _V8F.as_pointer()), align=4)


def _make_xdot8(fmt: int):
    @intrinsic
    def xdot8(typingctx, w, goff, xe, xs, xb, nblocks, out, ooff, ahead):
        """out[ooff .. ooff + 8] = the dots of the 8 rows of the group at w[goff bytes ..] with x, x given
        as blocks xb, xb + 1, ... of `expand_block`'s xe and `quantize_x`'s xs: per block an exact int32
        dot (4 vpdpbusd), then d_w * d_x and m_w * s_x as in `xdot`, for the 8 rows at once; each block
        hints the bytes `ahead` past it into the cache (0: none, for a group read again for more tokens)."""
        sig = types.void(w, types.intp, xe, xs, types.intp, types.intp, out, types.intp, types.intp)

        def codegen(context, b, sig, args):
            wp = _ptr(context, b, sig.args[0], args[0], args[1], True)
            ep = _ptr(context, b, sig.args[2], args[2], b.mul(args[4], ir.Constant(_I64, 4 * 64)), True)
            sp = _ptr(context, b, sig.args[3], args[3], b.mul(args[4], ir.Constant(_I64, 2)), False)
            op = _ptr(context, b, sig.args[6], args[6], args[7], False)
            _xdot8_codegen(fmt, b, wp, ep, sp, op, args[5], args[8])
            return context.get_dummy_value()

        return sig, codegen

    return xdot8


@intrinsic
def expand_block(typingctx, xq, xe, blk):
    """Block `blk` of quantize_x's xq (32 int8) into the 4 x 64 bytes of xe the packed dots read (the
    layout above): 4 byte shuffles."""
    sig = types.void(xq, xe, types.intp)

    def codegen(context, b, sig, args):
        qp = _ptr(context, b, sig.args[0], args[0], b.mul(args[2], ir.Constant(_I64, _N)), True)
        ep = _ptr(context, b, sig.args[1], args[1], b.mul(args[2], ir.Constant(_I64, 4 * 64)), True)
        q = _load(b, qp, 0, _VB)
        for t in range(4):
            lanes = [8 * t + 4 * (lane // 8) + e for lane in range(16) for e in range(4)]
            v = b.shuffle_vector(q, q, ir.Constant(ir.VectorType(_I32, 64), lanes))
            b.store(v, b.bitcast(b.gep(ep, [ir.Constant(_I64, 64 * t)]), _V64B.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


dot_f32, dot_f16, dot_bf16 = (_make_dot(f) for f in (F32, F16, BF16))
xdot_q8_0, xdot_q4_0, xdot_q4_1 = (_make_xdot(f) for f in (Q8_0, Q4_0, Q4_1))
xdot2_q8_0, xdot2_q4_0, xdot2_q4_1 = (_make_xdot2(f) for f in (Q8_0, Q4_0, Q4_1))
axpy_f32, axpy_f16, axpy_bf16, axpy_q8_0, axpy_q4_0, axpy_q4_1 = (_make_axpy(f) for f in range(6))
(axpy_rows_f32, axpy_rows_f16, axpy_rows_bf16, axpy_rows_q8_0, axpy_rows_q4_0,
 axpy_rows_q4_1) = (_make_axpy_rows(f) for f in range(6))
elem_f32, elem_f16, elem_bf16 = (_make_elem(f) for f in range(3))
xdot8_q4_0, xdot8_q4_1 = (_make_xdot8(f) for f in (Q4_0X8, Q4_1X8))


# ---------------------------------------------------------------------------------------------
# KV-cache entries: float32 as is, or float16 held as its uint16 bits (numba has no float16 type)
# ---------------------------------------------------------------------------------------------


@intrinsic
def from_kv(typingctx, e):
    """A KV-cache entry as float32: a float32 entry unchanged, a uint16 one as the float16 it holds
    (exact). Inside a loop LLVM vectorizes the widening (vcvtph2ps with F16C)."""
    if e == types.float32:
        return types.float32(e), lambda context, b, sig, args: args[0]
    if e == types.uint16:
        return types.float32(e), lambda context, b, sig, args: b.fpext(b.bitcast(args[0], _HALF), _F32)
    return None


@intrinsic
def to_kv(typingctx, x, cache):
    """float32 x as an entry of `cache`: unchanged for a float32 cache, the bits of float16(x) (rounded
    to nearest even, as torch and numpy round) for a uint16 one."""
    if x != types.float32 or cache.dtype not in (types.float32, types.uint16):
        return None
    if cache.dtype == types.float32:
        return types.float32(x, cache), lambda context, b, sig, args: args[0]
    return types.uint16(x, cache), lambda context, b, sig, args: b.bitcast(b.fptrunc(args[0], _HALF), _I16)


_V16 = ir.VectorType(_F32, 16)


def _pair_sums(b: ir.IRBuilder, x: ir.Value, y: ir.Value, segs: int) -> ir.Value:
    """x and y each hold `segs` sums spread over 16 // segs lanes apiece; the result holds x's sums, then
    y's, over half as many lanes each (half the lanes added to the other half)."""
    w = 16 // segs
    lo, hi = [], []
    for s in range(2 * segs):
        src = (s // segs) * 16 + (s % segs) * w
        lo += [src + t for t in range(w // 2)]
        hi += [src + w // 2 + t for t in range(w // 2)]
    lo, hi = (b.shuffle_vector(x, y, ir.Constant(ir.VectorType(_I32, 16), idx)) for idx in (lo, hi))
    return b.fadd(lo, hi, flags=("fast",))


def _kv_intrinsic(kv, x, out, emit):
    """(signature, codegen) of an intrinsic over KV-cache rows (kv, off, row stride, x, off, n, out, off),
    None unless kv holds float32 or float16 bits (uint16) and x and out float32. emit(b, args, kv pointer,
    x pointer, out pointer, half) writes its body, the pointers to elements at their offsets."""
    if kv.dtype not in (types.float32, types.uint16) or x.dtype != types.float32 or out.dtype != types.float32:
        return None
    sig = types.void(kv, types.intp, types.intp, x, types.intp, types.intp, out, types.intp)

    def codegen(context, b, sig, args):
        emit(b, args, *(_ptr(context, b, sig.args[i], args[i], args[i + 1], False) for i in (0, 3, 6)),
             kv.dtype == types.uint16)
        return context.get_dummy_value()

    return sig, codegen


def _kv16(b: ir.IRBuilder, p: ir.Value, j: int, half: bool) -> ir.Value:
    """16 KV-cache entries from the element pointer p + 16 j, widened to float32."""
    if half:
        v = b.load(b.gep(b.bitcast(p, ir.VectorType(_HALF, 16).as_pointer()), [ir.Constant(_I64, j)]), align=2)
        return b.fpext(v, _V16)
    return b.load(b.gep(b.bitcast(p, _V16.as_pointer()), [ir.Constant(_I64, j)]), align=4)


@intrinsic
def dot16(typingctx, k, koff, kstride, q, qoff, n, out, ooff):
    """out[ooff + r] = sum over e < n of q[qoff + e] * k[koff + r * kstride + e] for the 16 rows r < 16 of
    a KV cache (float32, or float16 held as uint16 bits), n a multiple of 16: attention's scores for 16
    positions. Each row's dot runs in its own vector of 16 lanes and the 16 vectors are summed into one
    in 15 shuffle-adds (a tree): a dot reduced to a scalar by itself costs ~8 vector operations, as many
    as its 64 products take."""
    def emit(b, args, kp, qp, op, half):
        def body(e, accs):
            qv = b.load(b.bitcast(b.gep(qp, [e]), _V16.as_pointer()), align=4)
            rows = [b.gep(kp, [b.add(b.mul(ir.Constant(_I64, r), args[2]), e)]) for r in range(16)]
            return [_fma(b, qv, _kv16(b, p, 0, half), acc) for p, acc in zip(rows, accs)]

        zero = ir.Constant(_V16, [0.0] * 16)
        _, vs = _for(b, ir.Constant(_I64, 0), args[5], 16, [zero] * 16, body)
        segs = 1
        while len(vs) > 1:
            vs = [_pair_sums(b, vs[i], vs[i + 1], segs) for i in range(0, len(vs), 2)]
            segs *= 2
        b.store(vs[0], b.bitcast(op, _V16.as_pointer()), align=4)

    return _kv_intrinsic(k, q, out, emit)


@intrinsic
def axpy64(typingctx, v, voff, vstride, w, woff, n, acc, aoff):
    """acc[aoff : aoff + 64] += sum over r < n of w[woff + r] * v[voff + r * vstride : .. + 64], v rows of a
    KV cache (float32, or float16 held as uint16 bits): attention's weighted values over n positions for 64
    of a head's dimensions. The 64 sums stay in registers for all n rows, in two sets (even and odd rows)
    so 8 FMA chains run at once; acc is read and written once."""
    def emit(b, args, vp, wp, ap, half):
        ap = b.bitcast(ap, _V16.as_pointer())

        def quad(r):  # row r's 64 values as 4 vectors
            return [_kv16(b, b.gep(vp, [b.mul(r, args[2])]), j, half) for j in range(4)]

        def add(r, accs):
            c = _splat(b, b.load(b.gep(wp, [r])), 16)
            return [_fma(b, c, x, a) for x, a in zip(quad(r), accs)]

        def two(r, accs):
            return add(r, accs[:4]) + add(b.add(r, ir.Constant(_I64, 1)), accs[4:])

        zero = ir.Constant(_V16, [0.0] * 16)
        r, accs = _for(b, ir.Constant(_I64, 0), args[5], 2, [zero] * 8, two)
        odd = b.icmp_signed("<", r, args[5])  # n odd: its last row
        last = b.select(odd, r, ir.Constant(_I64, 0))
        wl = b.select(odd, b.load(b.gep(wp, [last])), ir.Constant(_F32, 0.0))
        tail = [_fma(b, _splat(b, wl, 16), x, a) for x, a in zip(quad(last), accs[:4])]
        for j in range(4):
            p = b.gep(ap, [ir.Constant(_I64, j)])
            b.store(b.fadd(b.load(p, align=4), b.fadd(tail[j], accs[4 + j], flags=("fast",)), flags=("fast",)),
                    p, align=4)

    return _kv_intrinsic(v, w, acc, emit)

