"""conv_bn_relu, double_conv and batch_norm_relu: Conv2d -> BatchNorm2d -> ReLU, fused.

Training (batch statistics): the convolution runs through ATen; statistics, normalisation and ReLU
run in one fused kernel (two passes over the conv output forward, two backward). Saved for
backward: x, the conv output y, per-channel mean and 1/std; the ReLU mask — and in double_conv the
middle activation — is recomputed from y.

Eval (running statistics): BatchNorm is folded into the conv, w' = w * g / sqrt(var + eps),
b' = (b - mean) * g / sqrt(var + eps) + beta, and the ReLU runs as the conv's epilogue.

`momentum` is the running-average factor (as in F.batch_norm); modules translate
momentum=None into 1 / num_batches_tracked, as nn.BatchNorm2d does.
"""

from typing import Optional

import torch

from .. import _backend, reference
from .._common import conv_backward, empty_like_layout, stats_dtype, update_running_stats
from ._checks import autocast_inputs, check_conv, check_tensors, needs_grad
from .conv_bias_relu import conv_bn_relu_eval

Tensor = torch.Tensor
_triton_kernels = None


def triton_kernels():
    """unet_fast.triton.conv_bn_relu, imported (kernels decorated, autograd registered) on first
    use."""
    global _triton_kernels
    if _triton_kernels is None:
        from ..triton import conv_bn_relu as kernels

        kernels.batch_norm_relu.register_autograd(_bn_backward, setup_context=_triton_bn_setup)
        kernels.double_conv.register_autograd(_triton_double_backward, setup_context=_double_setup)
        _triton_kernels = kernels
    return _triton_kernels


def conv_bn_relu(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    padding: int = 1,
    *,
    backend: str = "auto",
) -> Tensor:
    """relu(batch_norm(conv2d(x, weight, bias, padding=padding))), updating running stats in training.

    Without running statistics (track_running_stats=False) batch statistics are always used.
    """
    batch_stats = training or running_mean is None
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_conv(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, padding, batch_stats)
    chosen = _backend.resolve(backend, x.device, "conv_bn_relu")
    # Folded low-precision weights would cost the BatchNorm parameters' gradients their
    # precision: eval mode that trains parameters keeps BatchNorm separate (any backend).
    keep_bn = (
        not batch_stats
        and x.dtype in (torch.bfloat16, torch.float16)
        and needs_grad(weight, bias, bn_weight, bn_bias)
    )
    args = (x, weight, bias, bn_weight, bn_bias, running_mean, running_var, batch_stats)
    if chosen == "reference" or keep_bn:
        return reference.conv_bn_relu(*args, momentum, eps, padding)
    if chosen == "triton":
        return _triton_conv_bn_relu(*args, momentum, eps, padding)
    if batch_stats:
        out, y, mean, _, var = torch.ops.unet_fast.conv_bn_relu(
            x, weight, bias, bn_weight, bn_bias, eps, padding
        )
        update_running_stats(running_mean, running_var, mean, var, momentum, y[:, 0].numel())
        return out
    return conv_bn_relu_eval(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, padding, chosen
    )


def _triton_conv_bn_relu(
    x,
    weight,
    bias,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    batch_stats,
    momentum,
    eps,
    padding,
):
    """The Triton backend: ATen convolution, then the Triton BatchNorm + ReLU (training) or the
    folded convolution (eval)."""
    if not batch_stats:
        return conv_bn_relu_eval(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, padding, "triton"
        )
    out, mean, var = triton_kernels().batch_norm_relu_stats(
        torch.nn.functional.conv2d(x, weight, bias, padding=padding), bn_weight, bn_bias, eps
    )
    update_running_stats(running_mean, running_var, mean, var, momentum, out[:, 0].numel())
    return out


