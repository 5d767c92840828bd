"""CUDA kernels (torch on the GPU) against the numpy reference; skipped without CUDA.

Tolerance: weights are f16 on the device and inputs are rounded to f16 before the matmul
(float32 accumulation), so |ours - reference| <= 2e-3 * (|W| @ |x|) elementwise (f16 has
2^-11 relative rounding on each of weight and input). Block formats take x as given (float), so the
reference is called with q8=False (the CPU kernels quantize x to 8 bits per block instead).
"""
import numpy as np
import pytest
import torch

from hetinfer import kernels
from hetinfer.kernels import reference as ref
from hetinfer.tensors import FORMATS, quantize

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

RTOL = 2e-3


def setup(qtype, rows=96, cols=64, seed=0):
    rng = np.random.default_rng(seed)
    Q = quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    return Q, kernels.to_cuda(Q)


def check(ours, want, bound):
    err = np.abs(ours.detach().cpu().numpy() - want)
    assert err.shape == want.shape and np.all(err <= RTOL * bound + 1e-6), err.max()


@pytest.mark.parametrize("qtype", FORMATS)
def test_dense_and_sparse(qtype):
    Q, W = setup(qtype)
    Qu, Wu = setup(qtype, seed=1)
    Qd, Wd = setup(qtype, seed=2)  # neuron-major down [n_ff, d]
    x = torch.randn(1, 64)
    xc = x.cuda()
    absw = lambda M, r=None: np.abs(M.dequantize(r)).astype(np.float64)  # noqa: E731
    check(kernels.linear(W, xc), ref.linear(Q, x.numpy(), q8=False), np.abs(x.numpy()) @ absw(Q).T)
    rows = np.array([90, 3, 17, 5, 3])
    check(kernels.gather_matvec(W, rows, xc[0]), ref.gather_matvec(Q, rows, x.numpy()[0], q8=False),
          np.abs(x.numpy()[0]) @ absw(Q, rows).T)
    a, y = torch.randn(len(rows)), torch.zeros(64)
    yc = y.cuda()
    assert kernels.scatter_axpy(Wd, torch.from_numpy(rows).cuda(), a.cuda(), yc) is yc
    check(yc, ref.scatter_axpy(Qd, rows, a.numpy(), y.numpy()), np.abs(a.numpy()) @ absw(Qd, rows))
    out, h = kernels.sparse_ffn(W, Wu, Wd, rows, xc, "silu", return_act=True)
    want_y, want_h = ref.sparse_ffn(Q, Qu, Qd, rows, x.numpy(), "silu", q8=False)
    np.testing.assert_allclose(h.cpu().numpy(), want_h, rtol=2e-2, atol=2e-2 * np.abs(want_h).max())
    np.testing.assert_allclose(out[0].cpu().numpy(), want_y, rtol=2e-2, atol=2e-2 * np.abs(want_y).max())
    assert torch.equal(kernels.embedding(W, torch.tensor([4, 0])).cpu(), W[[4, 0]].float().cpu())


def test_rows_validated_and_empty():
    _, W = setup("q4_1")
    x = torch.randn(64, device="cuda")
    assert kernels.gather_matvec(W, np.array([], np.int64), x).shape == (0,)
    with pytest.raises(ValueError, match=r"valid ids are 0\.\.95"):
        kernels.gather_matvec(W, np.array([96]), x)
    with pytest.raises(ValueError, match=r"valid ids are 0\.\.95"):
        kernels.sparse_ffn(W, W, W, torch.tensor([-1], device="cuda"), x, "relu")
