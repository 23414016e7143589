"""up_conv (a transposed convolution whose stride is its kernel) against the reference: outputs
and every gradient, 2-D and 3-D, layouts, strided output gradients, NaN and Inf, opcheck,
compile, errors; and fuse()'s swap of such nn.ConvTranspose modules."""

import copy
import pickle

import pytest
import torch
from torch import nn

import unet_fast
from tests.helpers import DispatchedOps, assert_bf16_within_rule, assert_close, layout
from unet_fast import _backend, ops, reference
from unet_fast.bench import saved_bytes
from unet_fast.nn.up_conv import UpConvTranspose2d, UpConvTranspose3d

pytestmark = pytest.mark.skipif(
    _backend.EXTENSION_ERROR is not None, reason="unet_fast._C is not built"
)
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="cuda: this machine has no CUDA GPU"
)
KERNELS = ["cpu", pytest.param("cuda", marks=needs_cuda)]
# (x shape, C_out, kernel): the U-Net's 2x2, anisotropic, one-tap, 3x3 blocks, volumes
CASES = [
    ((2, 6, 5, 7), 4, (2, 2)),
    ((1, 3, 4, 3), 5, (1, 2)),
    ((2, 4, 3, 3), 3, (1, 1)),
    ((2, 2, 3, 2), 3, (3, 3)),
    ((2, 4, 3, 4, 2), 3, (2, 2, 2)),
    ((1, 3, 2, 3, 3), 2, (1, 2, 2)),
]
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def inputs(case, dtype=torch.float64, device="cpu", x_layout="channels_last", bias=True):
    shape, c_out, kernel = case
    fmt = CHANNELS_LAST[len(shape)] if x_layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
    weight = torch.randn(shape[1], c_out, *kernel, dtype=dtype, device=device)
    weight = weight.contiguous(memory_format=fmt)
    b = torch.randn(c_out, dtype=dtype, device=device) if bias else None
    return x, weight, b


