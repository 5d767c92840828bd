"""GPU kernels (`kernels/cuda.py`, plain torch) against the numpy reference, on the CPU (always) and
on CUDA (when present), on random and real SmolLM2 weights, in every format.

Weights stay in their stored format on the device; `decode_rows` to float32 equals
`QTensor.dequantize` bit for bit (tolerance 0), and to float16 equals it rounded once to float16.
Products are taken in the weight's `compute_dtype` with float32 accumulation: x and each partial
result are rounded to that dtype once, and block-format weights are rounded to float16 once. With u
the dtype's unit roundoff, |ours - reference| <= RTOL * (|W| @ |x|) elementwise, the reference
accumulating in float64:
- f32:            float32 summation only: 1e-5.
- f16:            x and result rounded (2u, u = 2^-11 = 4.9e-4): 2e-3.
- q8_0/q4_0/q4_1: weight, x and result rounded (3u = 1.5e-3): 2e-3.
- bf16:           x and result rounded (2u, u = 2^-8 = 3.9e-3): 1e-2.
Measured on the CPU: at most 0.36 (bf16), 0.26 (the others) and 0.012 (f32) of these bounds.
Block formats take x as given (float), so the reference is called with q8=False (the CPU kernels
quantize x to 8 bits per block of 32 instead). The product tests on random weights also run with
tiles of three rows (`TILE_BYTES` patched small), so tile boundaries are covered.
"""
import numpy as np
import pytest
import torch

from hetinfer import kernels
from hetinfer.kernels import cuda
from hetinfer.kernels import reference as ref
from hetinfer.tensors import BLOCK_FORMATS, FORMATS, quantize

needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
RTOL = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2, "q8_0": 2e-3, "q4_0": 2e-3, "q4_1": 2e-3}
ACTS = ("silu", "relu", "gelu")
ROW_SETS = {
    "empty": np.array([], np.int64),
    "all": np.arange(96),
    "unsorted_repeated": np.array([90, 3, 17, 5, 3, 95, 0]),
    "int32": np.array([9, 1], np.int32),
}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=["one_tile", "small_tiles"])
def tiles(request, monkeypatch):
    if request.param == "small_tiles":
        monkeypatch.setattr(cuda, "TILE_BYTES", 3 * 64 * 2)  # 3 rows of 64 float16 weights: many tiles


def rand_q(rows, cols, qtype, seed=0):
    return quantize(np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32), qtype)


def rand_x(*shape, seed=1):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def absw(Q, rows=None):
    return np.abs(Q.dequantize(rows)).astype(np.float64)


def check(ours, want, bound, rtol):
    ours = ours.detach().cpu().numpy()
    err = np.abs(ours - want)
    assert ours.shape == want.shape and np.all(err <= rtol * bound + 1e-30), \
        f"max err {err.max():.3g}, allowed {rtol * np.max(bound):.3g}"


# ---------------------------------------------------------------------------------------------
# stored format and decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", FORMATS)
def test_to_cuda_keeps_the_stored_bytes(qtype, device):
    Q = rand_q(96, 64, qtype)
    Q.data.setflags(write=False)  # like weights mmapped from a GGUF file
    W = kernels.to_cuda(Q, device)
    assert isinstance(W, kernels.GPUTensor) and kernels._is_cuda(W) and not kernels._is_cuda(Q)
    assert W.shape == Q.shape and W.device.type == device and W.data.nbytes == Q.nbytes
    if qtype in BLOCK_FORMATS:
        assert W.data.dtype == torch.uint8 and W.compute_dtype == torch.float16
        assert np.array_equal(W.data.cpu().numpy(), Q.data)  # the same GGUF block bytes
    else:
        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[qtype]
        assert W.data.dtype == W.compute_dtype == dtype
        assert np.array_equal(W.data.float().cpu().numpy(), Q.dequantize())


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("rows", [None, *ROW_SETS], ids=["none", *ROW_SETS])
def test_decode_rows_bit_exact(qtype, rows, device):
    rows = None if rows is None else ROW_SETS[rows]
    Q = rand_q(96, 64, qtype)
    W = kernels.to_cuda(Q, device)
    want = Q.dequantize(rows)
    f32 = cuda.decode_rows(W, rows, torch.float32)
    assert f32.dtype == torch.float32 and f32.device.type == device
    assert np.array_equal(f32.cpu().numpy(), want)  # tolerance 0
    assert np.array_equal(cuda.decode_rows(W, rows).cpu().numpy(), want.astype(np.float16))  # one rounding
    if rows is not None:  # row ids already on the device
        on_device = torch.from_numpy(rows).to(device)
        assert np.array_equal(cuda.decode_rows(W, on_device, torch.float32).cpu().numpy(), want)


