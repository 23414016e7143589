"""The CUDA kernels against the reference on the GPU; skipped where no GPU exists (CI compiles
them with FORCE_CUDA=1)."""

import pytest
import torch

import unet_fast
from tests.helpers import LAYOUTS, assert_histories_close, layout, training_history
from unet_fast import ops, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("x_layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_double_conv_matches_reference_on_cuda(training, x_layout, dtype):
    x = layout(torch.randn(2, 3, 37, 45, device="cuda", dtype=dtype), x_layout).requires_grad_()
    w1 = (torch.randn(8, 3, 3, 3, device="cuda", dtype=dtype) * 0.3).requires_grad_()
    w2 = (torch.randn(5, 8, 3, 3, device="cuda", dtype=dtype) * 0.3).requires_grad_()
    g = (torch.rand(8, device="cuda", dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(8, device="cuda", dtype=dtype).requires_grad_()
    results = []
    for backend in ("cuda", "reference"):
        s1 = [torch.zeros(8, device="cuda", dtype=dtype), torch.ones(8, device="cuda", dtype=dtype)]
        s2 = [torch.zeros(5, device="cuda", dtype=dtype), torch.ones(5, device="cuda", dtype=dtype)]
        out = ops.double_conv(x, w1, None, g, b, *s1, w2, None, None, None, *s2, training,
                              backend=backend)
        results.append([[out, *torch.autograd.grad(out.square().sum(), (x, w1, g, b, w2)),
                         *s1, *s2]])
    assert_histories_close(results[0], results[1], dtype)


@pytest.mark.parametrize("size", [(9, 8), (7, 10), (5, 5)])
def test_crop_concat_on_cuda(size):
    skip = torch.randn(2, 3, 9, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    up = torch.randn(2, 4, 6, 11, device="cuda").requires_grad_()
    skip.requires_grad_()
    out = ops.crop_concat(skip, up, size, backend="cuda")
    want = reference.crop_concat(skip, up, size)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    grad = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(out, (skip, up), grad),
                               torch.autograd.grad(want, (skip, up), grad), rtol=0, atol=0)


def test_opcheck_on_cuda():
    x = torch.randn(2, 3, 8, 9, device="cuda", dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device="cuda", dtype=torch.float64, requires_grad=True)
    g = torch.rand(4, device="cuda", dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.unet_fast.conv_bn_relu.default, (x, w, None, g, None, 1e-5, 1))
    torch.library.opcheck(torch.ops.unet_fast.crop_concat.default, (x, x[:, :2], (5, 7)))


@pytest.mark.parametrize("dtype", [torch.float32])
def test_unet_on_cuda_matches_reference(dtype):
    ours = unet_fast.UNet(3, 2, base_features=4, bilinear=False).to("cuda", dtype)
    ref = reference.UNet(3, 2, base_features=4, bilinear=False).to("cuda", dtype)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 37, 45, device="cuda", dtype=dtype)
    assert_histories_close(training_history(ours, x), training_history(ref, x), dtype)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
def test_bfloat16_unet_on_gpu_within_the_rule(x_layout, backend, training):
    """A bfloat16 UNet on each GPU backend: RMS error against float64 at most twice the
    reference's own bfloat16 error (DESIGN.md's rule), outputs and parameter gradients."""
    from tests.helpers import assert_bf16_within_rule, bf16_rule_runs
    ours = unet_fast.UNet(3, 2, base_features=8, bilinear=False, backend=backend)
    ref = reference.UNet(3, 2, base_features=8, bilinear=False)
    ref.load_state_dict(ours.state_dict())
    x = layout(torch.randn(2, 3, 40, 48, device="cuda", dtype=torch.float64), x_layout)
    assert_bf16_within_rule(*bf16_rule_runs(ours, ref, x, training))


@pytest.mark.parametrize("channels", [3, 64, 300])
@pytest.mark.parametrize("x_layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_batch_norm_relu_kernels_every_width(dtype, x_layout, channels):
    """Vectorised and scalar paths (channel counts that do and do not fill 16-byte vectors, more
    channels than a block's lanes) against float64 batch norm on the same values."""
    y = layout(torch.randn(3, channels, 9, 17, device="cuda") * 2 + 1, x_layout).to(dtype)
    g = torch.rand(channels, device="cuda") + 0.5
    b = torch.randn(channels, device="cuda")
    out, mean, invstd, var = torch.ops.unet_fast.batch_norm_relu(y, g, b, 1e-5)
    exact = y.double()
    torch.testing.assert_close(mean.double(), exact.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), exact.var((0, 2, 3)), rtol=1e-4, atol=1e-5)
    want = torch.relu(torch.nn.functional.batch_norm(exact, None, None, g.double(), b.double(), True))
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * 4)
    assert out.stride() == y.contiguous(memory_format=torch._prims_common.suggest_memory_format(y)).stride()
    grad = torch.randn_like(out)
    grad_y, grad_g, grad_b = torch.ops.unet_fast.batch_norm_relu_backward(grad, y, g, b, mean, invstd)
    exact.requires_grad_()
    g64, b64 = g.double().requires_grad_(), b.double().requires_grad_()
    ref = torch.relu(torch.nn.functional.batch_norm(exact, None, None, g64, b64, True))
    want_grads = torch.autograd.grad(ref, (exact, g64, b64), grad.double())
    for got, want_grad in zip((grad_y, grad_g, grad_b), want_grads):
        scale = want_grad.abs().max().item()
        torch.testing.assert_close(got.double(), want_grad, rtol=tol * 4, atol=tol * 4 * scale)


@pytest.mark.parametrize("channels", [(64, 32), (3, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_crop_concat_vector_and_scalar_paths(dtype, channels):
    skip = torch.randn(2, channels[0], 20, 22, device="cuda", dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    up = torch.randn(2, channels[1], 16, 16, device="cuda", dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    for size in ((16, 16), (18, 20), (20, 22)):
        for backend in ("cuda", "triton"):
            out = ops.crop_concat(skip, up, size, backend=backend)
            torch.testing.assert_close(out, reference.crop_concat(skip, up, size), rtol=0, atol=0)