def grads(fn, x, weight, bias, grad, wrt=(True, True, True)):
    """fn's output and the gradients of the inputs flagged in `wrt` (bias may be None)."""
    x, weight, bias = (
        None if t is None else t.detach().requires_grad_(w)
        for t, w in zip((x, weight, bias), wrt, strict=True)
    )
    out = fn(x, weight, bias)
    wanted = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    return out, torch.autograd.grad(out, wanted, grad)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("x_layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_float64(kernel, case, x_layout, bias):
    x, weight, b = inputs(case, device=kernel, x_layout=x_layout, bias=bias)
    grad = torch.randn_like(reference.up_conv(x, weight, b))
    out, got = grads(lambda *a: ops.up_conv(*a, backend=kernel), x, weight, b, grad)
    want_out, want = grads(reference.up_conv, x, weight, b, grad)
    assert out.grad_fn.name() == "_UpConvBackward"  # the kernel ran, not the reference
    assert_close(out, want_out, torch.float64)
    assert_close(got, want, torch.float64)
    for g, t in zip(got, (x, weight), strict=False):  # gradients in their input's layout
        assert g.is_contiguous(memory_format=torch._prims_common.suggest_memory_format(t))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", [CASES[0], CASES[4]])
def test_float32_and_strided_output_gradients(kernel, case):
    """The gradient arriving from a concatenation's backward is a channel slice of a wider
    tensor: regrouping reads it as it is."""
    x, weight, b = inputs(case, torch.float32, kernel)
    out_shape = reference.up_conv(x, weight, b).shape
    wide = torch.randn(out_shape[0], 2 * out_shape[1], *out_shape[2:], device=kernel)
    grad = wide.contiguous(memory_format=CHANNELS_LAST[x.dim()])[:, out_shape[1] :]
    assert not grad.is_contiguous(memory_format=CHANNELS_LAST[x.dim()])
    got = grads(lambda *a: ops.up_conv(*a, backend=kernel), x, weight, b, grad)[1]
    want = grads(reference.up_conv, x, weight, b, grad.contiguous())[1]
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("wrt", [(True, False, False), (False, True, True), (False, False, True)])
def test_only_the_gradients_asked_for(wrt):
    x, weight, b = inputs(CASES[0])
    grad = torch.randn_like(reference.up_conv(x, weight, b))
    got = grads(ops.up_conv, x, weight, b, grad, wrt)[1]
    want = grads(reference.up_conv, x, weight, b, grad, wrt)[1]
    assert len(got) == sum(wrt)
    assert_close(got, want, torch.float64)


def test_bfloat16_within_twice_the_references_error():
    x, weight, b = inputs(CASES[0], torch.bfloat16)
    grad = torch.randn_like(reference.up_conv(x, weight, b))
    ours = grads(ops.up_conv, x, weight, b, grad)
    ref = grads(reference.up_conv, x, weight, b, grad)
    exact = grads(reference.up_conv, x.double(), weight.double(), b.double(), grad.double())
    assert_bf16_within_rule([ours[0], *ours[1]], [ref[0], *ref[1]], [exact[0], *exact[1]])


@pytest.mark.parametrize("kernel", KERNELS)
def test_nan_and_inf_propagate_as_in_the_reference(kernel):
    x, weight, b = inputs(CASES[0], device=kernel)
    x[0, 1, 2, 3], x[1, 0, 0, 0], weight[2, 1, 0, 1] = float("nan"), float("inf"), float("-inf")
    grad = torch.randn_like(reference.up_conv(x, weight, b))
    grad[0, 2, 1, 1] = float("nan")
    out, got = grads(lambda *a: ops.up_conv(*a, backend=kernel), x, weight, b, grad)
    want_out, want = grads(reference.up_conv, x, weight, b, grad)
    assert out.isnan().any() and all(g.isnan().any() for g in got)
    for g, w in zip([out, *got], [want_out, *want], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-9, equal_nan=True)


def test_empty_batch():
    x, weight, b = inputs(((0, 3, 4, 4), 2, (2, 2)))
    grad = torch.randn(0, 2, 8, 8, dtype=torch.float64)
    got = grads(ops.up_conv, x, weight, b, grad)[1]
    assert [tuple(g.shape) for g in got] == [(0, 3, 4, 4), (3, 2, 2, 2), (2,)]
    assert not got[1].any() and not got[2].any()


def test_gradcheck():
    x, weight, b = inputs(((1, 2, 2, 3), 2, (2, 2)))
    leaves = [t.requires_grad_() for t in (x, weight, b)]
    assert torch.autograd.gradcheck(ops.up_conv, leaves)


@pytest.mark.parametrize("case", [CASES[0], CASES[4]])
@pytest.mark.parametrize("x_layout", ["channels_last", "contiguous"])
def test_opcheck(case, x_layout):
    x, weight, b = inputs(case, x_layout=x_layout)
    grad = layout(torch.randn_like(reference.up_conv(x, weight, b)), "contiguous")
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(torch.ops.unet_fast.up_conv_backward.default, (grad, x, weight, mask))


def test_saves_only_the_input_as_atens_transposed_convolution_does():
    x = inputs(CASES[0], torch.float32)[0]
    swapped = unet_fast.fuse(nn.Sequential(nn.ConvTranspose2d(6, 4, 2, stride=2)))
    assert type(swapped[0]) is UpConvTranspose2d
    assert saved_bytes(swapped, x.requires_grad_()) == x.nbytes
    assert saved_bytes(nn.ConvTranspose2d(6, 4, 2, stride=2), x) == x.nbytes


def test_torch_compile_fullgraph_matches_eager():
    x, weight, b = inputs(CASES[0], torch.float32)
    grad = torch.randn_like(reference.up_conv(x, weight, b))
    compiled = torch.compile(ops.up_conv, fullgraph=True, backend="aot_eager")
    got = grads(compiled, x, weight, b, grad)
    want = grads(reference.up_conv, x, weight, b, grad)
    assert_close([got[0], *got[1]], [want[0], *want[1]], torch.float32)


@pytest.mark.parametrize(
    "args, error, message",
    [
        (((2, 3, 4), (3, 2, 2)), ValueError, "4-D or 5-D"),
        (((2, 3, 4, 4), (4, 2, 2, 2)), ValueError, "x has 3 channels but weight expects 4"),
        (((2, 3, 4, 4), (3, 2, 2, 2), (5,)), ValueError, r"bias must have shape \(2,\)"),
    ],
)
def test_bad_input_raises_a_clear_error(args, error, message):
    tensors = [torch.randn(shape) for shape in args]
    with pytest.raises(error, match=message):
        ops.up_conv(*tensors)


def test_mixed_dtypes_and_integer_input_are_refused():
    with pytest.raises(TypeError, match="weight is torch.float64"):
        ops.up_conv(torch.randn(1, 2, 3, 3), torch.randn(2, 2, 2, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="must be float32"):
        ops.up_conv(torch.ones(1, 2, 3, 3, dtype=torch.int64), torch.ones(2, 2, 2, 2))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        ops.up_conv([[1.0]], torch.ones(2, 2, 2, 2))


def test_every_backend_runs_it_triton_and_reference_through_aten(backend, device):
    x, weight, b = inputs(CASES[0], device=device)
    x.requires_grad_()
    out = ops.up_conv(x, weight, b, backend=backend)
    kernel = backend in ("cpu", "cuda")
    assert (out.grad_fn.name() == "_UpConvBackward") == kernel
    assert_close(out, reference.up_conv(x, weight, b), torch.float64)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, x, grad)
    assert_close(got, torch.autograd.grad(reference.up_conv(x, weight, b), x, grad), torch.float64)


class Ups(nn.Module):
    def __init__(self):
        super().__init__()
        self.up2 = nn.ConvTranspose2d(4, 3, 2, stride=2)
        self.overlapping = nn.ConvTranspose2d(3, 3, 3, stride=2)
        self.up3 = nn.ConvTranspose3d(3, 2, (1, 2, 2), stride=(1, 2, 2), bias=False)

    def forward(self, x):
        x = self.overlapping(self.up2(x))
        return self.up3(x.unsqueeze(2).expand(-1, -1, 2, -1, -1))


def test_fuse_swaps_only_non_overlapping_transposed_convolutions(tmp_path):
    torch.manual_seed(0)
    original = Ups().double()
    fused, report = unet_fast.fuse(copy.deepcopy(original), report=True)
    assert sorted(report.leaner) == ["up2", "up3"]
    assert type(fused.up2) is UpConvTranspose2d and type(fused.up3) is UpConvTranspose3d
    assert type(fused.overlapping) is nn.ConvTranspose2d
    assert fused.state_dict().keys() == original.state_dict().keys()
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    outs = [m(x) for m in (fused, original)]
    assert outs[0].grad_fn.name() == "_UpConvBackward"
    assert_close(outs[0], outs[1], torch.float64)
    for out in outs:
        out.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), original.parameters(), strict=True):
        assert_close(p.grad, q.grad, torch.float64), name
    restored = pickle.loads(pickle.dumps(fused))
    assert type(restored.up2) is UpConvTranspose2d
    assert_close(restored(x), outs[1], torch.float64)


