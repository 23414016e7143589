"""The Triton backend's ops (torch.library.triton_op, so torch.compile traces into the kernels)
and the compositions that use them: BatchNorm + ReLU forward/backward, crop_concat, and
conv_bn_relu as an ATen convolution followed by the Triton BatchNorm + ReLU."""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
from torch.library import triton_op, wrap_triton

from . import kernels

Tensor = torch.Tensor
BLOCK = 256
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dense(t: Tensor) -> Tuple[Tensor, bool, Tuple[int, int, int]]:
    """t dense in its memory format, whether that is channels_last, and its (N, C, HW) strides."""
    channels_last = torch._prims_common.suggest_memory_format(t) == torch.channels_last
    t = t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    n, c, h, w = t.shape
    return t, channels_last, ((h * w * c, 1, c) if channels_last else (c * h * w, h * w, 1))


def _channel_sums(y, dy, coef, strides, backward: bool):
    n, c, h, w = y.shape
    count = n * h * w
    blocks = triton.cdiv(count, BLOCK)
    chunk = BLOCK * triton.cdiv(blocks, min(blocks, 64))
    chunks = triton.cdiv(count, chunk)
    partial = y.new_empty((2, c, chunks), dtype=torch.float32)
    wrap_triton(kernels.channel_sums_kernel)[(c, chunks)](
        y, dy, coef, partial, n, c, h * w, *strides, CHUNK=chunk, BLOCK=BLOCK, BACKWARD=backward)
    return partial.double().sum(-1)  # float64 across programs


def _channel_map(out, y, dy, coef, strides, channels_last: bool, backward: bool):
    n, c, h, w = y.shape
    wrap_triton(kernels.channel_map_kernel)[(triton.cdiv(y.numel(), BLOCK),)](
        out, y, dy, coef, n, c, h * w, *strides, BLOCK=BLOCK, CHANNELS_LAST=channels_last,
        BACKWARD=backward)
    return out


def _affine(mean, invstd, weight, bias):
    scale = invstd if weight is None else weight.double() * invstd
    shift = -mean * scale if bias is None else bias.double() - mean * scale
    return scale, shift


@triton_op("unet_fast::batch_norm_relu_triton", mutates_args=())
def batch_norm_relu(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton twin of unet_fast::batch_norm_relu: (out, mean, invstd, unbiased var)."""
    y, channels_last, strides = _dense(y)
    n, c, h, w = y.shape
    count = n * h * w
    zeros = y.new_zeros(c, dtype=torch.float32)
    if count == 0:
        return torch.empty_like(y), zeros, zeros.clone(), zeros.clone()
    first = y[0, :, 0, 0].float().contiguous()  # per-channel shift: exact variance at any mean
    sums = _channel_sums(y, y, first, strides, backward=False)
    shifted_mean = sums[0] / count
    var = (sums[1] / count - shifted_mean ** 2).clamp_min(0)
    mean = first.double() + shifted_mean
    invstd = torch.rsqrt(var + eps)
    scale, shift = _affine(mean, invstd, weight, bias)
    coef = torch.stack([scale, shift]).float().contiguous()
    out = _channel_map(torch.empty_like(y), y, y, coef, strides, channels_last, backward=False)
    return out, mean.float(), invstd.float(), (var * count / max(count - 1, 1)).float()


@triton_op("unet_fast::batch_norm_relu_backward_triton", mutates_args=())
def batch_norm_relu_backward(grad_out: Tensor, y: Tensor, weight: Optional[Tensor],
                             bias: Optional[Tensor], mean: Tensor,
                             invstd: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_y, grad_weight, grad_bias), as the C++ kernel: grad_y = m dy k + a y + b."""
    y, channels_last, strides = _dense(y)
    dy = grad_out.to(y.dtype).contiguous(memory_format=torch.channels_last if channels_last
                                         else torch.contiguous_format)
    n, c, h, w = y.shape
    count = n * h * w
    mean, invstd = mean.double(), invstd.double()
    scale, shift = _affine(mean, invstd, weight, bias)
    sums = _channel_sums(y, dy, torch.stack([scale, shift, mean]).float().contiguous(), strides,
                         backward=True)
    gain = scale
    slope = -gain * invstd * invstd * sums[1] / count
    offset = -gain * sums[0] / count - slope * mean
    coef = torch.stack([scale, shift, gain, slope, offset]).float().contiguous()
    grad_y = _channel_map(torch.empty_like(y), y, dy, coef, strides, channels_last, backward=True)
    dtype = weight.dtype if weight is not None else torch.float32
    return grad_y, (sums[1] * invstd).to(dtype), sums[0].to(dtype)


def _leading_pad(target: int, current: int) -> int:
    return (target - current) // 2  # F.pad's split: Python floor division


def _shifted_concat(out: Tensor, first: Tensor, first_offset, second: Tensor, second_offset):
    """out's channels [0, C1) from `first`, the rest from `second`, each shifted (top, left)."""
    n, c, h, w = out.shape
    channels_last = not out.is_contiguous()
    wrap_triton(kernels.shifted_concat_kernel)[(triton.cdiv(out.numel(), BLOCK),)](
        out, first, second, n, c, h, w, first.shape[1],
        first.shape[2], first.shape[3], *first_offset, *first.stride(),
        second.shape[2], second.shape[3], *second_offset, *second.stride(),
        BLOCK=BLOCK, CHANNELS_LAST=channels_last)
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


def _crop_setup(ctx, inputs, output):
    skip, up, _ = inputs
    ctx.shapes = (skip.shape[1], list(skip.shape[-2:]), list(up.shape[-2:]))


def _crop_backward(ctx, grad):
    grad_skip, grad_up = crop_concat_backward(grad, *ctx.shapes)
    return grad_skip, grad_up, None


batch_norm_relu.register_autograd(_bn_backward, setup_context=_bn_setup)
crop_concat.register_autograd(_crop_backward, setup_context=_crop_setup)


def check_dtype(x: Tensor) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(f"the Triton backend computes float32, bfloat16 and float16, got {x.dtype}")


def batch_norm_relu_stats(y, weight, bias, eps):
    """(out, mean, unbiased var) of the Triton BatchNorm + ReLU, for the ops' wrappers."""
    check_dtype(y)
    out, mean, _, var = batch_norm_relu(y, weight, bias, eps)
    return out, mean, var


def conv_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int) -> Tensor:
    """Eval path until the Triton convolution exists: ATen convolution with the folded bias and
    an in-place ReLU (no Triton kernel runs here)."""
    check_dtype(x)
    return F.conv2d(x, weight, bias, padding=padding).relu_()
