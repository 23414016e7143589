"""conv_bias_relu (the eval path: BatchNorm folded, ReLU fused) against the reference on every
backend, and its Triton kernel's single launch."""

import pytest
import torch

from tests.helpers import TRITON_DEVICE, assert_close, layout, poison
from unet_fast import ops, reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("padding, kernel", [(1, 3), (0, 3), (0, 1)])
def test_matches_reference_with_gradients(backend, device, dtype, x_layout, padding, kernel):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton: computes float32, bfloat16 and float16")
    x = layout(torch.randn(2, 3, 7, 9, device=device, dtype=dtype), x_layout).requires_grad_()
    w = torch.randn(5, 3, kernel, kernel, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(5, device=device, dtype=dtype, requires_grad=True)
    got = ops.conv_bias_relu(x, w, b, padding, backend=backend)
    want = reference.conv_bias_relu(x, w, b, padding)
    grad = torch.randn_like(want)
    assert_close(
        [got, *torch.autograd.grad(got, (x, w, b), grad)],
        [want, *torch.autograd.grad(want, (x, w, b), grad)],
        dtype,
    )


def test_opcheck():
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.unet_fast.conv_bias_relu.default, (x, w, None, 1))


def test_eval_conv_runs_in_one_kernel_with_relu_in_the_epilogue():
    x = torch.randn(2, 3, 10, 7, device=TRITON_DEVICE, requires_grad=True)
    w = (torch.randn(5, 3, 3, 3, device=TRITON_DEVICE) * 0.3).requires_grad_()
    b = torch.randn(5, device=TRITON_DEVICE, requires_grad=True)
    for padding in (1, 0):
        out = ops.conv_bias_relu(x, w, b, padding, backend="triton")
        assert "conv_bias_relu_triton" in out.grad_fn.name()
        want = reference.conv_bias_relu(x, w, b, padding)
        grad = torch.randn_like(want)
        assert_close(
            [out, *torch.autograd.grad(out, (x, w, b), grad)],
            [want, *torch.autograd.grad(want, (x, w, b), grad)],
            torch.float32,
        )


@pytest.mark.parametrize("poisoned", ["x", "weight"])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
def test_nan_and_inf_propagate_as_in_the_reference(backend, device, x_layout, poisoned):
    """relu(NaN) is NaN: a corrupted input or weight never turns into plausible output. Poisoned
    weights are checked without padding: whether a padded tap multiplies 0 by a NaN weight is the
    convolution library's choice (oneDNN skips it, an implicit GEMM does not)."""
    x = layout(torch.randn(2, 3, 7, 9, device=device), x_layout)
    w, b = torch.randn(5, 3, 3, 3, device=device), torch.randn(5, device=device)
    x, w = (poison(x), w) if poisoned == "x" else (x, poison(w))
    padding = 1 if poisoned == "x" else 0
    want = reference.conv_bias_relu(x, w, b, padding)
    got = ops.conv_bias_relu(x, w, b, padding, backend=backend)
    assert want.isnan().any() and got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