@pytest.mark.parametrize("dims", [2, 3])
def test_transposed_convolution_reading_a_chains_recipe_takes_the_kernel(dims):
    """nnU-Net's decoder upsamples a Conv -> Norm -> Act chain's output: its transposed
    convolution keeps the chain's recipe instead of its input (nn.recipe), and its backward is
    up_conv's."""
    torch.manual_seed(0)
    conv, norm, up = (
        (nn.Conv2d, nn.InstanceNorm2d, nn.ConvTranspose2d)
        if dims == 2
        else (nn.Conv3d, nn.InstanceNorm3d, nn.ConvTranspose3d)
    )
    original = nn.Sequential(
        nn.Sequential(conv(2, 4, 3, padding=1), norm(4, affine=True), nn.LeakyReLU(0.01)),
        up(4, 3, 2, stride=2),
    ).double()
    fused, report = unet_fast.fuse(copy.deepcopy(original), report=True)
    assert list(report.fused) == ["0"] and list(report.leaner) == ["1"]
    assert type(fused[1]).__name__ == f"RecipeConvTranspose{dims}d"
    x = torch.randn(2, 2, *[4] * dims, dtype=torch.float64)
    grads, backward_ops = [], []
    for model in (fused, original):
        out = model(x)
        with DispatchedOps() as dispatched:
            out.square().sum().backward()
        grads.append([out, *[p.grad for p in model.parameters()]])
        backward_ops.append(dispatched.names)
    assert "unet_fast.up_conv_backward" in backward_ops[0]
    assert "unet_fast.up_conv_backward" not in backward_ops[1]
    assert_close(grads[0], grads[1], torch.float64)