def double_conv(
    x: Tensor,
    weight1,
    bias1,
    bn_weight1,
    bn_bias1,
    running_mean1,
    running_var1,
    weight2,
    bias2,
    bn_weight2,
    bn_bias2,
    running_mean2,
    running_var2,
    training: bool,
    momentum1: float = 0.1,
    momentum2: float = 0.1,
    eps1: float = 1e-5,
    eps2: float = 1e-5,
    padding: int = 1,
    *,
    backend: str = "auto",
    return_recipe: bool = False,
):
    """Two conv_bn_relu in a row; in training it stores x, y1, y2 and recomputes relu(bn(y1)).

    With return_recipe=True it returns (out, recipe): in fused training, recipe is
    (y2, bn_weight2, bn_bias2, mean2, invstd2), from which `ops.recompute` rebuilds `out`
    (see unet_fast.ops.recompute); otherwise None.
    """
    batch_stats = training or running_mean1 is None or running_mean2 is None
    chosen = _backend.resolve(backend, x.device, "conv_bn_relu")
    x, weight1, bias1, weight2, bias2 = autocast_inputs(x, weight1, bias1, weight2, bias2)
    layer1 = (weight1, bias1, bn_weight1, bn_bias1, running_mean1, running_var1)
    layer2 = (weight2, bias2, bn_weight2, bn_bias2, running_mean2, running_var2)
    three_by_three = weight1.shape[2:] == weight2.shape[2:] == (3, 3)
    if not batch_stats or chosen == "reference" or (chosen == "triton" and not three_by_three):
        x = conv_bn_relu(x, *layer1, training, momentum1, eps1, padding, backend=backend)
        out = conv_bn_relu(x, *layer2, training, momentum2, eps2, padding, backend=backend)
        return (out, None) if return_recipe else out
    check_double_conv(x, layer1, layer2, padding)
    op = torch.ops.unet_fast.double_conv
    if (
        chosen == "triton"
    ):  # one implicit-GEMM conv per layer, layer 1's BN+ReLU in layer 2's prologue
        kernels = triton_kernels()  # (first use imports the Triton ops: registers them)
        kernels.check_dtype(x)
        op = torch.ops.unet_fast.double_conv_triton
    out, y1, y2, mean1, invstd1, var1, mean2, invstd2, var2 = op(
        x, *layer1[:4], *layer2[:4], eps1, eps2, padding
    )
    update_running_stats(running_mean1, running_var1, mean1, var1, momentum1, y1[:, 0].numel())
    update_running_stats(running_mean2, running_var2, mean2, var2, momentum2, y2[:, 0].numel())
    # a recipe recomputes with the C++ kernel: only bit-exact against the C++ forward
    recipe = (y2, bn_weight2, bn_bias2, mean2, invstd2) if chosen != "triton" else None
    return (out, recipe) if return_recipe else out


def check_double_conv(x, layer1, layer2, padding):
    """Both layers' checks, each layer (weight, bias, bn_weight, bn_bias, running_mean,
    running_var); the second sees the first's output shape."""
    check_conv(x, *layer1, padding, True)
    n, c = x.shape[0], layer1[0].shape[0]
    h, w = (max(x.shape[i] + 2 * padding - layer1[0].shape[i] + 1, 0) for i in (2, 3))
    check_conv(x.new_zeros(()).expand(n, c, h, w), *layer2, padding, True)


def batch_norm_relu(
    y: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> Tensor:
    """relu(batch_norm(y)) with batch statistics (training mode), updating running stats if given."""
    check_tensors("batch_norm_relu", y=y)
    if y.shape[0] * y.shape[2] * y.shape[3] == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(y.shape)}"
        )
    chosen = _backend.resolve(backend, y.device, "conv_bn_relu")
    if chosen == "reference":
        return torch.relu(
            torch.nn.functional.batch_norm(
                y, running_mean, running_var, weight, bias, True, momentum, eps
            )
        )
    if chosen == "triton":
        out, mean, var = triton_kernels().batch_norm_relu_stats(y, weight, bias, eps)
    else:
        out, mean, _, var = torch.ops.unet_fast.batch_norm_relu(y, weight, bias, eps)
    update_running_stats(running_mean, running_var, mean, var, momentum, y[:, 0].numel())
    return out


# --- fake (meta) kernels: shapes, dtypes and memory formats of the C++ kernels' outputs ---


def _fake_batch_norm_relu(y, weight, bias, eps):
    stats = y.new_empty(y.shape[1], dtype=stats_dtype(y))
    return empty_like_layout(y), stats, torch.empty_like(stats), torch.empty_like(stats)


def _fake_batch_norm_relu_backward(grad_out, y, weight, bias, mean, invstd):
    dtype = weight.dtype if weight is not None else stats_dtype(y)
    grad_param = y.new_empty(y.shape[1], dtype=dtype)
    return empty_like_layout(y), grad_param, torch.empty_like(grad_param)


def _fake_batch_norm_relu_apply(y, weight, bias, mean, invstd):
    return empty_like_layout(y)


def _fake_batch_norm_relu_max_pool_backward(grad_pooled, grad_x, y, weight, bias, mean, invstd):
    return empty_like_layout(y)


def _fake_batch_norm_relu_concat(y, weight, bias, mean, invstd, up):
    return empty_like_layout(y, (y.shape[0], y.shape[1] + up.shape[1], *y.shape[2:]))


