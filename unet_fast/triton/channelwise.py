"""Per-channel kernels over an activation: sums for BatchNorm statistics and their gradient, and
the elementwise map relu(y scale + shift) and its backward. Shared by the Triton ops.

Activations are dense in their memory format; programs work on (rows x channels) tiles whose
contiguous axis is the layout's (channels in NHWC, positions in NCHW), so loads coalesce in both
and no per-element division is needed. Statistics are accumulated in float32 per program and
combined across programs in float64 by the launcher.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

Tensor = torch.Tensor
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TILE = 2048  # elements per program step of the elementwise and reduction kernels


@triton.jit
def _tile(
    part,
    block_c,
    C,
    HW,
    PIXELS,
    CHUNK,
    HW_PARTS,
    BLOCK_C: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
):
    """A program's rows [begin, end), its channels, and how rows and channels map to offsets:
    NHWC rows are pixels (stride C, channels contiguous); NCHW rows are positions in one sample's
    plane (contiguous, channel stride HW). The 1 strides are literal, so loads coalesce."""
    c = block_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if CHANNELS_LAST:
        begin = part * CHUNK
        end = tl.minimum(PIXELS, begin + CHUNK)
        return begin, end, c, 0, C, c
    n = part // HW_PARTS
    begin = (part % HW_PARTS) * CHUNK
    end = tl.minimum(HW, begin + CHUNK)
    return begin, end, c, n * C * HW, 1, c * HW


@triton.jit
def _activate(pre, SLOPE, ACT: tl.constexpr):
    """ReLU keeping NaN (as F.relu), LeakyReLU or PReLU (SLOPE per channel), or nothing."""
    if ACT == 0:
        return tl.where((pre > 0) | (pre != pre), pre, 0.0)
    if ACT == 1 or ACT == 3:
        return tl.where(pre > 0, pre, pre * SLOPE)
    return pre


@triton.jit
def _mask(pre, dy, SLOPE, ACT: tl.constexpr):
    """The activation's derivative applied to dy: F.relu's (dy passes unless pre <= 0, so NaN
    passes it), F.leaky_relu's and F.prelu's (pre > 0 ? dy : dy * slope), or dy; ACT 4 is the
    derivative by PReLU's slope instead (pre > 0 ? 0 : pre * dy)."""
    if ACT == 0:
        return tl.where(pre <= 0, 0.0, dy)
    if ACT == 1 or ACT == 3:
        return tl.where(pre > 0, dy, dy * SLOPE)
    if ACT == 4:
        return tl.where(pre > 0, 0.0, pre * dy)
    return dy


@triton.jit
def _slope(slope_ptr, c, c_ok, SLOPE, ACT: tl.constexpr):
    """The negative slope: PReLU's per channel (ACT 3, 4), else the scalar."""
    if ACT == 3 or ACT == 4:
        return tl.load(slope_ptr + c, mask=c_ok, other=0.0)[None, :]
    return SLOPE


