"""crop_concat(skip, up, size): [skip, up] on channels, each centre-cropped or zero-padded to size.

Same-padding U-Nets pad the upsampled map to the skip's size; the paper's valid-padding U-Net
crops the skip to the upsampled map's size. One kernel writes both into the output in one pass;
its backward is the inverse crop/pad of each channel slice.
"""

from typing import Optional, Sequence

import torch

from .. import _backend, reference
from .._common import empty_like_layout
from ._checks import check_size, check_tensors

_triton_kernels = None


def triton_kernels():
    """unet_fast.triton.crop_concat, imported (kernels decorated, autograd registered) on first
    use."""
    global _triton_kernels
    if _triton_kernels is None:
        from ..triton import crop_concat as kernels

        kernels.crop_concat.register_autograd(_triton_backward, setup_context=_setup_context)
        _triton_kernels = kernels
    return _triton_kernels


def crop_concat(
    skip: torch.Tensor,
    up: torch.Tensor,
    size: Optional[Sequence[int]] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Concatenate [skip, up] on channels after fitting both to `size` (default: skip's H, W).

    Odd differences split like F.pad(x, [d // 2, d - d // 2]). The output follows skip's memory
    format (contiguous or channels_last). Under torch.autocast, mixed floating dtypes are promoted
    to the wider one, as torch.cat's are (CUDA's autocast runs bilinear upsampling in float32).
    """
    skip, up = _autocast_promote(skip, up)
    check_tensors("crop_concat", skip=skip, up=up)
    size = check_size("crop_concat", skip.shape[-2:] if size is None else size)
    chosen = _backend.resolve(backend, skip.device, "crop_concat")
    if chosen == "reference":
        return reference.crop_concat(skip, up, size)
    if chosen == "triton":
        return triton_kernels().crop_concat(skip, up, list(size))
    return torch.ops.unet_fast.crop_concat(skip, up, size)


def _autocast_promote(skip, up):
    if (
        isinstance(skip, torch.Tensor)
        and isinstance(up, torch.Tensor)
        and skip.dtype != up.dtype
        and skip.is_floating_point()
        and up.is_floating_point()
        and torch.is_autocast_enabled(skip.device.type)
    ):
        dtype = torch.promote_types(skip.dtype, up.dtype)
        return skip.to(dtype), up.to(dtype)
    return skip, up


def _fake_crop_concat(skip, up, size):
    return empty_like_layout(skip, (skip.shape[0], skip.shape[1] + up.shape[1], *size))


def _fake_crop_concat_backward(grad, skip_channels, skip_size, up_size):
    n, c = grad.shape[:2]
    return (
        empty_like_layout(grad, (n, skip_channels, *skip_size)),
        empty_like_layout(grad, (n, c - skip_channels, *up_size)),
    )


def _setup_context(ctx, inputs, output):
    skip, up, size = inputs
    ctx.skip_channels, ctx.skip_size, ctx.up_size = skip.shape[1], skip.shape[-2:], up.shape[-2:]
    ctx.size = size


def _backward(ctx, grad):
    grad_skip, grad_up = torch.ops.unet_fast.crop_concat_backward(
        grad, ctx.skip_channels, ctx.skip_size, ctx.up_size
    )
    return grad_skip, grad_up, None


def _triton_backward(ctx, grad):
    grad_skip, grad_up = _triton_kernels.crop_concat_backward(
        grad, ctx.skip_channels, list(ctx.skip_size), list(ctx.up_size)
    )
    return grad_skip, grad_up, None


def _setup_backward_context(ctx, inputs, output):
    ctx.size = inputs[0].shape[-2:]


def _double_backward(ctx, grad_grad_skip, grad_grad_up):
    """crop_concat_backward is linear; its adjoint is crop_concat itself."""
    return torch.ops.unet_fast.crop_concat(grad_grad_skip, grad_grad_up, ctx.size), None, None, None


if _backend.EXTENSION_ERROR is None:
    torch.library.register_fake("unet_fast::crop_concat", _fake_crop_concat)
    torch.library.register_fake("unet_fast::crop_concat_backward", _fake_crop_concat_backward)
    torch.library.register_autograd(
        "unet_fast::crop_concat", _backward, setup_context=_setup_context
    )
    torch.library.register_autograd(
        "unet_fast::crop_concat_backward", _double_backward, setup_context=_setup_backward_context
    )
