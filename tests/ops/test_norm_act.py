"""norm_act (BatchNorm / InstanceNorm / GroupNorm x ReLU / LeakyReLU / PReLU / identity, 2-D
and 3-D) against the reference: outputs, every gradient (PReLU's weight's too), running
statistics, NaN and Inf, layouts."""

import copy

import pytest
import torch

import unet_fast
from tests.helpers import assert_bf16_within_rule, assert_close
from unet_fast import _backend, ops, reference

pytestmark = pytest.mark.skipif(
    _backend.EXTENSION_ERROR is not None, reason="unet_fast._C is not built"
)

NORMS = [("batch", None), ("instance", None), ("group", 2), ("none", None)]
# PReLU's "slope" here says how many weights it has: one per channel or one for all
ACTS = [
    ("relu", 0.0),
    ("leaky_relu", 0.2),
    ("identity", 0.0),
    ("prelu", "per channel"),
    ("prelu", "shared"),
]


needs_triton = pytest.mark.skipif(
    not _backend.triton_runs_on(torch.device("cpu")) and not torch.cuda.is_available(),
    reason="triton: not installed, or no GPU and TRITON_INTERPRET unset",
)
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="cuda: this machine has no CUDA GPU"
)
# The device kernels checked against the reference (which runs on the CPU)
KERNELS = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def on_cpu(tensors):
    return [t.cpu() for t in tensors]


def channels_last(x):
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.contiguous(memory_format=fmt)


def in_layout(x, name):
    if name == "channels_last":
        return channels_last(x)
    if name == "strided":  # every other column of a wider tensor
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.contiguous()


