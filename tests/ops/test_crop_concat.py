"""crop_concat kernels against the reference: values, gradients, layouts, opcheck, compile, errors."""

import pytest
import torch

import unet_fast
from tests.helpers import DEVICES, TRITON_DEVICE, layout, needs_cuda
from unet_fast import ops, reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (skip H, W), (up H, W), target size: pad even/odd, crop even/odd, mixed, 1x1, degenerate
GEOMETRIES = [
    ((8, 8), (8, 8), (8, 8)),
    ((97, 131), (96, 130), (97, 131)),  # the tutorial's same-padding case: up padded by one
    ((64, 64), (56, 56), (56, 56)),  # the paper's valid case: skip cropped by an even amount
    ((17, 20), (9, 13), (12, 15)),  # skip cropped, up padded, odd differences
    ((5, 3), (2, 7), (4, 5)),  # crop one axis, pad the other
    ((1, 1), (1, 1), (1, 1)),
    ((3, 3), (1, 1), (1, 1)),
]


def inputs(geometry, dtype=torch.float32, device="cpu", n=2, channels=(3, 5)):
    (hs, ws), (hu, wu), size = geometry
    skip = torch.randn(n, channels[0], hs, ws, dtype=torch.float64).to(dtype).to(device)
    up = torch.randn(n, channels[1], hu, wu, dtype=torch.float64).to(dtype).to(device)
    return skip, up, size


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize(
    "skip_layout, up_layout",
    [
        ("contiguous", "contiguous"),
        ("channels_last", "channels_last"),
        ("channels_last", "strided"),
        ("strided", "channels_last"),
    ],
)
def test_matches_reference_exactly(device, dtype, geometry, skip_layout, up_layout):
    skip, up, size = inputs(geometry, dtype, device)
    skip, up = layout(skip, skip_layout), layout(up, up_layout)
    skip.requires_grad_(), up.requires_grad_()
    out = unet_fast.crop_concat(skip, up, size)
    expected = reference.crop_concat(skip, up, size)
    assert out.grad_fn.name() != expected.grad_fn.name()  # the kernel ran, not the reference
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # a copy: bit-exact
    channels_last = torch._prims_common.suggest_memory_format(skip) == torch.channels_last
    assert out.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    grad = layout(torch.randn_like(expected), up_layout)
    got = torch.autograd.grad(out, (skip, up), grad)
    want = torch.autograd.grad(expected, (skip, up), grad)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_default_size_is_the_skips_and_batch_one_works():
    skip, up, _ = inputs(GEOMETRIES[1], n=1)
    torch.testing.assert_close(
        unet_fast.crop_concat(skip, up), reference.crop_concat(skip, up, (97, 131)), rtol=0, atol=0
    )


@pytest.mark.parametrize("geometry", [GEOMETRIES[3], GEOMETRIES[4]])
def test_opcheck(geometry):
    skip, up, size = inputs(geometry, torch.float64)
    skip.requires_grad_(), up.requires_grad_()
    torch.library.opcheck(torch.ops.unet_fast.crop_concat.default, (skip, up, size))
    grad = torch.randn(2, 8, *size, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(
        torch.ops.unet_fast.crop_concat_backward.default, (grad, 3, skip.shape[-2:], up.shape[-2:])
    )


def test_gradcheck_and_gradgradcheck():
    skip, up, size = inputs(GEOMETRIES[3], torch.float64, n=1, channels=(2, 2))
    skip.requires_grad_(), up.requires_grad_()
    fn = lambda s, u: unet_fast.crop_concat(s, u, size)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (skip, up))
    assert torch.autograd.gradgradcheck(fn, (skip, up))


def test_torch_compile_fullgraph_matches_eager():
    skip, up, size = inputs(GEOMETRIES[3])
    fn = lambda s, u: unet_fast.crop_concat(s, u, size) * 2  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(skip, up), fn(skip, up), rtol=0, atol=0)


def test_empty_batch_and_nan_propagation():
    skip, up, size = inputs(GEOMETRIES[3], n=0)
    assert unet_fast.crop_concat(skip, up, size).shape == (0, 8, 12, 15)
    skip, up, size = inputs(GEOMETRIES[0])
    skip[0, 1, 2, 3] = float("nan")
    out = unet_fast.crop_concat(skip, up, size)
    assert out[0, 1, 2, 3].isnan() and out.isnan().sum() == 1


def test_backend_choice():
    skip, up, size = inputs(GEOMETRIES[3])
    assert (
        unet_fast.crop_concat(skip.requires_grad_(), up, size, backend="reference").grad_fn.name()
        == "CatBackward0"
    )
    assert (
        "crop_concat" in unet_fast.crop_concat(skip, up, size, backend="cpu").grad_fn.name().lower()
    )
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        unet_fast.crop_concat(skip, up, size, backend="fast")
    with pytest.raises(ValueError, match="cannot run tensors on device cpu"):
        unet_fast.crop_concat(skip, up, size, backend="cuda")


