"""up_conv(x, weight, bias): a transposed convolution whose stride equals its kernel (2-D or 3-D).

The U-Net's upsampling (2x2, stride 2; nnU-Net's and MONAI's too). Forward is ATen's transposed
convolution. Backward uses that every output pixel comes from one input pixel and one kernel
tap: with the output gradient regrouped as G = [N * S, taps * C_out] (one copy),
grad_x = G W^T and grad_weight = X^T G are two matrix products on views of channels-last x and
weight (csrc/up_conv.h): forward + backward 1.26-1.55x as fast as ATen's at the U-Net's shapes
(benchmarks/bench_up_conv.py). Saved for backward: x and weight, as ATen's.
"""

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .. import _backend, reference
from .._common import empty_like_layout
from ._checks import FLOATING, autocast_inputs, check_channel_vectors, needs_grad

Tensor = torch.Tensor


def up_conv(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, backend: str = "auto"
) -> Tensor:
    """conv_transpose{2,3}d(x, weight, bias, stride=weight.shape[2:]).

    The kernel exists on the CPU (and, not yet run there, on CUDA); the Triton backend and the
    reference use ATen's own backward.
    """
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"up_conv: {name} must be a torch.Tensor, got {type(t).__name__}")
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_up_conv(x, weight, bias)
    if not kernel_runs(x.device, backend) or not needs_grad(x, weight, bias):
        return reference.up_conv(x, weight, bias)
    return _UpConv.apply(x, weight, bias)


def non_overlapping(kernel, stride, padding, dilation, output_padding, groups) -> bool:
    """Whether a transposed convolution's geometry is up_conv's: stride = kernel, no padding,
    output padding, dilation or groups."""
    return (
        list(stride) == list(kernel)
        and not any(padding)
        and not any(output_padding)
        and all(d == 1 for d in dilation)
        and groups == 1
    )


def kernel_runs(device: torch.device, backend: str = "auto") -> bool:
    """Whether `backend` on `device` runs up_conv's backward kernel (else ATen's backward)."""
    return _backend.resolve(backend, device, "up_conv") in ("cpu", "cuda")


def check_up_conv(x, weight, bias) -> None:
    if x.dim() not in (4, 5) or weight.dim() != x.dim():
        raise ValueError(
            f"up_conv: x must be 4-D or 5-D and weight (C_in, C_out, *kernel) of the same rank, "
            f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"up_conv: x has {x.shape[1]} channels but weight expects {weight.shape[0]} "
            f"(weight shape {tuple(weight.shape)})"
        )
    if x.dtype not in FLOATING:
        raise TypeError(f"up_conv: x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(
                f"up_conv: {name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}"
            )
    check_channel_vectors("up_conv", weight.shape[1], x.device, bias=bias)


class _UpConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return reference.up_conv(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], ctx.has_bias and needs[2]]
        grads = torch.ops.unet_fast.up_conv_backward(grad, x, weight, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask, strict=True))


def _fake_up_conv_backward(grad, x, weight, output_mask):
    return (
        empty_like_layout(x) if output_mask[0] else x.new_empty(0),
        empty_like_layout(weight) if output_mask[1] else x.new_empty(0),
        x.new_empty(weight.shape[1] if output_mask[2] else 0),
    )


if _backend.EXTENSION_ERROR is None:
    torch.library.register_fake("unet_fast::up_conv_backward", _fake_up_conv_backward)