def _fake_conv_output(x, weight, padding):
    h, w = (x.shape[i] + 2 * padding - weight.shape[i] + 1 for i in (2, 3))
    return empty_like_layout(x, (x.shape[0], weight.shape[0], h, w))


def _fake_conv_bn_relu(x, weight, bias, bn_weight, bn_bias, eps, padding):
    y = _fake_conv_output(x, weight, padding)
    return (empty_like_layout(y), y, *_fake_batch_norm_relu(y, bn_weight, bn_bias, eps)[1:])


def _fake_conv_bn_relu_backward(
    grad_out, x, weight, has_bias, y, bn_weight, bn_bias, mean, invstd, padding, input_grad
):
    empty = x.new_empty(0)
    grad_bn = _fake_batch_norm_relu_backward(grad_out, y, bn_weight, bn_bias, mean, invstd)[1:]
    return (
        empty_like_layout(x) if input_grad else empty,
        empty_like_layout(weight),
        y.new_empty(weight.shape[0]) if has_bias else empty,
        *grad_bn,
    )


def _fake_double_conv(x, w1, b1, g1, be1, w2, b2, g2, be2, eps1, eps2, padding):
    out1, y1, *stats1 = _fake_conv_bn_relu(x, w1, b1, g1, be1, eps1, padding)
    out, y2, *stats2 = _fake_conv_bn_relu(out1, w2, b2, g2, be2, eps2, padding)
    return (out, y1, y2, *stats1, *stats2)


def _fake_double_conv_backward(grad_out, x, *args):
    """args: (weight, has_bias, y, bn_weight, bn_bias, mean, invstd) per layer, padding,
    input_grad."""
    layer1, layer2, (padding, input_grad) = args[:7], args[7:14], args[14:]
    grads2 = _fake_conv_bn_relu_backward(grad_out, layer1[2], *layer2, padding, True)
    grads1 = _fake_conv_bn_relu_backward(grads2[0], x, *layer1, padding, input_grad)
    return [*grads1, *grads2[1:]]


# --- autograd ---


def _no_statistics_grads(ctx, output):
    """The statistics and conv outputs returned for backward take no gradient: keep autograd from
    materialising zero gradients for them (a full activation-sized fill each)."""
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _bn_setup(ctx, inputs, output):
    y, weight, bias = inputs[:3]
    ctx.triton = False
    ctx.save_for_backward(y, weight, bias, output[1], output[2])
    _no_statistics_grads(ctx, output)


def _bn_backward(ctx, grad_out, *_):
    if grad_out is None:
        return (None,) * 4
    y, weight, bias, mean, invstd = ctx.saved_tensors
    backward = (
        _triton_kernels.batch_norm_relu_backward
        if ctx.triton
        else torch.ops.unet_fast.batch_norm_relu_backward
    )
    grad_y, grad_weight, grad_bias = backward(grad_out, y, weight, bias, mean, invstd)
    return (
        grad_y,
        grad_weight if weight is not None else None,
        grad_bias if bias is not None else None,
        None,
    )


def _grads(ctx, grads, has_bias, offset):
    """Maps (grad_w, grad_b, grad_g, grad_beta) to inputs, None for absent bias or parameters."""
    grad_w, grad_b, grad_g, grad_beta = grads
    needs = ctx.needs_input_grad[offset : offset + 4]
    return (
        grad_w if needs[0] else None,
        grad_b if has_bias and needs[1] else None,
        grad_g if needs[2] else None,
        grad_beta if needs[3] else None,
    )


def _conv_setup(ctx, inputs, output):
    x, weight, bias, bn_weight, bn_bias = inputs[:5]
    ctx.save_for_backward(x, weight, output[1], bn_weight, bn_bias, output[2], output[3])
    ctx.has_bias, ctx.padding = bias is not None, inputs[-1]
    _no_statistics_grads(ctx, output)


def _conv_backward(ctx, grad_out, *_):
    if grad_out is None:
        return (None,) * 7
    x, weight, y, bn_weight, bn_bias, mean, invstd = ctx.saved_tensors
    grad_x, *grads = torch.ops.unet_fast.conv_bn_relu_backward(
        grad_out,
        x,
        weight,
        ctx.has_bias,
        y,
        bn_weight,
        bn_bias,
        mean,
        invstd,
        ctx.padding,
        ctx.needs_input_grad[0],
    )
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        *_grads(ctx, grads, ctx.has_bias, 1),
        None,
        None,
    )