@triton.jit
def channel_sums_kernel(
    y_ptr,  # (N, C, H, W) activation, dense in its memory format
    dy_ptr,  # gradient, same shape and layout (read only when BACKWARD)
    coef_ptr,  # float32 (3, C), backward only: scale, shift, mean
    slope_ptr,  # float32 (C,): PReLU's slopes (read only when ACT is 3 or 4)
    partial_ptr,  # float32 (2, C, parts): per-program sums of a and of b
    C,
    HW,
    PIXELS,  # channels, pixels per plane, N * HW
    CHUNK,
    HW_PARTS,  # rows per program; NCHW: programs per plane
    BLOCK_P: tl.constexpr,  # rows per step
    BLOCK_C: tl.constexpr,  # channels per program
    CHANNELS_LAST: tl.constexpr,
    BACKWARD: tl.constexpr,  # forward: a = y - y[first], b = a^2; backward: a = m dy, b = m dy (y - mean)
    SLOPE,  # LeakyReLU's negative slope
    ACT: tl.constexpr,  # the activation whose mask m is: 0 ReLU, 1 LeakyReLU, 2 none, 3 PReLU
):
    part = tl.program_id(0)
    parts = tl.num_programs(0)
    begin, end, c, base, row_stride, c_offset = _tile(
        part, tl.program_id(1), C, HW, PIXELS, CHUNK, HW_PARTS, BLOCK_C, CHANNELS_LAST
    )
    c_ok = c < C
    if BACKWARD:
        scale = tl.load(coef_ptr + c, mask=c_ok, other=0.0)
        shift = tl.load(coef_ptr + C + c, mask=c_ok, other=0.0)
        center = tl.load(coef_ptr + 2 * C + c, mask=c_ok, other=0.0)
    else:  # the first sample's value: a shift that keeps the variance exact at any mean
        center = tl.load(y_ptr + c_offset, mask=c_ok, other=0.0).to(tl.float32)
    slope = _slope(slope_ptr, c, c_ok, SLOPE, ACT)
    acc_a = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for start in range(begin, end, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        ok = (rows < end)[:, None] & c_ok[None, :]
        offset = base + rows[:, None] * row_stride + c_offset[None, :]
        y = tl.load(y_ptr + offset, mask=ok, other=0.0).to(tl.float32)
        if BACKWARD:
            dy = tl.load(dy_ptr + offset, mask=ok, other=0.0).to(tl.float32)
            a = tl.where(ok, _mask(y * scale[None, :] + shift[None, :], dy, slope, ACT), 0.0)
            acc_a += a
            acc_b += a * (y - center[None, :])
        else:
            d = tl.where(ok, y - center[None, :], 0.0)
            acc_a += d
            acc_b += d * d
    tl.store(partial_ptr + c * parts + part, tl.sum(acc_a, axis=0), mask=c_ok)
    tl.store(partial_ptr + (C + c) * parts + part, tl.sum(acc_b, axis=0), mask=c_ok)


@triton.jit
def channel_map_kernel(
    out_ptr,  # output, same shape and layout as y
    y_ptr,  # (N, C, H, W) activation, dense in its memory format
    dy_ptr,  # gradient, same layout (read only when BACKWARD)
    coef_ptr,  # float32 (2 or 6, C): scale, shift, then (backward) gain, slope, offset, center
    slope_ptr,  # float32 (C,): PReLU's slopes (read only when ACT is 3)
    C,
    HW,
    PIXELS,
    CHUNK,
    HW_PARTS,  # as channel_sums_kernel; CHUNK = BLOCK_P here
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BACKWARD: tl.constexpr,  # forward: act(y scale + shift); else m dy gain + slope (y - center) + offset
    SLOPE,
    ACT: tl.constexpr,  # as channel_sums_kernel's
):
    begin, end, c, base, row_stride, c_offset = _tile(
        tl.program_id(0), tl.program_id(1), C, HW, PIXELS, CHUNK, HW_PARTS, BLOCK_C, CHANNELS_LAST
    )
    c_ok = c < C
    rows = begin + tl.arange(0, BLOCK_P)
    ok = (rows < end)[:, None] & c_ok[None, :]
    offset = base + rows[:, None] * row_stride + c_offset[None, :]
    y = tl.load(y_ptr + offset, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(coef_ptr + c, mask=c_ok, other=0.0)[None, :]
    pre = y * scale + tl.load(coef_ptr + C + c, mask=c_ok, other=0.0)[None, :]
    if BACKWARD:
        dy = tl.load(dy_ptr + offset, mask=ok, other=0.0).to(tl.float32)
        gain = tl.load(coef_ptr + 2 * C + c, mask=c_ok, other=0.0)[None, :]
        slope = tl.load(coef_ptr + 3 * C + c, mask=c_ok, other=0.0)[None, :]
        constant = tl.load(coef_ptr + 4 * C + c, mask=c_ok, other=0.0)[None, :]
        center = tl.load(coef_ptr + 5 * C + c, mask=c_ok, other=0.0)[None, :]
        # centred: slope * y + constant would cancel where the variance is tiny and slope huge
        negative = _slope(slope_ptr, c, c_ok, SLOPE, ACT)
        result = _mask(pre, dy, negative, ACT) * gain + slope * (y - center) + constant
    else:
        result = _activate(pre, _slope(slope_ptr, c, c_ok, SLOPE, ACT), ACT)
    tl.store(out_ptr + offset, result.to(out_ptr.dtype.element_ty), mask=ok)


def check_dtype(x: Tensor) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(f"the Triton backend computes float32, bfloat16 and float16, got {x.dtype}")


def dense(t: Tensor) -> Tuple[Tensor, bool]:
    """t dense in its memory format, and whether that is channels_last."""
    channels_last = torch._prims_common.suggest_memory_format(t) == torch.channels_last
    return t.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    ), channels_last


def _tiling(y: Tensor, channels_last: bool, spread: Optional[int] = None):
    """(BLOCK_P, BLOCK_C, grid, CHUNK, HW_PARTS) for a (rows x channels) tiling of y: NHWC rows
    are pixels, channels contiguous; NCHW rows run along one plane, one channel per program.
    A program takes one step of BLOCK_P rows, or with `spread` the rows are shared out among
    about that many programs (per channel block, per plane in NCHW)."""
    n, c, h, w = y.shape
    block_c = min(triton.next_power_of_2(c), 64) if channels_last else 1
    block_p = TILE // block_c
    rows = n * h * w if channels_last else h * w
    chunk = block_p * (1 if spread is None else triton.cdiv(triton.cdiv(rows, block_p), spread))
    parts = triton.cdiv(rows, chunk)
    grid = (parts if channels_last else parts * n, triton.cdiv(c, block_c))
    return block_p, block_c, grid, chunk, parts


def channel_sums(
    y, dy, coef, channels_last: bool, backward: bool, act: int = 0, slope=0.0, slopes=None
):
    """(2, C) float64 sums (see channel_sums_kernel), about 64 programs per channel block;
    `slopes`: PReLU's per channel."""
    n, c, h, w = y.shape
    spread = 64 if channels_last else max(1, 64 // n)
    block_p, block_c, grid, chunk, hw_parts = _tiling(y, channels_last, spread)
    partial = y.new_empty((2, c, grid[0]), dtype=torch.float32)
    wrap_triton(channel_sums_kernel)[grid](
        y,
        dy,
        coef,
        coef if slopes is None else slopes,
        partial,
        c,
        h * w,
        n * h * w,
        chunk,
        hw_parts,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        CHANNELS_LAST=channels_last,
        BACKWARD=backward,
        SLOPE=slope,
        ACT=act,
    )
    return partial.double().sum(-1)  # float64 across programs


def channel_map(
    out, y, dy, coef, channels_last: bool, backward: bool, act: int = 0, slope=0.0, slopes=None
):
    n, c, h, w = y.shape
    block_p, block_c, grid, chunk, hw_parts = _tiling(y, channels_last)
    wrap_triton(channel_map_kernel)[grid](
        out,
        y,
        dy,
        coef,
        coef if slopes is None else slopes,
        c,
        h * w,
        n * h * w,
        chunk,
        hw_parts,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        CHANNELS_LAST=channels_last,
        BACKWARD=backward,
        SLOPE=slope,
        ACT=act,
    )
    return out