def test_decode_block_extremes(device):
    """Subnormal float16 scales, large values, zero blocks and every nibble value decode exactly."""
    w = np.zeros((4, 64), np.float32)
    w[0, :32] = np.linspace(-15, 15, 32) * 2.0**-20  # subnormal float16 scales
    w[1, :32] = np.linspace(-6e4, 6e4, 32)  # q4_1's offset m near float16's largest (65504)
    w[2] = np.random.default_rng(0).standard_normal(64) * 1e3
    for qtype in BLOCK_FORMATS:
        Q = quantize(w, qtype)
        assert np.array_equal(cuda.decode_rows(kernels.to_cuda(Q, device), None, torch.float32).cpu().numpy(),
                              Q.dequantize())


# ---------------------------------------------------------------------------------------------
# dense and sparse kernels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("T", [1, 3])
def test_dense(qtype, T, device, tiles):
    Q, Qu = rand_q(96, 64, qtype), rand_q(96, 64, qtype, seed=2)
    W, Wu = kernels.to_cuda(Q, device), kernels.to_cuda(Qu, device)
    x = rand_x(T, 64)
    xd, xn = x.to(device), x.numpy()
    rtol = RTOL[qtype]
    check(kernels.linear(W, xd), ref.linear(Q, xn, q8=False), np.abs(xn) @ absw(Q).T, rtol)
    for ours, Qi in zip(kernels.linears((W, Wu), xd), (Q, Qu)):
        check(ours, ref.linear(Qi, xn, q8=False), np.abs(xn) @ absw(Qi).T, rtol)
    g, u = ref.linear(Q, xn, q8=False), ref.linear(Qu, xn, q8=False)
    bound = 1.2 * ((np.abs(xn) @ absw(Q).T) * np.abs(u) + np.abs(ref.act("silu", g)) * (np.abs(xn) @ absw(Qu).T))
    check(kernels.gate_up(W, Wu, xd, "silu"), ref.gate_up(Q, Qu, xn, "silu", q8=False), bound + np.abs(g * u), rtol)
    ids = torch.tensor([4, 0, 95, 4], device=device)
    assert np.array_equal(kernels.embedding(W, ids).cpu().numpy(), Q.dequantize(ids.cpu().numpy()))


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("rows", ROW_SETS, ids=list(ROW_SETS))
def test_gather_and_scatter(qtype, rows, device, tiles):
    rows = ROW_SETS[rows]
    Q = rand_q(96, 64, qtype)
    W = kernels.to_cuda(Q, device)
    rtol = RTOL[qtype]
    for x in (rand_x(64), rand_x(2, 64)):
        out = kernels.gather_matvec(W, rows, x.to(device))
        assert out.shape == (*x.shape[:-1], len(rows))
        check(out, ref.gather_matvec(Q, rows, x.numpy(), q8=False), np.abs(x.numpy()) @ absw(Q, rows).T, rtol)
    a, y0 = rand_x(len(rows), seed=4), rand_x(64, seed=5)
    y = y0.to(device, copy=True)  # on the CPU .to would return y0 itself
    assert kernels.scatter_axpy(W, torch.from_numpy(rows).to(device), a.to(device), y) is y
    check(y, ref.scatter_axpy(Q, rows, a.numpy(), y0.numpy()),
          np.abs(y0.numpy()) + np.abs(a.numpy()) @ absw(Q, rows), rtol)