def _double_setup(ctx, inputs, output):
    x, w1, b1, g1, be1, w2, b2, g2, be2 = inputs[:9]
    out, y1, y2, mean1, invstd1, _, mean2, invstd2, _ = output
    ctx.save_for_backward(x, w1, y1, g1, be1, mean1, invstd1, w2, y2, g2, be2, mean2, invstd2)
    ctx.has_bias = (b1 is not None, b2 is not None)
    ctx.padding = inputs[-1]
    _no_statistics_grads(ctx, output)


def double_conv_backward(grad_out, x, saved, has_bias, padding, input_grad):
    """unet_fast::double_conv_backward from the tensors a double conv saves for backward:
    (weight, y, bn_weight, bn_bias, mean, invstd) of each layer, in that order."""
    (w1, *rest1), (w2, *rest2) = saved[:6], saved[6:]
    return torch.ops.unet_fast.double_conv_backward(
        grad_out, x, w1, has_bias[0], *rest1, w2, has_bias[1], *rest2, padding, input_grad
    )


def _double_backward(ctx, grad_out, *_):
    if grad_out is None:
        return (None,) * 12
    x, *saved = ctx.saved_tensors
    grads = double_conv_backward(
        grad_out, x, saved, ctx.has_bias, ctx.padding, ctx.needs_input_grad[0]
    )
    return (
        grads[0] if ctx.needs_input_grad[0] else None,
        *_grads(ctx, grads[1:5], ctx.has_bias[0], 1),
        *_grads(ctx, grads[5:9], ctx.has_bias[1], 5),
        None,
        None,
        None,
    )


def _triton_bn_setup(ctx, inputs, output):
    _bn_setup(ctx, inputs, output)
    ctx.triton = True


def _triton_double_backward(ctx, grad_out, *_):
    """The Triton double conv's backward: Triton BatchNorm + ReLU backward, ATen convolutions,
    the middle activation recomputed by the Triton map."""
    if grad_out is None:
        return (None,) * 12
    x, w1, y1, g1, be1, mean1, invstd1, w2, y2, g2, be2, mean2, invstd2 = ctx.saved_tensors
    (has_b1, has_b2), padding = ctx.has_bias, ctx.padding
    kernels = _triton_kernels
    grad_y2, grad_g2, grad_be2 = kernels.batch_norm_relu_backward(
        grad_out, y2, g2, be2, mean2, invstd2
    )
    a1 = kernels.batch_norm_relu_apply(y1, g1, be1, mean1, invstd1)
    grad_a1, grad_w2, grad_b2 = conv_backward(grad_y2, a1, w2, padding, (True, True, has_b2))
    grad_y1, grad_g1, grad_be1 = kernels.batch_norm_relu_backward(
        grad_a1, y1, g1, be1, mean1, invstd1
    )
    grad_x, grad_w1, grad_b1 = conv_backward(
        grad_y1, x, w1, padding, (ctx.needs_input_grad[0], True, has_b1)
    )
    return (
        grad_x,
        *_grads(ctx, (grad_w1, grad_b1, grad_g1, grad_be1), has_b1, 1),
        *_grads(ctx, (grad_w2, grad_b2, grad_g2, grad_be2), has_b2, 5),
        None,
        None,
        None,
    )


if _backend.EXTENSION_ERROR is None:
    _lib = "unet_fast::"
    torch.library.register_fake(_lib + "batch_norm_relu", _fake_batch_norm_relu)
    torch.library.register_fake(_lib + "batch_norm_relu_backward", _fake_batch_norm_relu_backward)
    torch.library.register_fake(_lib + "batch_norm_relu_apply", _fake_batch_norm_relu_apply)
    torch.library.register_fake(
        _lib + "batch_norm_relu_max_pool_backward", _fake_batch_norm_relu_max_pool_backward
    )
    torch.library.register_fake(_lib + "batch_norm_relu_concat", _fake_batch_norm_relu_concat)
    torch.library.register_fake(_lib + "conv_bn_relu", _fake_conv_bn_relu)
    torch.library.register_fake(_lib + "conv_bn_relu_backward", _fake_conv_bn_relu_backward)
    torch.library.register_fake(_lib + "double_conv", _fake_double_conv)
    torch.library.register_fake(_lib + "double_conv_backward", _fake_double_conv_backward)
    torch.library.register_autograd(_lib + "batch_norm_relu", _bn_backward, setup_context=_bn_setup)
    torch.library.register_autograd(
        _lib + "conv_bn_relu", _conv_backward, setup_context=_conv_setup
    )
    torch.library.register_autograd(
        _lib + "double_conv", _double_backward, setup_context=_double_setup
    )
