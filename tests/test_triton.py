"""The Triton kernels against the reference, run through Triton's interpreter on the CPU
(TRITON_INTERPRET=1, set in conftest) and natively where a GPU exists. Small shapes, float32,
sizes that leave masked tails in every block."""
import pytest
import torch
import torch.nn.functional as F

import unet_fast
from tests.helpers import LAYOUTS, assert_close, layout
from unet_fast import _backend, ops, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ops.load_triton()  # registers the triton_ops (opcheck calls them by name)


def bn_inputs(shape=(2, 5, 7, 9), x_layout="contiguous"):
    y = layout(torch.randn(shape, device=DEVICE) * 3 + 2, x_layout)
    g = torch.rand(shape[1], device=DEVICE) + 0.5
    b = torch.randn(shape[1], device=DEVICE)
    return y, g, b


@pytest.mark.parametrize("x_layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (3, 16, 1, 1), (1, 3, 33, 17)])
def test_batch_norm_relu_forward_backward_and_running_stats(shape, x_layout):
    y, g, b = bn_inputs(shape, x_layout)
    stats = [torch.zeros(shape[1], device=DEVICE), torch.ones(shape[1], device=DEVICE)]
    ref_stats = [s.clone() for s in stats]
    inputs = [y.clone().requires_grad_(), g.clone().requires_grad_(), b.clone().requires_grad_()]
    ref_inputs = [t.clone().detach().requires_grad_() for t in inputs]
    out = ops.batch_norm_relu(*inputs, *stats, 0.3, 1e-5, backend="triton")
    want = F.relu(F.batch_norm(ref_inputs[0], *ref_stats, *ref_inputs[1:], True, 0.3, 1e-5))
    assert "triton" in out.grad_fn.name()
    grad = torch.randn_like(want)
    assert_close([out, *torch.autograd.grad(out, inputs, grad), *stats],
                 [want, *torch.autograd.grad(want, ref_inputs, grad), *ref_stats], torch.float32)


@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_conv_bn_relu_and_double_conv(training, x_layout):
    x = layout(torch.randn(2, 3, 10, 13, device=DEVICE), x_layout).requires_grad_()
    w1 = (torch.randn(4, 3, 3, 3, device=DEVICE) * 0.3).requires_grad_()
    w2 = (torch.randn(5, 4, 3, 3, device=DEVICE) * 0.3).requires_grad_()
    g, b = (torch.rand(4, device=DEVICE) + 0.5).requires_grad_(), torch.randn(4, device=DEVICE)
    stats = lambda c: [torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE) * 2]  # noqa: E731
    results = []
    for backend in ("triton", "reference"):
        s1, s2 = stats(4), stats(5)
        out = ops.double_conv(x, w1, None, g, b, *s1, w2, None, None, None, *s2, training,
                              backend=backend)
        results.append([out, *torch.autograd.grad(out.square().sum(), (x, w1, g, w2)), *s1, *s2])
    assert_close(results[0], results[1], torch.float32)


@pytest.mark.parametrize("skip_layout, up_layout", [("contiguous", "contiguous"),
                                                    ("channels_last", "strided")])
@pytest.mark.parametrize("size", [(9, 8), (7, 10), (5, 5), (1, 1)])
def test_crop_concat(size, skip_layout, up_layout):
    skip = layout(torch.randn(2, 3, 9, 8, device=DEVICE), skip_layout).requires_grad_()
    up = layout(torch.randn(2, 4, 6, 11, device=DEVICE), up_layout).requires_grad_()
    out = ops.crop_concat(skip, up, size, backend="triton")
    want = reference.crop_concat(skip, up, size)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    grad = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(out, (skip, up), grad),
                               torch.autograd.grad(want, (skip, up), grad), rtol=0, atol=0)


# Triton's interpreter runs kernels eagerly, even on fake tensors: fake-tensor and AOT checks run
# only where a GPU compiles the kernels.
CHECKS = (None if torch.cuda.is_available() else ("test_schema", "test_autograd_registration"))


