"""Triton norm_act: BatchNorm / GroupNorm (InstanceNorm = one channel per group) + ReLU /
LeakyReLU / PReLU / identity on 2-D and 3-D activations, forward and backward, on the channelwise
kernels. triton_ops whose autograd is registered in unet_fast/ops/norm_act.py.

The kernels run over (sample, channel) planes: one launch over all planes of a channels-first
tensor, one per sample of a channels-last one (rows of C channels). Per-plane sums are combined
into the statistics' units (a channel for BatchNorm, a (sample, group) for GroupNorm) in float64.
"""

from typing import Optional, Tuple

import torch
from torch.library import triton_op

from .channelwise import channel_map, channel_sums, check_dtype

__all__ = ["check_dtype", "norm_act", "norm_act_apply", "norm_act_backward"]

Tensor = torch.Tensor
ACTS = {"relu": 0, "leaky_relu": 1, "identity": 2, "prelu": 3}
SLOPE_GRADIENT = 4  # channel_sums' mode summing d(out)/d(PReLU's slope) * dy


def _layout(y: Tensor) -> Tuple[Tensor, bool]:
    """y dense in its memory format, and whether that is channels-last (2-D or 3-D)."""
    fmt = torch._prims_common.suggest_memory_format(y)
    channels_last = fmt in (torch.channels_last, torch.channels_last_3d)
    return y.contiguous(memory_format=fmt), channels_last


def _planes(y: Tensor, channels_last: bool):
    """[(a 4-D view of some planes for the kernels, index of its first plane)]."""
    n, c = y.shape[:2]
    s = y[0, 0].numel()
    if not channels_last:
        return [(y.view(1, n * c, s, 1), 0)]
    return [
        (torch.as_strided(y, (1, c, s, 1), (s * c, 1, c, c), y.storage_offset() + i * s * c), i * c)
        for i in range(n)
    ]


def _each_plane_group(channels_last: bool, *tensors):
    """(views of each tensor over the same planes, slice of those planes) for every launch."""
    for views in zip(*[_planes(t, channels_last) for t in tensors], strict=True):
        first = views[0][1]
        yield [view for view, _ in views], slice(first, first + views[0][0].shape[1])


def _plane_sums(y, dy, coef, channels_last: bool, backward: bool, act: int, slope, slopes):
    """(2, N*C) float64 per-plane sums of channel_sums_kernel over every plane of y."""
    sums = torch.empty((2, y.shape[0] * y.shape[1]), dtype=torch.float64, device=y.device)
    for (view, dy_view), planes in _each_plane_group(channels_last, y, dy):
        k, negative = coef[:, planes].contiguous(), slopes[planes].contiguous()
        sums[:, planes] = channel_sums(
            view, dy_view, k, channels_last, backward, act, slope, negative
        )
    return sums


def _plane_map(out, y, dy, coef, channels_last: bool, backward: bool, act: int, slope, slopes):
    """channel_map_kernel over every plane of y, with per-plane coefficients (K, N*C)."""
    for (o, view, dy_view), planes in _each_plane_group(channels_last, out, y, dy):
        k, negative = coef[:, planes].contiguous(), slopes[planes].contiguous()
        channel_map(o, view, dy_view, k, channels_last, backward, act, slope, negative)
    return out


def _slopes(y: Tensor, act_weight: Optional[Tensor]) -> Tensor:
    """Per-plane float32 PReLU slopes (zeros, unread, without a PReLU)."""
    n, c = y.shape[:2]
    if act_weight is None:
        return y.new_zeros(n * c, dtype=torch.float32)
    return act_weight.float().reshape(-1).expand(c).repeat(n)


