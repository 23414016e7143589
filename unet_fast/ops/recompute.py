"""Consumers of a double conv's output that keep its recipe for backward instead of the output.

A recipe (y, gamma, beta, mean, invstd) rebuilds relu(batch_norm(y)) bit for bit in one pass
(`batch_norm_relu_apply`, the same arithmetic as the forward). The double conv keeps y and the
statistics anyway, so a consumer that saves the recipe keeps no activation of its own. The UNet
uses this for the max pooling after each encoder block (which then keeps no int64 indices either)
and for the decoder's concatenation + double conv (which would otherwise keep the concatenation).
"""

import torch
import torch.nn.functional as F

from .. import _backend
from .._common import update_running_stats
from ._checks import autocast_inputs
from .conv_bn_relu import check_double_conv, double_conv_backward

unet_fast = torch.ops.unet_fast


def recompute(recipe):
    return unet_fast.batch_norm_relu_apply(*recipe)


def fused_kernels(device: torch.device) -> bool:
    """Whether the device has this module's one-pass kernels (else their steps run composed)."""
    return _backend.default_backend("recompute", device.type) != "reference"


class _MaxPool(torch.autograd.Function):
    """(max_pool2d(x, 2, 2), x) for a double conv's output x: the decoder reads x through this
    node too, so that one kernel rebuilds x, finds the maxima and sums both of x's gradients."""

    @staticmethod
    def forward(ctx, x, *recipe):
        ctx.save_for_backward(*recipe)
        ctx.set_materialize_grads(False)
        return F.max_pool2d(x, 2, 2), x

    @staticmethod
    def backward(ctx, grad_pooled, grad_x):
        nones = [None] * len(ctx.saved_tensors)
        if grad_pooled is None:
            return (grad_x, *nones)
        recipe = ctx.saved_tensors
        if fused_kernels(grad_pooled.device):
            grad = unet_fast.batch_norm_relu_max_pool_backward(grad_pooled, grad_x, *recipe)
            return (grad, *nones)
        x = recompute(recipe)
        _, indices = F.max_pool2d(x, 2, 2, return_indices=True)
        grad = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_pooled, x, [2, 2], [2, 2], [0, 0], [1, 1], False, indices
        )
        return (grad if grad_x is None else grad_x + grad, *nones)


def max_pool2d(x, recipe):
    """(2x2 max pooling of a double conv's output `x`, x to read it by): only the recipe is kept
    for backward, where the maxima are found again; x's gradients from the pooling and from
    whoever reads the returned x are summed in the same pass."""
    return _MaxPool.apply(x, *recipe)


class _JoinDoubleConv(torch.autograd.Function):
    """double_conv(crop_concat(skip, up, size)) keeping `up` and skip's recipe, not the join."""

    @staticmethod
    def forward(
        ctx, skip, up, size, eps1, eps2, padding, w1, b1, g1, be1, w2, b2, g2, be2, *recipe
    ):
        joined = unet_fast.crop_concat(skip, up, size)
        out, y1, y2, mean1, invstd1, var1, mean2, invstd2, var2 = unet_fast.double_conv(
            joined, w1, b1, g1, be1, w2, b2, g2, be2, eps1, eps2, padding
        )
        ctx.save_for_backward(
            up, w1, y1, g1, be1, mean1, invstd1, w2, y2, g2, be2, mean2, invstd2, *recipe
        )
        ctx.meta = (skip.shape[1], skip.shape[-2:], size, padding, b1 is not None, b2 is not None)
        ctx.mark_non_differentiable(y1, y2, mean1, var1, mean2, var2)
        ctx.set_materialize_grads(False)
        return out, y1, y2, mean1, var1, mean2, var2

    @staticmethod
    def backward(ctx, grad_out, *_):
        up, *saved = ctx.saved_tensors
        saved, recipe = saved[:12], saved[12:]
        skip_channels, skip_size, size, padding, has_b1, has_b2 = ctx.meta
        if grad_out is None:
            return (None,) * (14 + len(recipe))
        uncropped = skip_size == up.shape[-2:] == size  # nothing cropped or padded
        if uncropped and fused_kernels(up.device):
            joined = unet_fast.batch_norm_relu_concat(*recipe, up)
        else:
            joined = unet_fast.crop_concat(recompute(recipe), up, size)
        g = double_conv_backward(grad_out, joined, saved, (has_b1, has_b2), padding, True)
        if uncropped:
            # views of the two channel slices, as torch.cat's backward gives (the consumers read
            # strided input; a copy here is pure overhead)
            grad_skip, grad_up = g[0].split([skip_channels, up.shape[1]], 1)
        else:
            grad_skip, grad_up = unet_fast.crop_concat_backward(
                g[0], skip_channels, skip_size, up.shape[-2:]
            )
        layer1 = (g[1], g[2] if has_b1 else None, g[3], g[4])
        layer2 = (g[5], g[6] if has_b2 else None, g[7], g[8])
        return (grad_skip, grad_up, *[None] * 4, *layer1, *layer2, *[None] * len(recipe))


def join_double_conv(skip, recipe, up, size, layer1, layer2, momenta, epsilons, padding):
    """Training-mode double_conv(crop_concat(skip, up, size)) for a `skip` that is a double conv's
    output with `recipe`: keeps `up` and the recipe for backward instead of the concatenation.
    Each layer is (weight, bias, bn_weight, bn_bias, running_mean, running_var)."""
    up, w1, b1, w2, b2 = autocast_inputs(up, layer1[0], layer1[1], layer2[0], layer2[1])
    layer1, layer2 = (w1, b1, *layer1[2:]), (w2, b2, *layer2[2:])
    joined_shape = (skip.shape[0], skip.shape[1] + up.shape[1], *size)
    check_double_conv(skip.new_zeros(()).expand(joined_shape), layer1, layer2, padding)
    out, y1, y2, mean1, var1, mean2, var2 = _JoinDoubleConv.apply(
        skip, up, tuple(size), *epsilons, padding, *layer1[:4], *layer2[:4], *recipe
    )
    for layer, mean, var, momentum, y in (
        (layer1, mean1, var1, momenta[0], y1),
        (layer2, mean2, var2, momenta[1], y2),
    ):
        update_running_stats(layer[4], layer[5], mean, var, momentum, y[:, 0].numel())
    return out
