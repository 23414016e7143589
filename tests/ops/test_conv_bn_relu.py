"""conv_bn_relu / double_conv / batch_norm_relu kernels against the reference."""

import pytest
import torch
import torch.nn.functional as F

import unet_fast
from tests.helpers import (
    LAYOUTS,
    TRITON_DEVICE,
    assert_bf16_within_rule,
    assert_close,
    assert_histories_close,
    layout,
    needs_cuda,
    poison,
)
from unet_fast import ops, reference

# (N, C_in, C_out, H, W, padding)
SHAPES = [(2, 3, 64, 97, 131, 1), (2, 1, 1, 1, 1, 1), (2, 5, 7, 12, 10, 0), (3, 16, 8, 9, 9, 1)]


def layer(c_in, c_out, dtype, bias=False, values=None):
    """Conv + BatchNorm parameters with non-trivial values, and running statistics. `values`
    rounds them through another dtype first (float64 copies of bfloat16 inputs)."""
    g = torch.Generator().manual_seed(c_in * 100 + c_out)
    rand = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    params = [
        (rand(c_out, c_in, 3, 3) - 0.5) / (c_in * 9) ** 0.5 * 3,
        rand(c_out) - 0.5 if bias else None,
        rand(c_out) + 0.5,
        rand(c_out) - 0.5,
    ]
    values = values or dtype
    params = [p.to(values).to(dtype).requires_grad_() if p is not None else None for p in params]
    return params, [rand(c_out) - 0.5, rand(c_out) + 0.5]


def step(fn, x, params, stats, grad):
    """Output and every gradient of one call (running statistics are updated in place)."""
    out = fn(x, *params, *stats)
    inputs = [t for t in (x, *params) if t is not None and t.requires_grad]
    return [out, *torch.autograd.grad(out, inputs, grad)]


def run_both(shape, dtype, x_layout, training=True, steps=3, op="conv_bn_relu", values=None):
    """[outputs and gradients, running stats] of the fused op and the reference, per step."""
    n, c_in, c_out, h, w, padding = shape
    values = values or dtype
    x = torch.randn(n, c_in, h, w, dtype=torch.float64).to(values).to(dtype)
    x = layout(x, x_layout).requires_grad_()
    p1, s1 = layer(c_in, c_out, dtype, bias=True, values=values)
    p2, s2 = layer(c_out, c_in, dtype, values=values)
    if op == "conv_bn_relu":
        fused = lambda x, *a: ops.conv_bn_relu(x, *a, training, 0.3, 1e-5, padding)  # noqa: E731
        ref = lambda x, *a: reference.conv_bn_relu(x, *a, training, 0.3, 1e-5, padding)  # noqa: E731
        params, stats = p1, s1
    else:

        def fused(x, w1, b1, g1, be1, w2, b2, g2, be2, m1, v1, m2, v2):
            return ops.double_conv(
                x,
                w1,
                b1,
                g1,
                be1,
                m1,
                v1,
                w2,
                b2,
                g2,
                be2,
                m2,
                v2,
                training,
                0.3,
                0.2,
                1e-5,
                1e-3,
                padding,
            )

        def ref(x, w1, b1, g1, be1, w2, b2, g2, be2, m1, v1, m2, v2):
            return reference.double_conv(
                x,
                w1,
                b1,
                g1,
                be1,
                m1,
                v1,
                w2,
                b2,
                g2,
                be2,
                m2,
                v2,
                training,
                0.3,
                0.2,
                1e-5,
                1e-3,
                padding,
            )

        params, stats = p1 + p2, s1 + s2
    stats_fused = [s.clone().to(dtype) for s in stats]
    stats_ref = [s.clone() for s in stats_fused]
    with torch.no_grad():
        out_shape = ref(x, *params, *[s.clone() for s in stats_ref]).shape
    results = []
    for _ in range(steps):
        grad = torch.randn(out_shape, dtype=torch.float64).to(values).to(dtype)
        results.append(
            (step(fused, x, params, stats_fused, grad), step(ref, x, params, stats_ref, grad))
        )
    return results, stats_fused, stats_ref