@pytest.mark.parametrize(
    "make, error, message",
    [
        (
            lambda s, u: (s[0], u, None),
            ValueError,
            r"skip must be 4-D \(N, C, H, W\), got shape \(3, 17, 20\)",
        ),
        (
            lambda s, u: (s, u.double(), None),
            TypeError,
            "up is torch.float64 but skip is torch.float32",
        ),
        (lambda s, u: (s, u[:1], None), ValueError, "up has batch size 1 but skip has 2"),
        (lambda s, u: (s, u, (-1, 4)), ValueError, r"size must be two non-negative integers"),
        (lambda s, u: (s, u, (4,)), ValueError, r"size must be two non-negative integers"),
        (lambda s, u: (s.long(), u.long(), None), TypeError, "skip must be float32"),
        (lambda s, u: (s, u.to("meta"), None), ValueError, "up is on meta but skip is on cpu"),
    ],
)
def test_bad_input_raises_a_clear_error(make, error, message):
    skip, up, _ = inputs(GEOMETRIES[3])
    with pytest.raises(error, match=message):
        unet_fast.crop_concat(*make(skip, up))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_promotes_mixed_dtypes_as_cat_does(device):
    # CUDA's autocast upsamples in float32 while the skip is bfloat16 (U-Net++'s decoder).
    skip, up, size = inputs(GEOMETRIES[1], device=device)
    skip = skip.bfloat16().requires_grad_()
    up.requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = unet_fast.crop_concat(skip, up, size)
        expected = reference.crop_concat(skip.float(), up, size)
    assert out.dtype == torch.cat([skip[..., :1, :1], up[..., :1, :1]], 1).dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    assert skip.grad.dtype == torch.bfloat16 and up.grad.dtype == torch.float32


def test_direct_op_call_checks_inputs_in_cpp():
    skip, up, size = inputs(GEOMETRIES[3])
    with pytest.raises(RuntimeError, match="batch sizes differ"):
        torch.ops.unet_fast.crop_concat(skip, up[:1], size)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.unet_fast.crop_concat(skip, up.double(), size)


@pytest.mark.parametrize(
    "skip_layout, up_layout", [("contiguous", "contiguous"), ("channels_last", "strided")]
)
@pytest.mark.parametrize("size", [(9, 8), (7, 10), (5, 5), (1, 1)])
def test_crop_concat(size, skip_layout, up_layout):
    skip = layout(torch.randn(2, 3, 9, 8, device=TRITON_DEVICE), skip_layout).requires_grad_()
    up = layout(torch.randn(2, 4, 6, 11, device=TRITON_DEVICE), up_layout).requires_grad_()
    out = ops.crop_concat(skip, up, size, backend="triton")
    want = reference.crop_concat(skip, up, size)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    grad = torch.randn_like(want)
    torch.testing.assert_close(
        torch.autograd.grad(out, (skip, up), grad),
        torch.autograd.grad(want, (skip, up), grad),
        rtol=0,
        atol=0,
    )


@needs_cuda
@pytest.mark.parametrize("size", [(9, 8), (7, 10), (5, 5)])
def test_crop_concat_on_cuda(size):
    skip = torch.randn(2, 3, 9, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    up = torch.randn(2, 4, 6, 11, device="cuda").requires_grad_()
    skip.requires_grad_()
    out = ops.crop_concat(skip, up, size, backend="cuda")
    want = reference.crop_concat(skip, up, size)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    grad = torch.randn_like(want)
    torch.testing.assert_close(
        torch.autograd.grad(out, (skip, up), grad),
        torch.autograd.grad(want, (skip, up), grad),
        rtol=0,
        atol=0,
    )


@needs_cuda
@pytest.mark.parametrize("channels", [(64, 32), (3, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_crop_concat_vector_and_scalar_paths(dtype, channels):
    skip = torch.randn(2, channels[0], 20, 22, device="cuda", dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    up = torch.randn(2, channels[1], 16, 16, device="cuda", dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    for size in ((16, 16), (18, 20), (20, 22)):
        for backend in ("cuda", "triton"):
            out = ops.crop_concat(skip, up, size, backend=backend)
            torch.testing.assert_close(out, reference.crop_concat(skip, up, size), rtol=0, atol=0)


def test_opcheck_triton_op():
    ops.load_triton()
    checks = None if torch.cuda.is_available() else ("test_schema", "test_autograd_registration")
    skip = torch.randn(2, 3, 9, 8, device=TRITON_DEVICE, requires_grad=True)
    up = torch.randn(2, 4, 6, 11, device=TRITON_DEVICE, requires_grad=True)
    torch.library.opcheck(
        torch.ops.unet_fast.crop_concat_triton.default,
        (skip, up, [7, 10]),
        **({"test_utils": checks} if checks else {}),
    )


def test_nan_and_inf_are_copied_as_they_are(backend, device):
    skip, up = torch.randn(2, 3, 9, 8, device=device), torch.randn(2, 4, 6, 11, device=device)
    skip[0, 1, 4, 4], skip[1, 2, 5, 3], up[1, 0, 3, 5], up[0, 3, 2, 6] = (
        float("nan"),
        float("inf"),
        -float("inf"),
        float("nan"),
    )
    got = ops.crop_concat(skip, up, (7, 10), backend=backend)
    want = reference.crop_concat(skip, up, (7, 10))
    assert want.isnan().any() and want.isinf().any()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@needs_cuda
def test_opcheck_on_cuda():
    x = torch.randn(2, 3, 8, 9, device="cuda", dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.unet_fast.crop_concat.default, (x, x[:, :2], (5, 7)))
