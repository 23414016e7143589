"""Triton crop_concat and its backward as triton_ops; their autograd is registered in
unet_fast/ops/crop_concat.py."""

from typing import List, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .._common import empty_like_layout
from .channelwise import TILE

Tensor = torch.Tensor


@triton.jit
def _shifted(src_ptr, n, c, h, w, top, left, height, width, s_n, s_c, s_h, s_w, ok):
    """src[n, c, h - top, w - left], zero outside the source."""
    hs = h - top
    ws = w - left
    inside = ok & (hs >= 0) & (hs < height) & (ws >= 0) & (ws < width)
    return tl.load(src_ptr + n * s_n + c * s_c + hs * s_h + ws * s_w, mask=inside, other=0.0)


@triton.jit
def shifted_concat_kernel(
    out_ptr,  # (N, C, H, W) output, dense in its memory format
    first_ptr,
    second_ptr,  # sources; `second` holds channels [C_first, C)
    C,
    H,
    W,
    C_first,
    H1,
    W1,
    top1,
    left1,
    s1_n,
    s1_c,
    s1_h,
    s1_w,  # first source: size, offset in out, strides
    H2,
    W2,
    top2,
    left2,
    s2_n,
    s2_c,
    s2_h,
    s2_w,  # second source
    BLOCK_R: tl.constexpr,  # NHWC: pixels of one output row; NCHW: rows of one plane
    BLOCK_C: tl.constexpr,  # NHWC: channels per step; NCHW: columns per step
    CHANNELS_LAST: tl.constexpr,
):
    """out[n, c, h, w] = source[n, c', h - top, w - left], zero outside the source. NHWC: a
    program per output row (n, h) and block of its pixels, looping over channels; NCHW: a program
    per plane (n, c) and block of its rows, looping over columns."""
    if CHANNELS_LAST:
        n = tl.program_id(0) // H
        h = tl.program_id(0) % H
        w = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)[None, :]
            ok = (w < W) & (c < C)
            v1 = _shifted(
                first_ptr,
                n,
                c,
                h,
                w,
                top1,
                left1,
                H1,
                W1,
                s1_n,
                s1_c,
                s1_h,
                s1_w,
                ok & (c < C_first),
            )
            v2 = _shifted(
                second_ptr,
                n,
                c - C_first,
                h,
                w,
                top2,
                left2,
                H2,
                W2,
                s2_n,
                s2_c,
                s2_h,
                s2_w,
                ok & (c >= C_first),
            )
            tl.store(
                out_ptr + (tl.program_id(0) * W + w) * C + c, tl.where(c < C_first, v1, v2), mask=ok
            )
    else:
        n = tl.program_id(0) // C
        c = tl.program_id(0) % C
        h = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        for w0 in range(0, W, BLOCK_C):
            w = w0 + tl.arange(0, BLOCK_C)[None, :]
            ok = (h < H) & (w < W)
            if c < C_first:
                v = _shifted(first_ptr, n, c, h, w, top1, left1, H1, W1, s1_n, s1_c, s1_h, s1_w, ok)
            else:
                v = _shifted(
                    second_ptr,
                    n,
                    c - C_first,
                    h,
                    w,
                    top2,
                    left2,
                    H2,
                    W2,
                    s2_n,
                    s2_c,
                    s2_h,
                    s2_w,
                    ok,
                )
            tl.store(out_ptr + (tl.program_id(0) * H + h) * W + w, v, mask=ok)


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
    wrap_triton(shifted_concat_kernel)[grid](
        out,
        first,
        second,
        c,
        h,
        w,
        first.shape[1],
        first.shape[2],
        first.shape[3],
        *first_offset,
        *first.stride(),
        second.shape[2],
        second.shape[3],
        *second_offset,
        *second.stride(),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        CHANNELS_LAST=channels_last,
    )
    return out


@triton_op("unet_fast::crop_concat_triton", mutates_args=())
def crop_concat(skip: Tensor, up: Tensor, size: List[int]) -> Tensor:
    """Triton twin of unet_fast::crop_concat."""
    out = empty_like_layout(skip, (skip.shape[0], skip.shape[1] + up.shape[1], *size))
    if out.numel() == 0:
        return out
    offsets = [
        (_leading_pad(size[0], t.shape[2]), _leading_pad(size[1], t.shape[3])) for t in (skip, up)
    ]
    return _shifted_concat(out, skip, offsets[0], up, offsets[1])


@triton_op("unet_fast::crop_concat_backward_triton", mutates_args=())
def crop_concat_backward(
    grad: Tensor, skip_channels: int, skip_size: List[int], up_size: List[int]
) -> Tuple[Tensor, Tensor]:
    n, c = grad.shape[:2]
    grads = []
    for begin, end, size in ((0, skip_channels, skip_size), (skip_channels, c, up_size)):
        part = grad[:, begin:end]
        out = empty_like_layout(grad, (n, end - begin, *size))
        if out.numel():
            offset = (-_leading_pad(grad.shape[2], size[0]), -_leading_pad(grad.shape[3], size[1]))
            _shifted_concat(out, part, offset, part, offset)
        grads.append(out)
    return grads[0], grads[1]
