"""Triton crop_concat and its backward as triton_ops."""
from typing import List, Tuple

import torch
import triton
from torch.library import triton_op, wrap_triton

from . import kernels
from .batch_norm_relu import TILE

Tensor = torch.Tensor


def _leading_pad(target: int, current: int) -> int:
    return (target - current) // 2  # F.pad's split: Python floor division


def _shifted_concat(out: Tensor, first: Tensor, first_offset, second: Tensor, second_offset):
    """out's channels [0, C1) from `first`, the rest from `second`, each shifted (top, left)."""
    n, c, h, w = out.shape
    channels_last = not out.is_contiguous()
    if channels_last:  # (pixels of a row) x channels tiles
        block_c = min(triton.next_power_of_2(c), 128)
        block_r = max(1, min(TILE // block_c, triton.next_power_of_2(w)))
        grid = (n * h, triton.cdiv(w, block_r))
    else:  # (rows of a plane) x columns tiles
        block_c = min(triton.next_power_of_2(w), 256)
        block_r = max(1, min(TILE // block_c, triton.next_power_of_2(h)))
        grid = (n * c, triton.cdiv(h, block_r))
    wrap_triton(kernels.shifted_concat_kernel)[grid](
        out, first, second, c, h, w, first.shape[1],
        first.shape[2], first.shape[3], *first_offset, *first.stride(),
        second.shape[2], second.shape[3], *second_offset, *second.stride(),
        BLOCK_R=block_r, BLOCK_C=block_c, CHANNELS_LAST=channels_last)
    return out


def _empty(shape, like: Tensor) -> Tensor:
    fmt = torch._prims_common.suggest_memory_format(like)
    return like.new_empty(shape).contiguous(memory_format=fmt)


@triton_op("unet_fast::crop_concat_triton", mutates_args=())
def crop_concat(skip: Tensor, up: Tensor, size: List[int]) -> Tensor:
    """Triton twin of unet_fast::crop_concat."""
    out = _empty((skip.shape[0], skip.shape[1] + up.shape[1], *size), skip)
    if out.numel() == 0:
        return out
    offsets = [(_leading_pad(size[0], t.shape[2]), _leading_pad(size[1], t.shape[3]))
               for t in (skip, up)]
    return _shifted_concat(out, skip, offsets[0], up, offsets[1])


@triton_op("unet_fast::crop_concat_backward_triton", mutates_args=())
def crop_concat_backward(grad: Tensor, skip_channels: int, skip_size: List[int],
                         up_size: List[int]) -> Tuple[Tensor, Tensor]:
    n, c = grad.shape[:2]
    grads = []
    for begin, end, size in ((0, skip_channels, skip_size), (skip_channels, c, up_size)):
        part = grad[:, begin:end]
        out = _empty((n, end - begin, *size), grad)
        if out.numel():
            offset = (-_leading_pad(grad.shape[2], size[0]), -_leading_pad(grad.shape[3], size[1]))
            _shifted_concat(out, part, offset, part, offset)
        grads.append(out)
    return grads[0], grads[1]


def _crop_setup(ctx, inputs, output):
    skip, up, _ = inputs
    ctx.shapes = (skip.shape[1], list(skip.shape[-2:]), list(up.shape[-2:]))


def _crop_backward(ctx, grad):
    grad_skip, grad_up = crop_concat_backward(grad, *ctx.shapes)
    return grad_skip, grad_up, None


crop_concat.register_autograd(_crop_backward, setup_context=_crop_setup)