def check_sparse_ffn(Qg, Qu, Qd_t, rows, x, act, device):
    """kernels.sparse_ffn on the device against the reference; bounds as in tests/test_kernels.py."""
    Wg, Wu, Wd_t = (kernels.to_cuda(Q, device) for Q in (Qg, Qu, Qd_t))
    y, h = kernels.sparse_ffn(Wg, Wu, Wd_t, rows, x.to(device), act, return_act=True)
    xn = x.numpy().reshape(-1)
    want_y, want_h = ref.sparse_ffn(Qg, Qu, Qd_t, rows, xn, act, q8=False)
    bound_h, bound_y, rtol = sparse_bounds(Qg, Qu, Qd_t, rows, xn, act)
    check(h, want_h, bound_h, rtol)
    assert y.shape == x.shape
    check(y.reshape(-1), want_y, bound_y, rtol)


def sparse_bounds(Qg, Qu, Qd_t, rows, xn, act):
    """(bound of h, bound of y, rtol) for one token's FFN over `rows`."""
    want_h = ref.sparse_ffn(Qg, Qu, Qd_t, rows, xn, act, q8=False)[1]
    g, u = ref.gather_matvec(Qg, rows, xn, q8=False), ref.gather_matvec(Qu, rows, xn, q8=False)
    bound_g, bound_u = absw(Qg, rows) @ np.abs(xn), absw(Qu, rows) @ np.abs(xn)
    bound_h = 1.2 * (bound_g * np.abs(u) + np.abs(ref.act(act, g)) * bound_u)  # act's slope <= 1.2
    return (bound_h + np.abs(want_h), (bound_h + 3 * np.abs(want_h)) @ absw(Qd_t, rows),
            max(RTOL[Qg.qtype], RTOL[Qd_t.qtype]))


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rows", ROW_SETS, ids=list(ROW_SETS))
def test_sparse_ffn(qtype, act, rows, device, tiles):
    Qg, Qu = rand_q(96, 64, qtype, 5), rand_q(96, 64, qtype, 6)
    Qd_t = kernels.transpose_down(rand_q(64, 96, qtype, 7))  # q8_0 for block formats, as the engine holds it
    check_sparse_ffn(Qg, Qu, Qd_t, ROW_SETS[rows], rand_x(1, 64), act, device)
    check_sparse_ffn(Qg, Qu, Qd_t, ROW_SETS[rows], rand_x(64), act, device)


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("share", [0.0, 0.5, 1.0], ids=["none", "half", "all"])
def test_threshold_ffn(qtype, share, device):
    """The neurons whose |act(g) * u| passes the threshold, and y over them as in test_sparse_ffn."""
    Qg, Qu = rand_q(96, 64, qtype, 5), rand_q(96, 64, qtype, 6)
    Qd_t = kernels.transpose_down(rand_q(64, 96, qtype, 7))
    x = rand_x(1, 64)
    a = np.sort(np.abs(ref.gate_up(Qg, Qu, x.numpy(), "silu", q8=False)[0]))
    threshold = {0.0: float(a[-1] + 1), 1.0: -1.0}.get(share, float(a[47] + a[48]) / 2)
    y, kept = kernels.threshold_ffn(*(kernels.to_cuda(Q, device) for Q in (Qg, Qu, Qd_t)), x.to(device), "silu",
                                    threshold)
    want_y, rows = ref.threshold_ffn(Qg, Qu, Qd_t, x.numpy(), "silu", threshold, q8=False)
    assert kept == len(rows) == round(96 * share) and y.shape == x.shape
    _, bound_y, rtol = sparse_bounds(Qg, Qu, Qd_t, rows, x.numpy()[0], "silu")
    check(y.reshape(-1), want_y, bound_y, rtol)


def test_predict_rows(device):
    """The GPU form of a predictor picks the CPU kernel's rows (but for logits within float32 rounding
    of the threshold)."""
    W1, W2_t, h = rand_q(62, 96, "f32", 1), rand_q(62, 200, "f32", 2), rand_x(96, seed=3)
    logits = np.maximum(W1.dequantize().astype(np.float64) @ h.numpy(), 0) @ W2_t.dequantize().astype(np.float64)
    thr = float(np.median(logits))
    near = set(np.flatnonzero(np.abs(logits - thr) < 1e-4 * np.abs(logits).max()))
    ours = kernels.predict_rows(kernels.to_cuda(W1, device), kernels.to_cuda(W2_t, device), h.to(device), thr)
    assert ours.dtype == np.int64 and np.all(np.diff(ours) > 0)
    assert set(ours) - near == set(kernels.predict_rows(W1, W2_t, h, thr)) - near