def run(backend, y, norm, groups, act, slope, affine=True, track=True, training=True, seed=0):
    """(output, grad_y, grad_weight, grad_bias, [grad of PReLU's weight,] running_mean,
    running_var) for one call."""
    g = torch.Generator().manual_seed(seed)
    to = {"dtype": y.dtype, "device": y.device}
    c = y.shape[1]
    affine = affine and norm != "none"
    # drawn in float64 whatever y's dtype, so runs in different dtypes share the values
    weight = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(**to) if affine else None
    bias = torch.randn(c, generator=g, dtype=torch.float64).to(**to) if affine else None
    stats = track and norm in ("batch", "instance")
    running_mean = torch.randn(c, generator=g, dtype=torch.float64).to(**to) if stats else None
    running_var = (
        (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(**to) if stats else None
    )
    act_weight = None
    if act == "prelu":  # slopes of both signs
        count = c if slope == "per channel" else 1
        act_weight = (torch.rand(count, generator=g, dtype=torch.float64) - 0.5).to(**to)
        slope = 0.0
    y = y.detach().requires_grad_()
    for t in (weight, bias, act_weight):
        if t is not None:
            t.requires_grad_()
    out = ops.norm_act(
        y,
        norm,
        weight,
        bias,
        running_mean,
        running_var,
        training,
        0.1,
        1e-5,
        act,
        slope,
        groups=groups,
        act_weight=act_weight,
        backend=backend,
    )
    probe = torch.randn(out.shape, generator=g, dtype=torch.float64).to(**to)
    (out * probe).sum().backward()
    grads = [y.grad] + [t.grad for t in (weight, bias, act_weight) if t is not None]
    return [out, *grads, *[t for t in (running_mean, running_var) if t is not None]]


@pytest.mark.parametrize("norm,groups", NORMS)
@pytest.mark.parametrize("act,slope", ACTS)
@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (2, 4, 3, 4, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("y_layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_training_matches_reference_float64(
    kernel, norm, groups, act, slope, shape, y_layout, affine
):
    y = in_layout(torch.randn(shape, dtype=torch.float64) * 3 + 1, y_layout)
    got = on_cpu(run(kernel, y.to(kernel), norm, groups, act, slope, affine))
    want = run("reference", y, norm, groups, act, slope, affine)
    assert_close(got, want, torch.float64)
    if y_layout == "channels_last":  # the output keeps the input's layout
        assert got[0].stride() == channels_last(got[0]).stride()


@pytest.mark.parametrize("norm,groups", [("instance", None), ("group", 2)])
@pytest.mark.parametrize("act,slope", ACTS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_large_channels_first_units_match(kernel, norm, groups, act, slope):
    """Units of at least 16384 values (a 32^3 plane), channels-first: the CPU kernel normalises
    them unit by unit, each while it is in cache."""
    y = torch.randn(2, 4, 16, 32, 33, dtype=torch.float64) * 2 + 1
    got = on_cpu(run(kernel, y.to(kernel), norm, groups, act, slope))
    assert_close(got, run("reference", y, norm, groups, act, slope), torch.float64)
    y[0, 1, 0, 0, 0], y[1, 2, 3, 4, 5], y[1, 3, 6, 7, 8] = float("nan"), float("inf"), -float("inf")
    got = on_cpu(run(kernel, y.to(kernel), norm, groups, act, slope))
    for g, w in zip(got, run("reference", y, norm, groups, act, slope), strict=True):
        assert torch.equal(g.isnan(), w.isnan())  # NaN and Inf as the reference's, unit by unit
        assert_close(g.nan_to_num(0, 0, 0), w.nan_to_num(0, 0, 0), torch.float64)


@pytest.mark.parametrize("norm,groups", NORMS[:3])
@pytest.mark.parametrize("act,slope", ACTS[:2])
@pytest.mark.parametrize("channels", [16, 20, 32])  # vector blocks, a tail, two blocks
@pytest.mark.parametrize("y_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_float32_vector_paths_match(kernel, norm, groups, act, slope, channels, y_layout):
    shape = (2, channels, 6, 7, 9)
    y = in_layout(torch.randn(shape) * 2 - 1, y_layout)
    got = on_cpu(run(kernel, y.to(kernel), norm, groups, act, slope))
    want = run("reference", y.double(), norm, groups, act, slope)
    assert_close(got, [w.float() for w in want], torch.float32)


@pytest.mark.parametrize("norm,groups", NORMS[:3])
@pytest.mark.parametrize("kernel", KERNELS)
def test_bfloat16_within_twice_the_references_error(kernel, norm, groups):
    y = channels_last(torch.randn(2, 16, 8, 8, 8).to(torch.bfloat16))
    got = on_cpu(run(kernel, y.to(kernel), norm, groups, "leaky_relu", 0.01))
    theirs = run("reference", y, norm, groups, "leaky_relu", 0.01)
    exact = run("reference", y.double(), norm, groups, "leaky_relu", 0.01)
    assert_bf16_within_rule(got, theirs, exact)


@pytest.mark.parametrize("kernel", KERNELS)
def test_eval_uses_running_statistics_and_instance_norm_tracks_them(kernel):
    y = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    for norm in ("batch", "instance"):
        assert_close(
            on_cpu(run(kernel, y.to(kernel), norm, None, "relu", 0.0, training=False)),
            run("reference", y, norm, None, "relu", 0.0, training=False),
            torch.float64,
        )
    # a tracking InstanceNorm in training updates its running statistics from the batch average
    got = on_cpu(run(kernel, y.to(kernel), "instance", None, "relu", 0.0))
    want = run("reference", y, "instance", None, "relu", 0.0)
    assert_close(got[-2:], want[-2:], torch.float64)


@pytest.mark.parametrize("norm,groups", NORMS[:3])
@pytest.mark.parametrize("act,slope", ACTS)
@pytest.mark.parametrize("y_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_nan_and_inf_propagate_as_in_the_reference(kernel, norm, groups, act, slope, y_layout):
    y = torch.randn(2, 4, 3, 4, 5, dtype=torch.float64)
    y[0, 1, 0, 0, 0] = float("nan")
    y[1, 2, 1, 1, 1] = float("inf")
    y[1, 3, 2, 0, 1] = -float("inf")
    y = in_layout(y, y_layout)
    got = on_cpu(run(kernel, y.to(kernel), norm, groups, act, slope))
    want = run("reference", y, norm, groups, act, slope)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.isnan(), w.isnan())
        assert_close(g.nan_to_num(0, 0, 0), w.nan_to_num(0, 0, 0), torch.float64)


def test_saves_y_and_statistics_only():
    y = torch.randn(2, 8, 4, 4, 4, requires_grad=True)
    weight, bias = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.norm_act(y, "instance", weight, bias, act="leaky_relu")
    activations = [t for t in saved if t.numel() == y.numel()]
    assert len(activations) == 1 and activations[0].data_ptr() == y.data_ptr()
    assert sum(t.numel() for t in saved if t.numel() != y.numel()) <= 2 * 8 + 2 * 16


@pytest.mark.parametrize("kernel", KERNELS)
def test_opcheck(kernel):
    y = torch.randn(2, 4, 3, 4, 5, device=kernel, requires_grad=True)
    weight = torch.rand(4, device=kernel, requires_grad=True)
    bias = torch.randn(4, device=kernel, requires_grad=True)
    prelu = torch.rand(4, device=kernel, requires_grad=True)
    cases = ((0, "relu", None), (4, "leaky_relu", None), (2, "identity", None), (0, "prelu", prelu))
    for groups, act, act_weight in cases:
        for t in (y, channels_last(y.detach()).requires_grad_()):
            args = (groups, weight, bias, 1e-5, act, 0.01, act_weight)
            torch.library.opcheck(torch.ops.unet_fast.norm_act.default, (t, *args))
            with torch.no_grad():
                torch.library.opcheck(torch.ops.unet_fast.norm_act_.default, (t.clone(), *args))


@pytest.mark.parametrize(
    "backend", [*KERNELS, "reference", pytest.param("triton", marks=needs_triton)]
)
@pytest.mark.parametrize("y_layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("norm,groups", [("instance", None), ("batch", None), ("group", 2)])
def test_inplace_writes_the_same_result_over_y(backend, y_layout, norm, groups):
    device = "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
    y = in_layout(torch.randn(2, 4, 3, 4, 5), y_layout).to(device)
    y[0, 1, 0, 0, 0] = float("nan")
    weight, bias = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)

    def running():  # GroupNorm has none
        return (
            [torch.zeros(4, device=device), torch.ones(4, device=device)] if groups is None else []
        )

    stats = running()
    kwargs = {"act": "leaky_relu", "groups": groups, "backend": backend}
    want = ops.norm_act(y, norm, weight, bias, *stats, **kwargs)
    want_stats = [t.clone() for t in stats]
    stats = running()
    with torch.no_grad():
        got = ops.norm_act(y, norm, weight, bias, *stats, inplace=True, **kwargs)
    assert got is y
    for g, w in zip([got, *stats], [want, *want_stats], strict=True):  # the same arithmetic
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="inplace=True overwrites y, which requires grad"):
        ops.norm_act(y.requires_grad_(), norm, inplace=True, groups=groups, backend=backend)


def test_inference_overwrites_only_conv_outputs_nobody_else_sees():
    """In eval without autograd a fused layer writes its norm+act over its conv output, unless
    a forward hook may have kept that output."""
    torch.manual_seed(0)
    seq = torch.nn.Sequential(
        torch.nn.Conv3d(2, 4, 3), torch.nn.InstanceNorm3d(4, affine=True), torch.nn.LeakyReLU()
    )
    fused = unet_fast.fuse(torch.nn.Sequential(copy.deepcopy(seq))).eval()
    x = torch.randn(2, 2, 6, 6, 6)
    kept = []
    fused[0][0].register_forward_hook(lambda module, args, out: kept.append(out))
    with torch.no_grad():
        out = fused(x)
        assert_close(out, seq(x), torch.float32)
        assert_close(kept[0], seq[0](x), torch.float32)  # the hook's tensor is the conv's output


def test_torch_compile_fullgraph_matches_eager():
    y = channels_last(torch.randn(2, 4, 3, 4, 5))
    weight, bias = torch.rand(4), torch.randn(4)

    def fn(y):
        return ops.norm_act(y, "instance", weight, bias, act="leaky_relu", negative_slope=0.01)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_close(
        compiled(y),
        reference.norm_act(
            y, "instance", None, weight, bias, None, None, True, 0.1, 1e-5, "leaky_relu", 0.01
        ),
        torch.float32,
    )


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"norm": "layer"}, ValueError, "norm must be one of"),
        ({"act": "gelu"}, ValueError, "act must be one of"),
        ({"norm": "group", "groups": 3}, ValueError, "4 channels cannot be split into groups=3"),
        ({"norm": "group"}, ValueError, "groups=None"),
        ({"weight": torch.ones(3)}, ValueError, "weight must have shape (4,)"),
        ({"act": "prelu"}, ValueError, "give it with act='prelu' only"),
        ({"act_weight": torch.ones(4)}, ValueError, "give it with act='prelu' only"),
        ({"act": "prelu", "act_weight": torch.ones(3)}, ValueError, "1 or 4 values on cpu"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.norm_act(torch.randn(2, 4, 5, 5), **kwargs)


def test_sizes_without_statistics_are_refused_like_pytorch():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.norm_act(torch.randn(1, 4, 1, 1, 1), "batch")
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        ops.norm_act(torch.randn(2, 4, 1, 1), "instance")
    with pytest.raises(ValueError, match="4-D or 5-D"):
        ops.norm_act(torch.randn(2, 4, 5), "instance")


@needs_triton
@pytest.mark.parametrize("norm,groups", NORMS[:3])
@pytest.mark.parametrize("act,slope", ACTS)
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (2, 4, 3, 4, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("y_layout", ["contiguous", "channels_last"])
def test_triton_matches_reference(norm, groups, act, slope, shape, y_layout):
    """The Triton kernels (through the interpreter without a GPU) in float32 against the
    reference in float64: output, every gradient, running statistics, NaN propagation."""
    y = torch.randn(shape, dtype=torch.float64) * 2 + 3
    y[1, 1, 0, 0] = float("nan")  # one plane of NaN: it must stay NaN where the reference's is
    y = in_layout(y, y_layout)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    got = run("triton", y.float().to(device), norm, groups, act, slope)
    want = run("reference", y, norm, groups, act, slope)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.isnan().cpu(), w.isnan())
        assert_close(g.cpu().nan_to_num(0, 0, 0), w.float().nan_to_num(0, 0, 0), torch.float32)
    if y_layout == "channels_last":
        assert got[0].stride() == channels_last(got[0]).stride()


@needs_triton
def test_triton_refuses_float64():
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        ops.norm_act(torch.randn(2, 4, 5, 5, dtype=torch.float64), "instance", backend="triton")


@pytest.mark.parametrize("backend", [*KERNELS, pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("y_layout", ["contiguous", "channels_last"])
def test_float32_keeps_precision_where_the_variance_is_tiny(backend, y_layout):
    """InstanceNorm over 2x2 planes of values 1 + 1e-3 noise (a deep level of a 2-D nnU-Net):
    float32 outputs and gradients within twice the reference's float32 error of the float64
    truth (statistics summed around a shift, not as E[y^2] - E[y]^2)."""
    y = in_layout(1 + 1e-3 * torch.randn(2, 16, 2, 2, dtype=torch.float64), y_layout)
    device = "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
    got = on_cpu(run(backend, y.float().to(device), "instance", None, "leaky_relu", 0.01))
    theirs = run("reference", y.float(), "instance", None, "leaky_relu", 0.01)
    exact = run("reference", y, "instance", None, "leaky_relu", 0.01)
    assert_bf16_within_rule(got, theirs, exact)