@pytest.mark.parametrize("op", ["conv_bn_relu", "double_conv"])
@pytest.mark.parametrize("x_layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_matches_reference(op, dtype, shape, x_layout):
    if op == "double_conv" and shape[3] * shape[4] == 1:
        shape = (*shape[:5], 1)  # padding 1 keeps 1x1 through both convs
    results, stats_fused, stats_ref = run_both(shape, dtype, x_layout, op=op, steps=3)
    for fused, ref in results:
        if dtype == torch.float32:
            # BatchNorm removes the conv bias: its exact gradient is 0, and what float32 computes
            # is the rounding noise of a sum over N*H*W values, so it is held to that scale.
            bias_fused, bias_ref = fused.pop(3), ref.pop(3)
            noise = 1e-6 * shape[0] * shape[3] * shape[4] + 1e-4
            assert bias_fused.abs().max() <= noise and bias_ref.abs().max() <= noise
        assert_close(fused, ref, dtype)
    assert_close(stats_fused, stats_ref, dtype)


@pytest.mark.parametrize("op", ["conv_bn_relu", "double_conv"])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [SHAPES[0], (1, 3, 8, 1, 1, 1)])  # N = 1 in eval
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eval_matches_reference(op, dtype, shape, x_layout):
    results, _, _ = run_both(shape, dtype, x_layout, training=False, op=op, steps=1)
    for fused, ref in results:
        assert_close(fused, ref, dtype)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
def test_bfloat16_within_twice_the_references_error(training, x_layout):
    shape = (4, 16, 32, 32, 32, 1)  # enough channels for the per-channel gradients' RMS to settle
    fused, ref_bf16 = run_both(
        shape, torch.bfloat16, x_layout, training, steps=1, op="double_conv"
    )[0][0]
    torch.manual_seed(0)  # the same bfloat16 values, computed in float64
    exact, _ = run_both(
        shape, torch.float64, x_layout, training, steps=1, op="double_conv", values=torch.bfloat16
    )[0][0]
    if training:  # the first conv's bias: exactly 0 under BatchNorm, both sides are pure noise
        for grads in (fused, ref_bf16, exact):
            grads.pop(3)
    assert_bf16_within_rule(fused, ref_bf16, exact)


def test_output_layout_follows_input():
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    (w, b, g, be), (m, v) = layer(3, 4, torch.float32)
    for training in (True, False):
        out = ops.conv_bn_relu(x, w, b, g, be, m, v, training, 0.1, 1e-5, 1)
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_batch_norm_relu_matches_functional():
    y = (torch.randn(4, 6, 5, 7, dtype=torch.float64) * 3 + 10).requires_grad_()
    g, b = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    m1, v1, m2, v2 = torch.zeros(6), torch.ones(6), torch.zeros(6), torch.ones(6)
    got = ops.batch_norm_relu(y, g, b, m1.double(), v1.double(), 0.1, 1e-5)
    want = F.relu(F.batch_norm(y, m2.double(), v2.double(), g, b, True, 0.1, 1e-5))
    assert_close(
        [got, *torch.autograd.grad(got.sum(), y)],
        [want, *torch.autograd.grad(want.sum(), y)],
        torch.float64,
    )


def conv_inputs(dtype=torch.float64, n=2, c_in=3, c_out=4, size=6):
    x = torch.randn(n, c_in, size, size + 1, dtype=dtype, requires_grad=True)
    (w, b, g, be), _ = layer(c_in, c_out, dtype, bias=True)
    return x, w, b, g, be