def _units(n: int, c: int, groups: int, device) -> Tuple[Tensor, int]:
    """Each plane's statistics unit (plane p = sample * C + channel), and the number of units."""
    plane = torch.arange(n * c, device=device)
    if groups == 0:
        return plane % c, c
    return (plane // c) * groups + (plane % c) // (c // groups), n * groups


def _per_channel(t: Optional[Tensor], c: int, fill: float, device) -> Tensor:
    return torch.full((c,), fill, dtype=torch.float64, device=device) if t is None else t.double()


@triton_op("unet_fast::norm_act_triton", mutates_args=())
def norm_act(
    y: Tensor,
    groups: int,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    act: str,
    slope: float,
    act_weight: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton twin of unet_fast::norm_act: (out, mean, invstd, unbiased var)."""
    y, channels_last = _layout(y)
    n, c = y.shape[:2]
    s = y[0, 0].numel() if y.numel() else 0
    unit, units = _units(n, c, groups, y.device)
    count = (c // groups) * s if groups else n * s
    stats_shape = (n, groups) if groups else (c,)
    if y.numel() == 0:
        zeros = y.new_zeros(stats_shape, dtype=torch.float32)
        return torch.empty_like(y), zeros, zeros.clone(), zeros.clone()
    slopes = _slopes(y, act_weight)
    sums = _plane_sums(y, y, y.new_empty((2, n * c)), channels_last, False, 0, slope, slopes)
    # each plane's sums are around its first value f; recentre them on the unit's first plane's
    plane_first = y[(slice(None), slice(None)) + (0,) * (y.dim() - 2)].reshape(-1).double()
    # a unit's first plane: (sample 0, channel c) for BatchNorm, (n, g's first channel) for groups
    unit_first = plane_first[:c] if groups == 0 else plane_first.view(n, c)[:, :: c // groups]
    unit_first = unit_first.reshape(-1)
    d = plane_first - unit_first[unit]
    a = torch.zeros(units, dtype=torch.float64, device=y.device).index_add_(
        0, unit, sums[0] + s * d
    )
    b = torch.zeros_like(a).index_add_(0, unit, sums[1] + 2 * d * sums[0] + s * d * d)
    shifted_mean = a / count
    var = (b / count - shifted_mean**2).clamp_min(0)
    mean, invstd = unit_first + shifted_mean, torch.rsqrt(var + eps)
    coef = _affine(y, groups, weight, bias, mean, invstd).float()
    out = _plane_map(
        torch.empty_like(y), y, y, coef, channels_last, False, ACTS[act], slope, slopes
    )
    unbiased = var * count / (count - 1) if count > 1 else torch.full_like(var, float("nan"))
    return (out, *[t.float().view(stats_shape) for t in (mean, invstd, unbiased)])


def _affine(y, groups, weight, bias, mean, invstd):
    """Per-plane (scale, shift) float32 coefficients from per-unit statistics."""
    n, c = y.shape[:2]
    unit, _ = _units(n, c, groups, y.device)
    mean, invstd = mean.double().reshape(-1)[unit], invstd.double().reshape(-1)[unit]
    scale = _per_channel(weight, c, 1.0, y.device).repeat(n) * invstd
    return torch.stack([scale, _per_channel(bias, c, 0.0, y.device).repeat(n) - mean * scale])


@triton_op("unet_fast::norm_act_apply_triton", mutates_args=())
def norm_act_apply(
    y: Tensor,
    groups: int,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    act: str,
    slope: float,
    act_weight: Optional[Tensor] = None,
) -> Tensor:
    """act(norm(y)) with given statistics, as unet_fast::norm_act_apply."""
    y, channels_last = _layout(y)
    if y.numel() == 0:
        return torch.empty_like(y)
    coef = _affine(y, groups, weight, bias, mean, invstd).float()
    slopes = _slopes(y, act_weight)
    return _plane_map(
        torch.empty_like(y), y, y, coef, channels_last, False, ACTS[act], slope, slopes
    )


@triton_op("unet_fast::norm_act_backward_triton", mutates_args=())
def norm_act_backward(
    grad_out: Tensor,
    y: Tensor,
    groups: int,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    act: str,
    slope: float,
    act_weight: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_y, grad_weight, grad_bias, grad_act_weight) as the C++ kernel: grad_y = m dy k +
    a (y - mean) + b per plane."""
    y, channels_last = _layout(y)
    dy = grad_out.to(y.dtype).contiguous(memory_format=torch._prims_common.suggest_memory_format(y))
    n, c = y.shape[:2]
    s = y[0, 0].numel() if y.numel() else 0
    unit, units = _units(n, c, groups, y.device)
    count = (c // groups) * s if groups else n * s
    mean, invstd = mean.double().reshape(-1), invstd.double().reshape(-1)
    gamma_c = _per_channel(weight, c, 1.0, y.device)
    gamma = gamma_c.repeat(n)
    beta = _per_channel(bias, c, 0.0, y.device).repeat(n)
    scale = gamma * invstd[unit]
    shift = beta - mean[unit] * scale
    plane_coef = torch.stack([scale, shift, mean[unit]]).float()
    slopes = _slopes(y, act_weight)
    sums = _plane_sums(y, dy, plane_coef, channels_last, True, ACTS[act], slope, slopes)
    unit_dy = torch.zeros(units, dtype=torch.float64, device=y.device).index_add_(
        0, unit, gamma * sums[0]
    )
    unit_dy_xmu = torch.zeros_like(unit_dy).index_add_(0, unit, gamma * sums[1])
    inv = invstd[unit]
    a = -(inv**3) * unit_dy_xmu[unit] / count
    b = -inv * unit_dy[unit] / count
    coef = torch.stack([scale, shift, gamma * inv, a, b, mean[unit]]).float()
    grad_y = _plane_map(
        torch.empty_like(y), y, dy, coef, channels_last, True, ACTS[act], slope, slopes
    )
    grad_weight = (sums[1] * inv).view(n, c).sum(0)
    grad_bias = sums[0].view(n, c).sum(0)
    dtype = weight.dtype if weight is not None else torch.float32
    if act_weight is None:
        grad_act_weight = y.new_empty((0,), dtype=dtype)
    else:  # d(out)/d(slope) = the pre-activation where it is not > 0
        negative = _plane_sums(y, dy, plane_coef, channels_last, True, SLOPE_GRADIENT, 0.0, slopes)
        per_channel = negative[0].view(n, c).sum(0)
        grad_act_weight = per_channel.sum() if act_weight.numel() == 1 else per_channel
        grad_act_weight = grad_act_weight.reshape(act_weight.shape).to(act_weight.dtype)
    return grad_y, grad_weight.to(dtype), grad_bias.to(dtype), grad_act_weight
