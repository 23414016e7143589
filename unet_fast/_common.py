"""Maths shared by every backend and layer: BatchNorm as an affine map, folding it into a
convolution, the running-statistics update, and new tensors in an input's memory format.

A leaf: it imports nothing of the package, so the ops, the Triton kernels and the modules can all
use it without pointing imports at each other.
"""

import torch

Tensor = torch.Tensor


def stats_dtype(t: Tensor) -> torch.dtype:
    """The precision of statistics and folded coefficients: float64 for float64, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def empty_like_layout(t: Tensor, shape=None) -> Tensor:
    """A new tensor of `shape` (default: t's) in t's memory format (contiguous or channels_last),
    as the kernels return their outputs."""
    out = t.new_empty(t.shape if shape is None else shape)
    return out.contiguous(memory_format=torch._prims_common.suggest_memory_format(t))


def bn_affine(mean, invstd, weight, bias):
    """(scale, shift) in float64 with bn(y) = y * scale + shift for given statistics (weight and
    bias may be None: 1 and 0)."""
    scale = invstd.double() if weight is None else weight.double() * invstd.double()
    shift = -mean.double() * scale
    return scale, shift if bias is None else shift + bias.double()


def fold(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, dtype=None):
    """Conv weight and bias with eval-mode BatchNorm folded in, computed in float32 (float64 for
    float64 weights) and returned in `dtype` (default: the weight's):
    w' = w * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta.

    Differentiable: gradients reach the conv and BatchNorm parameters.
    """
    acc = stats_dtype(weight)
    dtype = weight.dtype if dtype is None else dtype
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    shift = -running_mean.to(acc) if bias is None else bias.to(acc) - running_mean.to(acc)
    shift = shift * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(acc)
    view = (-1,) + (1,) * (weight.dim() - 1)
    return (weight.to(acc) * scale.view(view)).to(dtype), shift.to(dtype)


def update_running_stats(running_mean, running_var, mean, var, momentum, count):
    """running = (1 - momentum) * running + momentum * batch statistic, as nn.BatchNorm2d; an
    empty batch (count 0) leaves them unchanged."""
    if count == 0:
        return
    with torch.no_grad():
        for running, batch in ((running_mean, mean), (running_var, var)):
            if running is not None:
                running.mul_(1 - momentum).add_(batch.to(running.dtype), alpha=momentum)


def conv_backward(grad_y, x, weight, padding, needs):
    """(grad_x, grad_weight, grad_bias) of a stride-1 conv2d; `needs` says which to compute
    (the others come back None)."""
    return torch.ops.aten.convolution_backward(
        grad_y,
        x,
        weight,
        [weight.shape[0]] if needs[2] else None,
        [1, 1],
        [padding] * 2,
        [1, 1],
        False,
        [0, 0],
        1,
        list(needs),
    )