def test_opcheck_every_op():
    x, w, b, g, be = conv_inputs()
    (w2, _, g2, be2), _ = layer(4, 3, torch.float64)
    out, y, mean, invstd, _ = torch.ops.unet_fast.conv_bn_relu(x, w, b, g, be, 1e-5, 1)
    grad = torch.randn_like(out)
    # backward ops take no gradient themselves (no double backward through convolutions)
    xd, wd, bd, gd, bed = (t.detach() for t in (x, w, b, g, be))
    pooled = torch.randn(*y.shape[:2], y.shape[2] // 2, y.shape[3] // 2, dtype=y.dtype)
    for op, args in [
        (torch.ops.unet_fast.conv_bn_relu.default, (x, w, b, g, be, 1e-5, 1)),
        (torch.ops.unet_fast.conv_bn_relu.default, (x, w, None, None, None, 1e-5, 0)),
        (
            torch.ops.unet_fast.double_conv.default,
            (x, w, b, g, be, w2, None, g2, be2, 1e-5, 1e-3, 1),
        ),
        (torch.ops.unet_fast.batch_norm_relu.default, (y.detach().requires_grad_(), g, be, 1e-5)),
        (torch.ops.unet_fast.batch_norm_relu_apply.default, (y, gd, bed, mean, invstd)),
        (torch.ops.unet_fast.batch_norm_relu_backward.default, (grad, y, gd, bed, mean, invstd)),
        (
            torch.ops.unet_fast.batch_norm_relu_max_pool_backward.default,
            (pooled, grad, y, gd, bed, mean, invstd),
        ),
        (
            torch.ops.unet_fast.batch_norm_relu_max_pool_backward.default,
            (pooled, None, y, None, None, mean, invstd),
        ),
        (torch.ops.unet_fast.batch_norm_relu_concat.default, (y, gd, bed, mean, invstd, xd)),
        (torch.ops.unet_fast.conv_bias_relu.default, (x, w, b, 1)),
        (
            torch.ops.unet_fast.conv_bn_relu_backward.default,
            (grad, xd, wd, True, y, gd, bed, mean, invstd, 1, True),
        ),
    ]:
        torch.library.opcheck(op, args)


def test_gradcheck():
    x, w, b, g, be = conv_inputs(n=2, c_in=2, c_out=3, size=4)
    (w2, b2, g2, be2), _ = layer(3, 2, torch.float64, bias=True)
    m, v = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *a: ops.conv_bn_relu(*a, None, None, True, 0.1, 1e-5, 1), (x, w, b, g, be)
    )
    assert torch.autograd.gradcheck(
        lambda *a: ops.conv_bn_relu(*a, m, v, False, 0.1, 1e-5, 1), (x, w, b, g, be)
    )
    assert torch.autograd.gradcheck(
        lambda x, w, b, g, be, w2, b2, g2, be2: ops.double_conv(
            x, w, b, g, be, None, None, w2, b2, g2, be2, None, None, True, 0.1, 0.1, 1e-5, 1e-5, 1
        ),
        (x, w, b, g, be, w2, b2, g2, be2),
    )


def test_torch_compile_fullgraph_matches_eager():
    x, w, b, g, be = (t.detach() for t in conv_inputs(torch.float32))
    (w2, _, g2, be2), _ = layer(4, 3, torch.float32)

    def fn(x, training):
        y = ops.conv_bn_relu(x, w, b, g, be, torch.zeros(4), torch.ones(4), training, 0.1, 1e-5, 1)
        return ops.double_conv(
            y,
            w2.detach(),
            None,
            g2.detach(),
            be2.detach(),
            None,
            None,
            w.detach()[:, :3].transpose(0, 1).contiguous()[:, :3],
            None,
            None,
            None,
            None,
            None,
            True,
            0.1,
            0.1,
            1e-5,
            1e-5,
            1,
        )

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for training in (True, False):
        assert_close(compiled(x, training), fn(x, training), torch.float32)


def saved_bytes(fn):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_double_conv_saves_x_y1_y2_and_statistics_only():
    n, c, h, w = 2, 16, 32, 32
    x = torch.randn(n, c, h, w, requires_grad=True)
    (w1, _, g1, be1), _ = layer(c, c, torch.float32)
    (w2, _, g2, be2), _ = layer(c, c, torch.float32)
    params_bytes = sum(t.nbytes for t in (w1, g1, be1, w2, g2, be2))
    args = (x, w1, None, g1, be1, None, None, w2, None, g2, be2, None, None, True)
    fused = saved_bytes(lambda: ops.double_conv(*args)) - params_bytes
    ref = saved_bytes(lambda: reference.double_conv(*args, 0.1, 0.1, 1e-5, 1e-5, 1)) - params_bytes
    stats = 2 * 2 * c * 4  # mean and invstd of both layers, float32
    assert fused == 3 * x.nbytes + stats  # x, y1, y2
    assert ref >= 5 * x.nbytes  # x, y1, relu(bn(y1)), y2, relu(bn(y2))
    assert fused / ref <= 0.6 + 1e-3


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda x, w: (x[0], w), ValueError, r"x must be 4-D"),
        (lambda x, w: (x, w[:, :2]), ValueError, "x has 3 channels but weight expects 2"),
        (
            lambda x, w: (x, w.float()),
            TypeError,
            "weight is torch.float32 on cpu but x is torch.float64",
        ),
        (lambda x, w: (x, w.to("meta")), TypeError, "on meta"),
        (lambda x, w: (x.long(), w), TypeError, "x must be float32"),
    ],
)
def test_bad_input_raises_a_clear_error(make, error, message):
    x, w, b, g, be = conv_inputs()
    x, w = make(x.detach(), w.detach())
    with pytest.raises(error, match=message):
        ops.conv_bn_relu(x, w, None, None, None, None, None, True, 0.1, 1e-5, 1)