@pytest.mark.parametrize("op", ["gather", "scatter", "ffn", "embedding", "decode"])
@pytest.mark.parametrize("bad", [[0, 96], [-1], [3, 1000]])
def test_out_of_range_rows_rejected(op, bad, device):
    W = kernels.to_cuda(rand_q(96, 64, "q4_1"), device)
    x, y = torch.randn(64, device=device), torch.zeros(64, device=device)
    call = {
        "gather": lambda r: kernels.gather_matvec(W, r, x),
        "scatter": lambda r: kernels.scatter_axpy(W, r, torch.ones(len(r), device=device), y),
        "ffn": lambda r: kernels.sparse_ffn(W, W, W, r, x, "relu"),
        "embedding": lambda r: kernels.embedding(W, r),
        "decode": lambda r: cuda.decode_rows(W, r),
    }[op]
    for r in (np.array(bad), torch.tensor(bad, device=device)):
        with pytest.raises(ValueError, match=r"out of range: valid ids are 0\.\.95"):
            call(r)
    assert not y.any()  # nothing was written


def test_bad_arguments_rejected(device):
    W = kernels.to_cuda(rand_q(96, 64, "q8_0"), device)
    x = torch.randn(64, device=device)
    with pytest.raises(ValueError, match="integer"):
        kernels.gather_matvec(W, np.array([1.0, 2.0]), x)
    with pytest.raises(ValueError, match="1-D"):
        kernels.gather_matvec(W, np.array([[1, 2]]), x)
    with pytest.raises(ValueError, match="coefficients"):
        kernels.scatter_axpy(W, [1, 2], torch.ones(3, device=device), torch.zeros(64, device=device))


# ---------------------------------------------------------------------------------------------
# real SmolLM2 weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("qtype", FORMATS)
def test_real_weights_every_format(model, qtype, device):
    """Layer 5's FFN and the token embeddings (Q4_1 and Q8_0 as stored) converted to each format;
    bit-exact decoding, a dense projection and a random half of the neurons active."""
    L, E = model.weights.layers[5], model.weights.embed
    Qg, Qu, Qe = (W if W.qtype == qtype else quantize(W.dequantize(), qtype) for W in (L.gate, L.up, E))
    Qd_t = kernels.transpose_down(L.down, qtype if qtype in ("f32", "f16", "bf16", "q8_0") else None)
    rows = np.random.default_rng(0).permutation(Qg.shape[0])[:768]
    ids = np.array([0, 1, Qe.shape[0] - 1, 1234])
    assert np.array_equal(cuda.decode_rows(kernels.to_cuda(Qe, device), ids, torch.float32).cpu().numpy(),
                          Qe.dequantize(ids))
    Wg = kernels.to_cuda(Qg, device)
    assert np.array_equal(cuda.decode_rows(Wg, rows, torch.float32).cpu().numpy(), Qg.dequantize(rows))
    x = rand_x(1, Qg.shape[1])
    check(kernels.linear(Wg, x.to(device)), ref.linear(Qg, x.numpy(), q8=False),
          np.abs(x.numpy()) @ absw(Qg).T, RTOL[qtype])
    check_sparse_ffn(Qg, Qu, Qd_t, rows, x, "silu", device)


# ---------------------------------------------------------------------------------------------
# CUDA only: device memory
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_gpu_memory_is_the_stored_bytes(qtype, device, monkeypatch):
    """A weight takes its stored bytes on the GPU (what the placement plan counts), not a dense copy
    (q4_1 as f16 would take 3.2x), and a dense product's temporaries stay within a few decode tiles
    (decoding the whole matrix at once would take 28x TILE_BYTES here)."""
    monkeypatch.setattr(cuda, "TILE_BYTES", 4 << 20)
    Q = rand_q(8192, 2048, qtype)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    W = kernels.to_cuda(Q, device)
    assert torch.cuda.memory_allocated() - before < Q.nbytes + (2 << 20)
    x = torch.randn(1, 2048, device=device)
    kernels.linear(W, x)  # cuBLAS allocates its workspace on the first call
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kernels.linear(W, x)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= 5 * cuda.TILE_BYTES


