"""norm_act: Norm -> activation on a 2-D or 3-D conv output, fused; BatchNorm, InstanceNorm or
GroupNorm, then ReLU, LeakyReLU, PReLU or nothing (the blocks of nnU-Net and MONAI).

With batch statistics (training; GroupNorm always; InstanceNorm without running statistics) one
kernel computes the statistics, normalises and activates: two passes forward, two backward.
Saved for backward: y and the per-unit mean and 1/std; the normalised activation and the
activation's mask are recomputed from y, so the normalised tensor is never stored. With running
statistics (BatchNorm or a tracking InstanceNorm in eval) the reference's arithmetic runs.
Kernels: C++ (cpu), CUDA and Triton. The CUDA kernels have not yet run on a GPU, so "auto"
picks the reference there (`backends()["unverified"]`); backend="cuda" runs them.
"""

from typing import Optional

import torch

from .. import _backend, reference
from .._common import empty_like_layout, update_running_stats
from ._checks import FLOATING, check_channel_vectors

Tensor = torch.Tensor
NORMS = ("batch", "instance", "group", "none")
ACTS = ("relu", "leaky_relu", "prelu", "identity")
_triton_kernels = None


def triton_kernels():
    """unet_fast.triton.norm_act, imported (kernels decorated, autograd registered) on first use."""
    global _triton_kernels
    if _triton_kernels is None:
        from ..triton import norm_act as kernels

        kernels.norm_act.register_autograd(_triton_backward, setup_context=_setup_context)
        _triton_kernels = kernels
    return _triton_kernels


def norm_act(
    y: Tensor,
    norm: str = "batch",
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    act: str = "relu",
    negative_slope: float = 0.01,
    *,
    groups: Optional[int] = None,
    act_weight: Optional[Tensor] = None,
    inplace: bool = False,
    backend: str = "auto",
) -> Tensor:
    """act(norm(y)) as F.batch_norm / F.instance_norm / F.group_norm then F.relu / F.leaky_relu
    / F.prelu compute it, updating running statistics in place when batch statistics are used.

    `groups` is GroupNorm's number of groups (required for norm="group"); `act_weight` PReLU's
    weight (1 or C values; required for act="prelu", which trains it); `momentum` is the
    running-average factor as in F.batch_norm. `inplace` writes the result over y and returns y
    (for inference, where y is not needed after: it saves allocating an output); y must then
    not need a gradient.
    """
    check_norm_act(y, norm, groups, weight, bias, running_mean, running_var, act, training)
    check_act_weight("norm_act", y, act, act_weight)
    if inplace and torch.is_grad_enabled() and y.requires_grad:
        raise ValueError("norm_act: inplace=True overwrites y, which requires grad here")
    # F.batch_norm's and F.instance_norm's choice; GroupNorm has no running statistics
    batch_stats = norm == "group" or training or running_mean is None
    args = (y, norm, groups, weight, bias, running_mean, running_var, batch_stats, momentum, eps)
    chosen = _backend.resolve(backend, y.device, "norm_act")
    if chosen == "reference" or norm == "none" or not batch_stats:
        out = reference.norm_act(*args, act, negative_slope, act_weight)
        return y.copy_(out) if inplace else out
    kernel_groups, slope = kernel_arguments(y, norm, groups, act, negative_slope)
    kernel_args = (kernel_groups, weight, bias, eps, act, slope, act_weight)
    if chosen == "triton":
        triton_kernels().check_dtype(y)
    if (
        inplace
        and chosen != "triton"
        and y.is_contiguous(memory_format=torch._prims_common.suggest_memory_format(y))
    ):
        out = y
        mean, _, var = torch.ops.unet_fast.norm_act_(y, *kernel_args)
    else:
        out, mean, _, var = kernels_for(chosen)[0](y, *kernel_args)
        out = y.copy_(out) if inplace else out
    update_norm_stats(norm, running_mean, running_var, mean, var, momentum, y[:, 0].numel())
    return out


def kernels_for(backend: str):
    """(norm_act, norm_act_backward, norm_act_apply) kernels of the cpu (or cuda) or triton backend."""
    if backend == "triton":
        kernels = triton_kernels()
        return kernels.norm_act, kernels.norm_act_backward, kernels.norm_act_apply
    ops = torch.ops.unet_fast
    return ops.norm_act, ops.norm_act_backward, ops.norm_act_apply


def kernel_arguments(y, norm, groups, act, negative_slope) -> tuple:
    """(groups, slope) as the kernels take them: groups 0 for BatchNorm, C for InstanceNorm;
    slope 0 unless LeakyReLU."""
    kernel_groups = 0 if norm == "batch" else (y.shape[1] if norm == "instance" else groups)
    return kernel_groups, (negative_slope if act == "leaky_relu" else 0.0)


