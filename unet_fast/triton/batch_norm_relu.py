"""Triton BatchNorm (batch statistics) + ReLU: forward and backward as triton_ops, and the helpers
the other Triton ops share (dense views, per-channel sums and maps)."""
from typing import Optional, Tuple

import torch
import triton
from torch.library import triton_op, wrap_triton

from ..ops.conv_bn_relu import bn_affine
from . import kernels

Tensor = torch.Tensor
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TILE = 2048  # elements per program step of the elementwise and reduction kernels


def dense(t: Tensor) -> Tuple[Tensor, bool]:
    """t dense in its memory format, and whether that is channels_last."""
    channels_last = torch._prims_common.suggest_memory_format(t) == torch.channels_last
    return t.contiguous(memory_format=torch.channels_last if channels_last else
                        torch.contiguous_format), channels_last


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


def channel_sums(y, dy, coef, channels_last: bool, backward: bool):
    """(2, C) float64 sums (see channel_sums_kernel), about 64 programs per channel block."""
    n, c, h, w = y.shape
    spread = 64 if channels_last else max(1, 64 // n)
    block_p, block_c, grid, chunk, hw_parts = _tiling(y, channels_last, spread)
    partial = y.new_empty((2, c, grid[0]), dtype=torch.float32)
    wrap_triton(kernels.channel_sums_kernel)[grid](
        y, dy, coef, partial, c, h * w, n * h * w, chunk, hw_parts, BLOCK_P=block_p,
        BLOCK_C=block_c, CHANNELS_LAST=channels_last, BACKWARD=backward)
    return partial.double().sum(-1)  # float64 across programs


def channel_map(out, y, dy, coef, channels_last: bool, backward: bool):
    n, c, h, w = y.shape
    block_p, block_c, grid, chunk, hw_parts = _tiling(y, channels_last)
    wrap_triton(kernels.channel_map_kernel)[grid](
        out, y, dy, coef, c, h * w, n * h * w, chunk, hw_parts, BLOCK_P=block_p, BLOCK_C=block_c,
        CHANNELS_LAST=channels_last, BACKWARD=backward)
    return out


@triton_op("unet_fast::batch_norm_relu_triton", mutates_args=())
def batch_norm_relu(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton twin of unet_fast::batch_norm_relu: (out, mean, invstd, unbiased var)."""
    y, channels_last = dense(y)
    n, c, h, w = y.shape
    count = n * h * w
    zeros = y.new_zeros(c, dtype=torch.float32)
    if count == 0:
        return torch.empty_like(y), zeros, zeros.clone(), zeros.clone()
    sums = channel_sums(y, y, y, channels_last, backward=False)
    first = y[0, :, 0, 0].double()  # the shift the sums were taken around
    shifted_mean = sums[0] / count
    var = (sums[1] / count - shifted_mean ** 2).clamp_min(0)
    mean = first + shifted_mean
    invstd = torch.rsqrt(var + eps)
    scale, shift = bn_affine(mean, invstd, weight, bias)
    coef = torch.stack([scale, shift]).float().contiguous()
    out = channel_map(torch.empty_like(y), y, y, coef, channels_last, backward=False)
    return out, mean.float(), invstd.float(), (var * count / max(count - 1, 1)).float()


@triton_op("unet_fast::batch_norm_relu_backward_triton", mutates_args=())
def batch_norm_relu_backward(grad_out: Tensor, y: Tensor, weight: Optional[Tensor],
                             bias: Optional[Tensor], mean: Tensor,
                             invstd: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_y, grad_weight, grad_bias), as the C++ kernel: grad_y = m dy k + a y + b."""
    y, channels_last = dense(y)
    dy = grad_out.to(y.dtype).contiguous(memory_format=torch.channels_last if channels_last
                                         else torch.contiguous_format)
    n, c, h, w = y.shape
    count = n * h * w
    mean, invstd = mean.double(), invstd.double()
    scale, shift = bn_affine(mean, invstd, weight, bias)
    sums = channel_sums(y, dy, torch.stack([scale, shift, mean]).float().contiguous(),
                        channels_last, backward=True)
    gain = scale
    slope = -gain * invstd * invstd * sums[1] / count
    offset = -gain * sums[0] / count - slope * mean
    coef = torch.stack([scale, shift, gain, slope, offset]).float().contiguous()
    grad_y = channel_map(torch.empty_like(y), y, dy, coef, channels_last, backward=True)
    dtype = weight.dtype if weight is not None else torch.float32
    return grad_y, (sums[1] * invstd).to(dtype), sums[0].to(dtype)


def _bn_setup(ctx, inputs, output):
    y, weight, bias, _ = inputs
    ctx.save_for_backward(y, weight, bias, output[1], output[2])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _bn_backward(ctx, grad_out, *_):
    if grad_out is None:
        return None, None, None, None
    y, weight, bias, mean, invstd = ctx.saved_tensors
    grad_y, grad_weight, grad_bias = batch_norm_relu_backward(grad_out, y, weight, bias, mean, invstd)
    return grad_y, grad_weight if weight is not None else None, grad_bias if bias is not None else None, None


batch_norm_relu.register_autograd(_bn_backward, setup_context=_bn_setup)


def check_dtype(x: Tensor) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(f"the Triton backend computes float32, bfloat16 and float16, got {x.dtype}")


def batch_norm_relu_stats(y, weight, bias, eps):
    """(out, mean, unbiased var) of the Triton BatchNorm + ReLU, for the ops' wrappers."""
    check_dtype(y)
    out, mean, _, var = batch_norm_relu(y, weight, bias, eps)
    return out, mean, var