# ---------------------------------------------------------------------------------------------
# the GPU benchmark: CI has no GPU, so its one run before a GPU is lent is here, on the torch path
# ---------------------------------------------------------------------------------------------


def test_gpu_benchmark_runs_on_the_torch_path():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels_gpu.py"
    run = subprocess.run([sys.executable, str(script), "--device", "cpu", "--quick"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ")]
    formats = {cells[1].strip() for cells in rows if len(cells) == 7}
    assert formats >= set(FORMATS), run.stdout
    assert {cells[1].strip() for cells in rows if len(cells) == 5} >= {"gather_matvec", "scatter_axpy (q8_0)", "sparse_ffn",
                                                                      "float32", "float16"}  # the attention table's caches
    if not torch.cuda.is_available():
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
        assert run.returncode != 0 and "no CUDA device" in run.stderr


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("pos,T", [(0, 1), (9, 1), (0, 5), (6, 4)])
def test_attention(kv, interleaved, pos, T, device):
    """A layer's attention on its device (`device_attention`: one token, or a prompt's T) against the reference
    token by token: 6 query heads on 2 kv heads, keys and values written into the cache rounded to its dtype
    (rotated keys within float32 rounding, a float16 cache's within one rounding of it)."""
    n_ctx, KV, H, hd = 16, 2, 6, 8
    rng = np.random.default_rng(pos + T)
    dt = np.float16 if kv == "f16" else np.float32
    kc0 = rng.standard_normal((n_ctx, KV, hd)).astype(dt)
    vc0 = rng.standard_normal((n_ctx, KV, hd)).astype(dt)
    q, k, v = (rng.standard_normal((T, n * hd)).astype(np.float32) for n in (H, KV, KV))
    ang = np.outer(np.arange(pos, pos + T), 1.0 / 10000 ** (np.arange(0, hd, 2) / hd))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    kc, vc = (torch.from_numpy(c.copy()).to(device) for c in (kc0, vc0))
    out = kernels.device_attention(*(torch.from_numpy(a).to(device) for a in (q, k, v)), kc, vc, pos,
                                   cos[0] if T == 1 else cos, sin[0] if T == 1 else sin, interleaved)
    assert out.shape == (T, H * hd) and out.device.type == device
    want_k, want_v = kc0, vc0
    for t in range(T):  # the reference, one token at a time
        want, want_k, want_v = ref.attention_decode(q[t], k[t], v[t], want_k, want_v, pos + t, cos[t], sin[t],
                                                    interleaved)
        np.testing.assert_allclose(out[t].cpu().numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kc.cpu().numpy()[: pos + T], want_k[: pos + T], rtol=1e-3 if kv == "f16" else 1e-6)
    np.testing.assert_array_equal(vc.cpu().numpy()[: pos + T], want_v[: pos + T])
    np.testing.assert_array_equal(kc.cpu().numpy()[pos + T :], kc0[pos + T :])  # nothing past them written
    with pytest.raises(ValueError, match="outside the cache"):
        kernels.device_attention(*(torch.from_numpy(a).to(device) for a in (q, k, v)), kc, vc, n_ctx - T + 1,
                                 cos, sin, interleaved)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.device_attention(torch.from_numpy(q).to(device), torch.from_numpy(q).to(device),
                                 torch.from_numpy(v).to(device), kc, vc, pos, cos, sin, interleaved)


def test_rms_norm_on_a_device(device):
    """The GPU's RMS norm (`kernels.rms_norm` of an x there) against the CPU kernel's."""
    x, w = rand_x(3, 64), rand_x(64, seed=2)
    out = cuda.rms_norm(x.to(device), w.to(device), 1e-5)
    assert out.device.type == device
    if device != "cpu":
        torch.testing.assert_close(kernels.rms_norm(x.to(device), w.to(device), 1e-5), out)
    np.testing.assert_allclose(out.cpu().numpy(), kernels.rms_norm(x.numpy(), w.numpy(), 1e-5), rtol=1e-5, atol=1e-6)