def test_single_value_per_channel_in_training_is_refused_like_pytorch():
    x, w, *_ = conv_inputs(n=1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ops.conv_bn_relu(x[:, :, :1, :1], w, None, None, None, None, None, True, 0.1, 1e-5, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ops.batch_norm_relu(torch.randn(1, 3, 1, 1), None, None)
    with pytest.raises(ValueError, match="padding must be a non-negative int"):
        ops.conv_bn_relu(x, w, None, None, None, None, None, True, 0.1, 1e-5, -1)


def test_empty_batch_and_nan():
    x, w, b, g, be = (t.detach() for t in conv_inputs(n=0))
    m, v = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    assert ops.conv_bn_relu(x, w, b, g, be, m, v, False, 0.1, 1e-5, 1).shape == (0, 4, 6, 7)
    assert ops.conv_bn_relu(x, w, b, g, be, m, v, True, 0.1, 1e-5, 1).shape == (0, 4, 6, 7)
    assert torch.equal(m, torch.zeros(4, dtype=torch.float64))  # as nn.BatchNorm2d: unchanged
    x, w, b, g, be = (t.detach() for t in conv_inputs())
    x[0, 0, 0, 0] = float("nan")
    for training in (True, False):
        out = ops.conv_bn_relu(x, w, b, g, be, m.clone(), v.clone(), training, 0.1, 1e-5, 1)
        assert out.isnan().any() and not out.isinf().any()


def test_reference_backend_is_used_when_asked():
    x, w, b, g, be = conv_inputs()
    out = ops.conv_bn_relu(x, w, b, g, be, None, None, True, 0.1, 1e-5, 1, backend="reference")
    assert out.grad_fn.name() == "ReluBackward0"
    out = ops.conv_bn_relu(x, w, b, g, be, None, None, True, 0.1, 1e-5, 1)
    assert "conv_bn_relu" in out.grad_fn.name()
    assert unet_fast.backends()["default"]["cpu"]["conv_bn_relu"] == "cpu"


def bn_inputs(shape=(2, 5, 7, 9), x_layout="contiguous"):
    y = layout(torch.randn(shape, device=TRITON_DEVICE) * 3 + 2, x_layout)
    g = torch.rand(shape[1], device=TRITON_DEVICE) + 0.5
    b = torch.randn(shape[1], device=TRITON_DEVICE)
    return y, g, b


@pytest.mark.parametrize("x_layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (3, 16, 1, 1), (1, 3, 33, 17)])
def test_batch_norm_relu_forward_backward_and_running_stats(shape, x_layout):
    y, g, b = bn_inputs(shape, x_layout)
    stats = [
        torch.zeros(shape[1], device=TRITON_DEVICE),
        torch.ones(shape[1], device=TRITON_DEVICE),
    ]
    ref_stats = [s.clone() for s in stats]
    inputs = [y.clone().requires_grad_(), g.clone().requires_grad_(), b.clone().requires_grad_()]
    ref_inputs = [t.clone().detach().requires_grad_() for t in inputs]
    out = ops.batch_norm_relu(*inputs, *stats, 0.3, 1e-5, backend="triton")
    want = F.relu(F.batch_norm(ref_inputs[0], *ref_stats, *ref_inputs[1:], True, 0.3, 1e-5))
    assert "triton" in out.grad_fn.name()
    grad = torch.randn_like(want)
    assert_close(
        [out, *torch.autograd.grad(out, inputs, grad), *stats],
        [want, *torch.autograd.grad(want, ref_inputs, grad), *ref_stats],
        torch.float32,
    )


@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_conv_bn_relu_and_double_conv(training, x_layout):
    x = layout(torch.randn(2, 3, 10, 13, device=TRITON_DEVICE), x_layout).requires_grad_()
    w1 = (torch.randn(4, 3, 3, 3, device=TRITON_DEVICE) * 0.3).requires_grad_()
    w2 = (torch.randn(5, 4, 3, 3, device=TRITON_DEVICE) * 0.3).requires_grad_()
    g, b = (
        (torch.rand(4, device=TRITON_DEVICE) + 0.5).requires_grad_(),
        torch.randn(4, device=TRITON_DEVICE),
    )
    stats = lambda c: [
        torch.zeros(c, device=TRITON_DEVICE),
        torch.ones(c, device=TRITON_DEVICE) * 2,
    ]  # noqa: E731
    results = []
    for backend in ("triton", "reference"):
        s1, s2 = stats(4), stats(5)
        out = ops.double_conv(
            x, w1, None, g, b, *s1, w2, None, None, None, *s2, training, backend=backend
        )
        results.append([out, *torch.autograd.grad(out.square().sum(), (x, w1, g, w2)), *s1, *s2])
    assert_close(results[0], results[1], torch.float32)


def test_bad_input_and_nan():
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        ops.batch_norm_relu(
            torch.randn(2, 3, 4, 4, dtype=torch.float64, device=TRITON_DEVICE),
            None,
            None,
            backend="triton",
        )
    y, g, b = bn_inputs()
    y[0, 1, 2, 3] = float("nan")
    out = ops.batch_norm_relu(y, g, b, backend="triton")
    assert out[:, 1].isnan().all() and not out[:, 0].isnan().any()


@pytest.mark.parametrize("padding", [1, 0])
def test_implicit_gemm_double_conv_writes_only_the_conv_outputs(padding):
    """The Triton double conv: layer 1's BatchNorm + ReLU runs in layer 2's convolution prologue,
    statistics come from the convolutions' epilogues; it keeps x, y1, y2 for backward."""
    x = torch.randn(2, 3, 11, 13, device=TRITON_DEVICE, requires_grad=True)
    w1 = (torch.randn(6, 3, 3, 3, device=TRITON_DEVICE) * 0.3).requires_grad_()
    w2 = (torch.randn(5, 6, 3, 3, device=TRITON_DEVICE) * 0.3).requires_grad_()
    b1 = torch.randn(6, device=TRITON_DEVICE, requires_grad=True)
    g1, g2 = torch.rand(6, device=TRITON_DEVICE) + 0.5, torch.rand(5, device=TRITON_DEVICE) + 0.5
    args = (
        x,
        w1,
        b1,
        g1,
        None,
        None,
        None,
        w2,
        None,
        g2,
        None,
        None,
        None,
        True,
        0.1,
        0.1,
        1e-5,
        1e-5,
        padding,
    )
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
    assert sorted(saved.values()) == sorted(
        [(2, 3, 11, 13), (2, 6, h1, w1_), (2, 5, h1 + 2 * padding - 2, w1_ + 2 * padding - 2)]
    )
    want = reference.double_conv(*args)
    grad = torch.randn_like(want)
    inputs = (x, w1, b1, w2)
    assert_close(
        [out, *torch.autograd.grad(out, inputs, grad)],
        [want, *torch.autograd.grad(want, inputs, grad)],
        torch.float32,
    )


@needs_cuda
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
        out = ops.double_conv(
            x, w1, None, g, b, *s1, w2, None, None, None, *s2, training, backend=backend
        )
        results.append(
            [[out, *torch.autograd.grad(out.square().sum(), (x, w1, g, b, w2)), *s1, *s2]]
        )
    assert_histories_close(results[0], results[1], dtype)


@needs_cuda
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
    want = torch.relu(
        torch.nn.functional.batch_norm(exact, None, None, g.double(), b.double(), True)
    )
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * 4)
    assert (
        out.stride()
        == y.contiguous(memory_format=torch._prims_common.suggest_memory_format(y)).stride()
    )
    grad = torch.randn_like(out)
    grad_y, grad_g, grad_b = torch.ops.unet_fast.batch_norm_relu_backward(
        grad, y, g, b, mean, invstd
    )
    exact.requires_grad_()
    g64, b64 = g.double().requires_grad_(), b.double().requires_grad_()
    ref = torch.relu(torch.nn.functional.batch_norm(exact, None, None, g64, b64, True))
    want_grads = torch.autograd.grad(ref, (exact, g64, b64), grad.double())
    for got, want_grad in zip((grad_y, grad_g, grad_b), want_grads, strict=True):
        scale = want_grad.abs().max().item()
        torch.testing.assert_close(got.double(), want_grad, rtol=tol * 4, atol=tol * 4 * scale)


TRITON_CHECKS = None if torch.cuda.is_available() else ("test_schema", "test_autograd_registration")


def test_opcheck_triton_ops():
    ops.load_triton()
    y, g, b = bn_inputs()
    out, mean, invstd, _ = torch.ops.unet_fast.batch_norm_relu_triton(y, g, b, 1e-5)
    for op, args in (
        (torch.ops.unet_fast.batch_norm_relu_triton.default, (y.requires_grad_(), g, b, 1e-5)),
        (
            torch.ops.unet_fast.batch_norm_relu_backward_triton.default,
            (torch.randn_like(out), y.detach(), g, b, mean, invstd),
        ),
    ):
        torch.library.opcheck(op, args, **({"test_utils": TRITON_CHECKS} if TRITON_CHECKS else {}))


@pytest.mark.parametrize("op", ["conv_bn_relu", "double_conv", "batch_norm_relu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
def test_nan_and_inf_propagate_as_in_the_reference(backend, device, op, training, x_layout):
    """NaN and ±Inf in the input reach the output, the gradients and the running statistics
    exactly where the reference puts them (relu(NaN) = NaN, in training and in folded eval)."""
    if op == "batch_norm_relu" and not training:
        pytest.skip("batch_norm_relu computes batch statistics only")
    c = 4
    x = poison(layout(torch.randn(2, c, 6, 7, device=device), x_layout)).requires_grad_()
    params = [
        torch.randn(c, c, 3, 3, device=device) / 6,
        None,
        torch.rand(c, device=device) + 0.5,
        torch.randn(c, device=device),
    ]
    stats = [torch.randn(c, device=device), torch.rand(c, device=device) + 0.5]
    layers = 2 if op == "double_conv" else 1
    ours, theirs = [
        [[t.clone() if t is not None else None for t in params + stats] for _ in range(layers)]
        for _ in range(2)
    ]
    for group in ours + theirs:
        for t in group[:4]:
            if t is not None:
                t.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    if op == "batch_norm_relu":
        got = ops.batch_norm_relu(x, *ours[0][2:], 0.1, 1e-5, backend=backend)
        want = torch.relu(
            torch.nn.functional.batch_norm(
                x_ref, theirs[0][4], theirs[0][5], theirs[0][2], theirs[0][3], True, 0.1, 1e-5
            )
        )
    elif op == "conv_bn_relu":
        got = ops.conv_bn_relu(x, *ours[0], training, backend=backend)
        want = reference.conv_bn_relu(x_ref, *theirs[0], training, 0.1, 1e-5, 1)
    else:
        got = ops.double_conv(x, *ours[0], *ours[1], training, backend=backend)
        want = reference.double_conv(
            x_ref, *theirs[0], *theirs[1], training, 0.1, 0.1, 1e-5, 1e-5, 1
        )
    assert want.isnan().any() and got.isnan().any()
    leaves = lambda inputs, groups: (
        [inputs]
        + [
            t
            for g in groups
            for t in g[:4]
            if t is not None  # noqa: E731
            and (op != "batch_norm_relu" or t.dim() == 1)
        ]
    )
    grad = torch.randn_like(want)
    got_all = [got, *torch.autograd.grad(got, leaves(x, ours), grad)]
    want_all = [want, *torch.autograd.grad(want, leaves(x_ref, theirs), grad)]
    buffers = [[t for g in groups for t in g[4:]] for groups in (ours, theirs)]
    for g, w in zip(got_all + buffers[0], want_all + buffers[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, equal_nan=True)


@needs_cuda
def test_opcheck_on_cuda():
    x = torch.randn(2, 3, 8, 9, device="cuda", dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device="cuda", dtype=torch.float64, requires_grad=True)
    g = torch.rand(4, device="cuda", dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.unet_fast.conv_bn_relu.default, (x, w, None, g, None, 1e-5, 1))


def pool_backward_composite(grad_pooled, grad_x, y, weight, bias, mean, invstd):
    """What batch_norm_relu_max_pool_backward fuses: rebuild x, ATen's max pooling backward,
    autograd's sum with x's other gradient."""
    x = torch.ops.unet_fast.batch_norm_relu_apply(y, weight, bias, mean, invstd)
    _, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    grad = torch.ops.aten.max_pool2d_with_indices_backward(
        grad_pooled, x, [2, 2], [2, 2], [0, 0], [1, 1], False, indices
    )
    return grad if grad_x is None else grad_x + grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (2, 16, 8, 8), (1, 19, 3, 6)])
@pytest.mark.parametrize("y_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("grad_x_layout", [None, "channel slice", "contiguous"])
def test_max_pool_backward_from_a_recipe_is_bit_exact(dtype, shape, y_layout, grad_x_layout):
    """One pass (rebuild x = relu(bn(y)), find each window's maximum, add x's other gradient)
    gives bit for bit what the three steps give: ties (ReLU's zeros, repeated values) go to the
    first maximum, NaN wins, odd last rows and columns get the other gradient alone."""
    torch.manual_seed(0)
    n, c, h, w = shape
    y = torch.randn(shape, dtype=torch.float64).to(dtype)
    y.view(-1)[::7] = 0.5  # repeated values: ties after the ReLU too
    y.view(-1)[::11] = float("nan")
    y = layout(y, y_layout)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    weight, bias = torch.rand(c, dtype=stats) + 0.5, torch.randn(c, dtype=stats)
    mean, invstd = torch.randn(c, dtype=stats) * 0.1, torch.rand(c, dtype=stats) + 0.5
    grad_pooled = layout(torch.randn(n, c, h // 2, w // 2, dtype=dtype), y_layout)
    grad_x = None
    if grad_x_layout == "channel slice":  # the decoder join's gradient, as the UNet passes it
        wide = torch.randn(n, 2 * c, h, w, dtype=dtype).contiguous(
            memory_format=torch.channels_last
        )
        grad_x = wide[:, c:]
    elif grad_x_layout == "contiguous":
        grad_x = torch.randn(shape, dtype=dtype)
    args = (grad_pooled, grad_x, y, weight, bias, mean, invstd)
    got = torch.ops.unet_fast.batch_norm_relu_max_pool_backward(*args)
    want = pool_backward_composite(*args)
    assert got.isnan().any() == want.isnan().any()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert got.is_contiguous(memory_format=torch._prims_common.suggest_memory_format(y))


def test_max_pool_backward_from_a_recipe_refuses_mismatched_shapes():
    y = torch.randn(2, 3, 8, 8)
    stats = (None, None, torch.zeros(3), torch.ones(3))
    with pytest.raises(RuntimeError, match="grad_pooled must have shape"):
        torch.ops.unet_fast.batch_norm_relu_max_pool_backward(
            torch.randn(2, 3, 3, 4), None, y, *stats
        )
    with pytest.raises(RuntimeError, match="grad_x does not match y"):
        torch.ops.unet_fast.batch_norm_relu_max_pool_backward(
            torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 7), y, *stats
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels", [(3, 5), (17, 16), (64, 64)])
@pytest.mark.parametrize("y_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("up_layout", ["contiguous", "channels_last", "strided"])
def test_join_rebuilt_from_a_recipe_is_bit_exact(dtype, channels, y_layout, up_layout):
    """[relu(bn(y)), up] written in one pass is bit for bit the rebuilt skip concatenated with up
    (NaN and Inf included), in y's layout, whatever up's."""
    torch.manual_seed(0)
    (c, c_up), (n, h, w) = channels, (2, 5, 7)
    y = torch.randn(n, c, h, w, dtype=torch.float64).to(dtype)
    y[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    y = layout(y, y_layout)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    weight, bias = torch.rand(c, dtype=stats) + 0.5, torch.randn(c, dtype=stats)
    mean, invstd = torch.randn(c, dtype=stats) * 0.1, torch.rand(c, dtype=stats) + 0.5
    up = layout(torch.randn(n, c_up, h, w, dtype=dtype), up_layout)
    got = torch.ops.unet_fast.batch_norm_relu_concat(y, weight, bias, mean, invstd, up)
    skip = torch.ops.unet_fast.batch_norm_relu_apply(y, weight, bias, mean, invstd)
    torch.testing.assert_close(got, torch.cat([skip, up], 1), rtol=0, atol=0, equal_nan=True)
    assert got.isnan().any()
    assert got.is_contiguous(memory_format=torch._prims_common.suggest_memory_format(y))


def test_join_rebuilt_from_a_recipe_refuses_mismatched_inputs():
    y, stats = torch.randn(2, 3, 8, 8), (None, None, torch.zeros(3), torch.ones(3))
    with pytest.raises(RuntimeError, match="must match y"):
        torch.ops.unet_fast.batch_norm_relu_concat(y, *stats, torch.randn(2, 4, 8, 7))
    with pytest.raises(RuntimeError, match="up is Double but y is Float"):
        torch.ops.unet_fast.batch_norm_relu_concat(y, *stats, torch.randn(2, 4, 8, 8).double())
