"""conv_bias_relu (the eval path: BatchNorm folded, ReLU fused) against the reference on every
backend, its Triton kernel's single launch, and the CPU's Winograd F(2x2, 3x3) kernel."""

import pytest
import torch

from tests.helpers import (
    TRITON_DEVICE,
    assert_bf16_within_rule,
    assert_close,
    layout,
    poison,
    printed_on_import,
)
from unet_fast import _backend, ops, reference
from unet_fast._common import fold
from unet_fast.ops.conv_bias_relu import frozen_entries, winograd_weight


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


needs_extension = pytest.mark.skipif(
    _backend.EXTENSION_ERROR is not None, reason="unet_fast._C is not built"
)
# bfloat16 Winograd where this CPU has AVX512-BF16; float32 wherever the extension is built
WINOGRAD_DTYPES = [torch.float32] + [torch.bfloat16] * bool(_backend.BF16_GEMM)


def winograd_case(c_in, c_out, dtype=torch.float32, h=7, w=9, n=2, bias=True):
    """x and bias in `dtype`, the weight in float32 (a model's weights under autocast)."""
    torch.manual_seed(0)
    x = torch.randn(n, c_in, h, w).to(dtype)
    weight = torch.randn(c_out, c_in, 3, 3) * (2 / (9 * c_in)) ** 0.5
    return x, weight, (torch.randn(c_out) * 0.1).to(dtype) if bias else None


def _double(t):
    return None if t is None else t.double()


# (C_in, C_out): transformed weights that bfloat16 keeps in L2 per thread, and larger ones that go
# through the whole image in chunks
WINOGRAD_CHANNELS = [(32, 64), (192, 160)]


@needs_extension
@pytest.mark.parametrize("channels", WINOGRAD_CHANNELS)
@pytest.mark.parametrize("dtype", WINOGRAD_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("h, w", [(7, 9), (8, 8), (1, 2)])
def test_winograd_matches_the_reference(x_layout, h, w, bias, dtype, channels):
    """F(2x2, 3x3), odd and even sizes (partial tiles at the edges), output in x's layout. float32
    within DESIGN.md's tolerance; bfloat16 from float32 weights (autocast) within the bfloat16 rule
    of the convolution autocast runs, which rounds the weights as Winograd rounds their
    transform."""
    x, weight, b = winograd_case(*channels, dtype, h, w, bias=bias)
    x = layout(x, x_layout)
    u = winograd_weight(weight, dtype)
    got = torch.ops.unet_fast.conv_bias_relu_winograd(x, weight.to(dtype), b, u)
    fmt = torch.channels_last if x_layout == "channels_last" else torch.contiguous_format
    assert got.dtype == dtype and got.is_contiguous(memory_format=fmt)
    exact = reference.conv_bias_relu(x.double(), weight.double(), _double(b), 1)
    if dtype == torch.float32:
        assert_close(got, exact.float(), torch.float32)
    else:
        direct = reference.conv_bias_relu(x, weight.to(dtype), b, 1)
        assert_bf16_within_rule([got], [direct], [exact])


@needs_extension
@pytest.mark.parametrize("channels", WINOGRAD_CHANNELS)
@pytest.mark.parametrize("dtype", WINOGRAD_DTYPES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 2.0**50])
def test_winograd_inputs_out_of_its_range_take_the_direct_path(dtype, value, channels):
    """The transforms subtract inputs (Inf - Inf = NaN where the direct convolution keeps Inf), and
    past 2^48 their products could overflow: such inputs give exactly the direct result."""
    x, weight, b = winograd_case(*channels, dtype)
    x[1, 3, 4, 4] = value
    u, weight = winograd_weight(weight, dtype), weight.to(dtype)
    got = torch.ops.unet_fast.conv_bias_relu_winograd(x, weight, b, u)
    want = torch.ops.unet_fast.conv_bias_relu(x, weight, b, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    if value != 2.0**50:
        assert want.isnan().any() or want.isinf().any()


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_winograd_weight_is_g_w_gt_in_the_kernels_layout(dtype):
    _, weight, _ = winograd_case(6, 64)
    g = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
    want = torch.einsum("ak,oikl,bl->abio", g, weight.double(), g).reshape(16, 6, 64)
    got = winograd_weight(weight, dtype)
    if dtype == torch.bfloat16:  # panels of 32 output channels, input channels in pairs
        assert got.shape == (16, 2, 3, 32, 2)
        got = got.permute(0, 2, 4, 1, 3).reshape(16, 6, 64)
    tol = 1e-6 if dtype == torch.float32 else 2**-8  # one bfloat16 rounding
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=1e-6)
    torch.library.opcheck(torch.ops.unet_fast.winograd_weight.default, (weight, dtype))
    with pytest.raises(RuntimeError, match="must be \\(C_out, C_in, 3, 3\\)"):
        winograd_weight(weight[..., :2], dtype)
    if dtype == torch.bfloat16:
        with pytest.raises(RuntimeError, match="multiple of 32"):
            winograd_weight(weight[:48], dtype)