def test_opcheck_triton_ops():
    opcheck = lambda op, args: torch.library.opcheck(  # noqa: E731
        op, args, **({"test_utils": CHECKS} if CHECKS else {}))
    y, g, b = bn_inputs()
    out, mean, invstd, _ = torch.ops.unet_fast.batch_norm_relu_triton(y, g, b, 1e-5)
    opcheck(torch.ops.unet_fast.batch_norm_relu_triton.default, (y.requires_grad_(), g, b, 1e-5))
    opcheck(torch.ops.unet_fast.batch_norm_relu_backward_triton.default,
            (torch.randn_like(out), y.detach(), g, b, mean, invstd))
    skip, up = torch.randn(2, 3, 9, 8, device=DEVICE), torch.randn(2, 4, 6, 11, device=DEVICE)
    opcheck(torch.ops.unet_fast.crop_concat_triton.default,
            (skip.requires_grad_(), up.requires_grad_(), [7, 10]))


def test_unet_on_the_triton_backend_matches_reference():
    ours = unet_fast.UNet(3, 2, base_features=4, bilinear=False, backend="triton").to(DEVICE)
    ref = reference.UNet(3, 2, base_features=4, bilinear=False).to(DEVICE)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    results = []
    for model in (ours, ref):
        out = model(x)
        out.square().mean().backward()
        results.append([out] + [p.grad for p in model.parameters()] + list(model.buffers()))
        with torch.no_grad():
            results[-1].append(model.eval()(x))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(want.abs().max().item(), 1))


def test_bad_input_and_nan():
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        ops.batch_norm_relu(torch.randn(2, 3, 4, 4, dtype=torch.float64, device=DEVICE), None,
                            None, backend="triton")
    y, g, b = bn_inputs()
    y[0, 1, 2, 3] = float("nan")
    out = ops.batch_norm_relu(y, g, b, backend="triton")
    assert out[:, 1].isnan().all() and not out[:, 0].isnan().any()


@pytest.mark.parametrize("padding", [1, 0])
def test_implicit_gemm_double_conv_writes_only_the_conv_outputs(padding):
    """The Triton double conv: layer 1's BatchNorm + ReLU runs in layer 2's convolution prologue,
    statistics come from the convolutions' epilogues; it keeps x, y1, y2 for backward."""
    x = torch.randn(2, 3, 11, 13, device=DEVICE, requires_grad=True)
    w1 = (torch.randn(6, 3, 3, 3, device=DEVICE) * 0.3).requires_grad_()
    w2 = (torch.randn(5, 6, 3, 3, device=DEVICE) * 0.3).requires_grad_()
    b1 = torch.randn(6, device=DEVICE, requires_grad=True)
    g1, g2 = torch.rand(6, device=DEVICE) + 0.5, torch.rand(5, device=DEVICE) + 0.5
    args = (x, w1, b1, g1, None, None, None, w2, None, g2, None, None, None, True, 0.1, 0.1,
            1e-5, 1e-5, padding)
    params = {t.untyped_storage().data_ptr() for t in (w1, w2, b1, g1, g2)}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and t.dim() == 4:
            saved[t.untyped_storage().data_ptr()] = tuple(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ops.double_conv(*args[:-1], padding=padding, backend="triton")
    assert "double_conv_triton" in out.grad_fn.name()
    h1, w1_ = 11 + 2 * padding - 2, 13 + 2 * padding - 2
    # x, y1, y2 — no normalised activation stored
    assert sorted(saved.values()) == sorted([(2, 3, 11, 13), (2, 6, h1, w1_),
                                             (2, 5, h1 + 2 * padding - 2, w1_ + 2 * padding - 2)])
    want = reference.double_conv(*args)
    grad = torch.randn_like(want)
    inputs = (x, w1, b1, w2)
    assert_close([out, *torch.autograd.grad(out, inputs, grad)],
                 [want, *torch.autograd.grad(want, inputs, grad)], torch.float32)


def test_eval_conv_runs_in_one_kernel_with_relu_in_the_epilogue():
    x = torch.randn(2, 3, 10, 7, device=DEVICE, requires_grad=True)
    w = (torch.randn(5, 3, 3, 3, device=DEVICE) * 0.3).requires_grad_()
    b = torch.randn(5, device=DEVICE, requires_grad=True)
    for padding in (1, 0):
        out = ops.conv_bias_relu(x, w, b, padding, backend="triton")
        assert "conv_bias_relu_triton" in out.grad_fn.name()
        want = reference.conv_bias_relu(x, w, b, padding)
        grad = torch.randn_like(want)
        assert_close([out, *torch.autograd.grad(out, (x, w, b), grad)],
                     [want, *torch.autograd.grad(want, (x, w, b), grad)], torch.float32)