def update_norm_stats(norm, running_mean, running_var, mean, var, momentum, count):
    """The running statistics' update after a batch: BatchNorm's, or a tracking InstanceNorm's
    (the per-sample statistics averaged over the batch)."""
    if norm == "batch":
        update_running_stats(running_mean, running_var, mean, var, momentum, count)
    elif running_mean is not None or running_var is not None:
        update_running_stats(running_mean, running_var, mean.mean(0), var.mean(0), momentum, 1)


def check_act_weight(op: str, y: Tensor, act: str, act_weight: Optional[Tensor]) -> None:
    """PReLU's weight: given with act="prelu" and only then, 1 or C values on y's device."""
    if (act == "prelu") != (act_weight is not None):
        raise ValueError(f"{op}: act_weight is PReLU's weight: give it with act='prelu' only")
    if act_weight is not None and (
        act_weight.numel() not in (1, y.shape[1]) or act_weight.device != y.device
    ):
        raise ValueError(
            f"{op}: PReLU's weight must hold 1 or {y.shape[1]} values on {y.device}, got "
            f"{act_weight.numel()} on {act_weight.device}"
        )


def check_norm_act(y, norm, groups, weight, bias, running_mean, running_var, act, training):
    if not isinstance(y, Tensor):
        raise TypeError(f"norm_act: y must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() not in (4, 5):
        raise ValueError(
            f"norm_act: y must be 4-D or 5-D (N, C, [D,] H, W), got shape {tuple(y.shape)}"
        )
    if y.dtype not in FLOATING:
        raise TypeError(f"norm_act: y must be float32, float64, bfloat16 or float16, got {y.dtype}")
    if norm not in NORMS:
        raise ValueError(f"norm_act: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if act not in ACTS:
        raise ValueError(f"norm_act: act must be one of {', '.join(ACTS)}, got {act!r}")
    c = y.shape[1]
    if norm == "group" and (not isinstance(groups, int) or groups <= 0 or c % groups):
        raise ValueError(f"norm_act: {c} channels cannot be split into groups={groups!r} groups")
    check_channel_vectors(
        "norm_act",
        c,
        y.device,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    if norm == "batch" and training and y.numel() // c == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(y.shape)}"
        )
    if norm == "instance" and (training or running_mean is None) and y[0, 0].numel() <= 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {tuple(y.shape)}"
        )


def _fake(y, groups, weight, bias, eps, act, slope, act_weight=None):
    stats = y.new_empty(
        (y.shape[1],) if groups == 0 else (y.shape[0], groups),
        dtype=torch.float64 if y.dtype == torch.float64 else torch.float32,
    )
    return empty_like_layout(y, y.shape), stats, torch.empty_like(stats), torch.empty_like(stats)


def _fake_inplace(y, groups, weight, bias, eps, act, slope, act_weight=None):
    return _fake(y, groups, weight, bias, eps, act, slope, act_weight)[1:]


def _fake_apply(y, groups, weight, bias, mean, invstd, act, slope, act_weight=None):
    return empty_like_layout(y, y.shape)


def _fake_backward(grad_out, y, groups, weight, bias, mean, invstd, act, slope, act_weight=None):
    param = weight.dtype if weight is not None else mean.dtype
    return (
        empty_like_layout(y, y.shape),
        y.new_empty((y.shape[1],), dtype=param),
        y.new_empty((y.shape[1],), dtype=param),
        y.new_empty((0,), dtype=param) if act_weight is None else torch.empty_like(act_weight),
    )


def _setup_context(ctx, inputs, output):
    y, groups, weight, bias, eps, act, slope, act_weight = inputs
    _, mean, invstd, _ = output
    ctx.save_for_backward(y, weight, bias, mean, invstd, act_weight)
    ctx.groups, ctx.act, ctx.slope = groups, act, slope
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_out, *_, kernel=None):
    y, weight, bias, mean, invstd, act_weight = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 8
    grads = (kernel or torch.ops.unet_fast.norm_act_backward)(
        grad_out, y, ctx.groups, weight, bias, mean, invstd, ctx.act, ctx.slope, act_weight
    )
    grad_y, grad_weight, grad_bias, grad_act_weight = grads
    return (
        grad_y,
        None,
        grad_weight if weight is not None and ctx.needs_input_grad[2] else None,
        grad_bias if bias is not None and ctx.needs_input_grad[3] else None,
        None,
        None,
        None,
        grad_act_weight if act_weight is not None and ctx.needs_input_grad[7] else None,
    )


def _triton_backward(ctx, grad_out, *rest):
    return _backward(ctx, grad_out, *rest, kernel=_triton_kernels.norm_act_backward)


if _backend.EXTENSION_ERROR is None:
    torch.library.register_fake("unet_fast::norm_act", _fake)
    torch.library.register_fake("unet_fast::norm_act_", _fake_inplace)
    torch.library.register_fake("unet_fast::norm_act_backward", _fake_backward)
    torch.library.register_fake("unet_fast::norm_act_apply", _fake_apply)
    torch.library.register_autograd("unet_fast::norm_act", _backward, setup_context=_setup_context)
