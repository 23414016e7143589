"""The CUDA kernels against the reference on the GPU; skipped where no GPU exists (CI compiles
them with FORCE_CUDA=1)."""
import pytest
import torch

import unet_fast
from conftest import LAYOUTS, assert_histories_close, layout, training_history
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