@needs_extension
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2.0**50])
def test_winograd_weights_out_of_range_are_refused(value):
    _, weight, _ = winograd_case(32, 32)
    assert winograd_weight(weight, torch.float32) is not None
    weight[3, 2, 1, 1] = value
    assert winograd_weight(weight, torch.float32) is None
    assert winograd_weight(weight, torch.bfloat16) is None


@needs_extension
@pytest.mark.parametrize("dtype", WINOGRAD_DTYPES)
def test_winograd_refuses_mismatched_weights(dtype):
    x, weight, b = winograd_case(32, 64, dtype)
    u = winograd_weight(weight, dtype)
    with pytest.raises(RuntimeError, match="winograd_weight must be"):
        torch.ops.unet_fast.conv_bias_relu_winograd(x[:, :16], weight.to(dtype), b, u)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.unet_fast.conv_bias_relu_winograd(x.double(), weight.double(), None, u)
    with pytest.raises(RuntimeError, match="bias must have"):
        torch.ops.unet_fast.conv_bias_relu_winograd(x, weight.to(dtype), b[:32], u)


@needs_extension
@pytest.mark.parametrize("dtype", WINOGRAD_DTYPES)
def test_winograd_opcheck(dtype):
    x, weight, b = winograd_case(32, 64, dtype, 6, 5)
    u = winograd_weight(weight, dtype)
    torch.library.opcheck(
        torch.ops.unet_fast.conv_bias_relu_winograd.default, (x, weight.to(dtype), b, u)
    )


@needs_extension
@pytest.mark.parametrize("autocast", [False, True])
def test_frozen_layers_take_winograd_where_it_pays(monkeypatch, autocast):
    """The rule: layers wide enough (C_in * C_out / (C_in + C_out) at least 64 in float32, 40 in
    bfloat16 under autocast) run Winograd; narrower ones, weights already in bfloat16 and
    UNET_FAST_CPU_WINOGRAD=0 the direct convolution. Within the dtype's tolerance either way."""
    if autocast and not _backend.BF16_GEMM:
        pytest.skip("bfloat16 Winograd needs a CPU with AVX512-BF16")
    dtype = torch.bfloat16 if autocast else torch.float32
    wide, narrow = (96, 64) if autocast else (128, 96)
    cases = [(wide, torch.float32, True), (narrow, torch.float32, False)]
    cases += [(wide, torch.bfloat16, False)] if autocast else []
    for c, weight_dtype, expected in cases:
        for enabled in (True, False):
            monkeypatch.setattr(_backend, "CPU_WINOGRAD", enabled)
            x, weight, bias = winograd_case(c, c, h=5, w=6, n=1)
            bn = torch.nn.BatchNorm2d(c).eval()
            with torch.no_grad():
                bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 2)
            params = [t.to(weight_dtype) for t in (weight, bias, bn.weight, bn.bias)]
            params += [bn.running_mean.to(weight_dtype), bn.running_var.to(weight_dtype)]
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                got = ops.conv_bn_relu_frozen(x, *params, bn.eps, 1, backend="cpu")
            assert (frozen_entries(params[0])[dtype][1][2] is not None) == (expected and enabled)
            x = x.to(dtype)
            exact = reference.conv_bias_relu(x.double(), *fold(*params, bn.eps, torch.float64), 1)
            if dtype == torch.float32:
                assert_close(got, exact.float(), torch.float32)
            else:
                direct = reference.conv_bias_relu(x, *fold(*params, bn.eps, dtype), 1)
                assert_bf16_within_rule([got], [direct], [exact])


@pytest.mark.parametrize("value, ok", [("0", True), ("1", True), ("yes", False)])
def test_the_winograd_switch_comes_from_the_environment(value, ok):
    code = (
        "import unet_fast; print(','.join(map(str, unet_fast.backends()['cpu_winograd'].values())))"
    )
    on = value == "1"
    want = f"{on and _backend.EXTENSION_ERROR is None},{on and _backend.BF16_GEMM}"
    assert printed_on_import(code, "UNET_FAST_CPU_WINOGRAD", value) == (want if ok else None)
