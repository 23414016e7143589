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
from ._checks import check_tensors

Tensor = torch.Tensor


def _check(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, padding, training):
    check_tensors("conv_bn_relu", x=x)
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"conv_bn_relu: weight must be 4-D (C_out, C_in, kH, kW), got "
                         f"{getattr(weight, 'shape', weight)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"conv_bn_relu: x has {x.shape[1]} channels but weight expects "
                         f"{weight.shape[1]} (weight shape {tuple(weight.shape)})")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"conv_bn_relu: weight is {weight.dtype} on {weight.device} but x is "
                        f"{x.dtype} on {x.device}")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"conv_bn_relu: padding must be a non-negative int, got {padding!r}")
    c_out = weight.shape[0]
    for name, t in (("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and (t.shape != (c_out,) or t.device != x.device):
            raise ValueError(f"conv_bn_relu: {name} must have shape ({c_out},) on {x.device}, "
                             f"got {tuple(t.shape)} on {t.device}")
    h, w = (x.shape[i] + 2 * padding - weight.shape[i] + 1 for i in (2, 3))
    if h <= 0 or w <= 0:
        raise ValueError(f"conv_bn_relu: input {tuple(x.shape[2:])} with padding {padding} is "
                         f"smaller than the {tuple(weight.shape[2:])} kernel")
    if training and x.shape[0] * h * w == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{(x.shape[0], c_out, h, w)}")


def _autocast(*tensors):
    """Under torch.autocast the convolution inputs take the autocast dtype, as F.conv2d's would;
    BatchNorm parameters and statistics stay in float32."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fold(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
    """Conv weight and bias with eval-mode BatchNorm folded in (in float32, or float64 for float64).

    Differentiable: gradients reach the conv and BatchNorm parameters.
    """
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    shift = -running_mean.to(acc) if bias is None else bias.to(acc) - running_mean.to(acc)
    shift = shift * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(acc)
    return (weight.to(acc) * scale.view(-1, 1, 1, 1)).to(weight.dtype), shift.to(weight.dtype)


def bn_affine(mean, invstd, weight, bias):
    """(scale, shift) in float64 with relu(bn(y)) = relu(y * scale + shift) for given statistics
    (weight and bias may be None: 1 and 0)."""
    scale = invstd.double() if weight is None else weight.double() * invstd.double()
    shift = -mean.double() * scale
    return scale, shift if bias is None else shift + bias.double()


def update_running_stats(running_mean, running_var, mean, var, momentum, count):
    """running = (1 - momentum) * running + momentum * batch statistic, as nn.BatchNorm2d; an
    empty batch (count 0) leaves them unchanged."""
    if count == 0:
        return
    with torch.no_grad():
        for running, batch in ((running_mean, mean), (running_var, var)):
            if running is not None:
                running.mul_(1 - momentum).add_(batch.to(running.dtype), alpha=momentum)


def conv_bn_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                 bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                 running_var: Optional[Tensor], training: bool, momentum: float = 0.1,
                 eps: float = 1e-5, padding: int = 1, *, backend: str = "auto") -> Tensor:
    """relu(batch_norm(conv2d(x, weight, bias, padding=padding))), updating running stats in training.

    Without running statistics (track_running_stats=False) batch statistics are always used.
    """
    batch_stats = training or running_mean is None
    x, weight, bias = _autocast(x, weight, bias)
    _check(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, padding, batch_stats)
    chosen = _backend.resolve(backend, x.device, "conv_bn_relu")
    # Folded low-precision weights would cost the BatchNorm parameters' gradients their
    # precision: eval mode that trains parameters keeps BatchNorm separate (any backend).
    keep_bn = (not batch_stats and x.dtype in (torch.bfloat16, torch.float16)
               and _needs_grad(weight, bias, bn_weight, bn_bias))
    if chosen == "reference" or keep_bn:
        return reference.conv_bn_relu(x, weight, bias, bn_weight, bn_bias, running_mean,
                                      running_var, batch_stats, momentum, eps, padding)
    if chosen == "triton":
        return _triton_conv_bn_relu(x, weight, bias, bn_weight, bn_bias, running_mean,
                                    running_var, batch_stats, momentum, eps, padding)
    if batch_stats:
        out, y, mean, _, var = torch.ops.unet_fast.conv_bn_relu(x, weight, bias, bn_weight,
                                                                bn_bias, eps, padding)
        update_running_stats(running_mean, running_var, mean, var, momentum, y[:, 0].numel())
        return out
    w, b = fold(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
    return torch.ops.unet_fast.conv_bias_relu(x, w, b, padding)


def _triton_conv_bn_relu(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                         batch_stats, momentum, eps, padding):
    """The Triton backend: ATen convolution, then the Triton BatchNorm + ReLU (training) or the
    folded convolution (eval)."""
    triton_ops = _backend.triton_ops()
    if not batch_stats:
        return triton_ops.conv_relu(x, *fold(weight, bias, bn_weight, bn_bias, running_mean,
                                             running_var, eps), padding)
    out, mean, var = triton_ops.batch_norm_relu_stats(
        torch.nn.functional.conv2d(x, weight, bias, padding=padding), bn_weight, bn_bias, eps)
    update_running_stats(running_mean, running_var, mean, var, momentum, out[:, 0].numel())
    return out


def conv_bias_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int = 1, *,
                   backend: str = "auto") -> Tensor:
    """relu(conv2d(x, weight, bias, padding=padding)) with the ReLU fused into the convolution:
    the eval path once BatchNorm is folded into weight and bias (see `fold`)."""
    x, weight, bias = _autocast(x, weight, bias)
    _check(x, weight, bias, None, None, None, None, padding, False)
    chosen = _backend.resolve(backend, x.device, "conv_bn_relu")
    if chosen == "reference":
        return reference.conv_bias_relu(x, weight, bias, padding)
    if chosen == "triton":
        return _backend.triton_ops().conv_relu(x, weight, bias, padding)
    return torch.ops.unet_fast.conv_bias_relu(x, weight, bias, padding)


def double_conv(x: Tensor, weight1, bias1, bn_weight1, bn_bias1, running_mean1, running_var1,
                weight2, bias2, bn_weight2, bn_bias2, running_mean2, running_var2,
                training: bool, momentum1: float = 0.1, momentum2: float = 0.1,
                eps1: float = 1e-5, eps2: float = 1e-5, padding: int = 1, *,
                backend: str = "auto", return_recipe: bool = False):
    """Two conv_bn_relu in a row; in training it stores x, y1, y2 and recomputes relu(bn(y1)).

    With return_recipe=True it returns (out, recipe): in fused training, recipe is
    (y2, bn_weight2, bn_bias2, mean2, invstd2), from which `ops.recompute` rebuilds `out`
    (see unet_fast.ops.recompute); otherwise None.
    """
    batch_stats = training or running_mean1 is None or running_mean2 is None
    chosen = _backend.resolve(backend, x.device, "conv_bn_relu")
    three_by_three = weight1.shape[2:] == weight2.shape[2:] == (3, 3)
    if not batch_stats or chosen == "reference" or (chosen == "triton" and not three_by_three):
        x = conv_bn_relu(x, weight1, bias1, bn_weight1, bn_bias1, running_mean1, running_var1,
                         training, momentum1, eps1, padding, backend=backend)
        out = conv_bn_relu(x, weight2, bias2, bn_weight2, bn_bias2, running_mean2, running_var2,
                           training, momentum2, eps2, padding, backend=backend)
        return (out, None) if return_recipe else out
    x, weight1, bias1, weight2, bias2 = _autocast(x, weight1, bias1, weight2, bias2)
    check_double_conv(x, weight1, bias1, bn_weight1, bn_bias1, running_mean1, running_var1,
                      weight2, bias2, bn_weight2, bn_bias2, running_mean2, running_var2, padding)
    op = torch.ops.unet_fast.double_conv
    if chosen == "triton":  # one implicit-GEMM conv per layer, layer 1's BN+ReLU in layer 2's prologue
        _backend.triton_ops().check_dtype(x)  # (first use imports the Triton ops: registers them)
        op = torch.ops.unet_fast.double_conv_triton
    out, y1, y2, mean1, invstd1, var1, mean2, invstd2, var2 = op(
        x, weight1, bias1, bn_weight1, bn_bias1, weight2, bias2, bn_weight2, bn_bias2, eps1, eps2,
        padding)
    update_running_stats(running_mean1, running_var1, mean1, var1, momentum1, y1[:, 0].numel())
    update_running_stats(running_mean2, running_var2, mean2, var2, momentum2, y2[:, 0].numel())
    # a recipe recomputes with the C++ kernel: only bit-exact against the C++ forward
    recipe = (y2, bn_weight2, bn_bias2, mean2, invstd2) if chosen != "triton" else None
    return (out, recipe) if return_recipe else out


def check_double_conv(x, weight1, bias1, bn_weight1, bn_bias1, running_mean1, running_var1,
                      weight2, bias2, bn_weight2, bn_bias2, running_mean2, running_var2, padding):
    """Both layers' checks; the second sees the first's output shape."""
    _check(x, weight1, bias1, bn_weight1, bn_bias1, running_mean1, running_var1, padding, True)
    h1 = x.shape[2] + 2 * padding - weight1.shape[2] + 1
    w1 = x.shape[3] + 2 * padding - weight1.shape[3] + 1
    _check(x.new_zeros(()).expand(x.shape[0], weight1.shape[0], max(h1, 0), max(w1, 0)),
           weight2, bias2, bn_weight2, bn_bias2, running_mean2, running_var2, padding, True)


def batch_norm_relu(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                    momentum: float = 0.1, eps: float = 1e-5, *, backend: str = "auto") -> Tensor:
    """relu(batch_norm(y)) with batch statistics (training mode), updating running stats if given."""
    check_tensors("batch_norm_relu", y=y)
    if y.shape[0] * y.shape[2] * y.shape[3] == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{tuple(y.shape)}")
    chosen = _backend.resolve(backend, y.device, "conv_bn_relu")
    if chosen == "reference":
        return torch.relu(torch.nn.functional.batch_norm(
            y, running_mean, running_var, weight, bias, True, momentum, eps))
    if chosen == "triton":
        out, mean, var = _backend.triton_ops().batch_norm_relu_stats(y, weight, bias, eps)
    else:
        out, mean, _, var = torch.ops.unet_fast.batch_norm_relu(y, weight, bias, eps)
    update_running_stats(running_mean, running_var, mean, var, momentum, y[:, 0].numel())
    return out


# --- fake (meta) kernels: shapes, dtypes and memory formats of the C++ kernels' outputs ---

def _like(t: Tensor, shape=None) -> Tensor:
    fmt = torch._prims_common.suggest_memory_format(t)
    return t.new_empty(t.shape if shape is None else shape).contiguous(memory_format=fmt)


def _stats_dtype(t: Tensor):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _fake_batch_norm_relu(y, weight, bias, eps):
    stats = y.new_empty(y.shape[1], dtype=_stats_dtype(y))
    return _like(y), stats, torch.empty_like(stats), torch.empty_like(stats)


def _fake_batch_norm_relu_backward(grad_out, y, weight, bias, mean, invstd):
    dtype = weight.dtype if weight is not None else _stats_dtype(y)
    grad_param = y.new_empty(y.shape[1], dtype=dtype)
    return _like(y), grad_param, torch.empty_like(grad_param)


def _fake_batch_norm_relu_apply(y, weight, bias, mean, invstd):
    return _like(y)


def _fake_conv_bias_relu(x, weight, bias, padding):
    h, w = (x.shape[i] + 2 * padding - weight.shape[i] + 1 for i in (2, 3))
    return _like(x, (x.shape[0], weight.shape[0], h, w))


def _fake_conv_bn_relu(x, weight, bias, bn_weight, bn_bias, eps, padding):
    y = _fake_conv_bias_relu(x, weight, bias, padding)
    return (_like(y), y, *_fake_batch_norm_relu(y, bn_weight, bn_bias, eps)[1:])


def _fake_conv_bn_relu_backward(grad_out, x, weight, has_bias, y, bn_weight, bn_bias, mean,
                                invstd, padding, input_grad):
    empty = x.new_empty(0)
    grad_bn = _fake_batch_norm_relu_backward(grad_out, y, bn_weight, bn_bias, mean, invstd)[1:]
    return (_like(x) if input_grad else empty, _like(weight),
            y.new_empty(weight.shape[0]) if has_bias else empty, *grad_bn)


def _fake_double_conv(x, w1, b1, g1, be1, w2, b2, g2, be2, eps1, eps2, padding):
    out1, y1, *stats1 = _fake_conv_bn_relu(x, w1, b1, g1, be1, eps1, padding)
    out, y2, *stats2 = _fake_conv_bn_relu(out1, w2, b2, g2, be2, eps2, padding)
    return (out, y1, y2, *stats1, *stats2)


def _fake_double_conv_backward(grad_out, x, w1, has_b1, y1, g1, be1, mean1, invstd1, w2, has_b2,
                               y2, g2, be2, mean2, invstd2, padding, input_grad):
    layer2 = _fake_conv_bn_relu_backward(grad_out, y1, w2, has_b2, y2, g2, be2, mean2, invstd2,
                                         padding, True)
    layer1 = _fake_conv_bn_relu_backward(layer2[0], x, w1, has_b1, y1, g1, be1, mean1, invstd1,
                                         padding, input_grad)
    return [*layer1, *layer2[1:]]


# --- autograd ---

def _no_statistics_grads(ctx, output):
    """The statistics and conv outputs returned for backward take no gradient: keep autograd from
    materialising zero gradients for them (a full activation-sized fill each)."""
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _bn_setup(ctx, inputs, output):
    y, weight, bias = inputs[:3]
    ctx.save_for_backward(y, weight, bias, output[1], output[2])
    _no_statistics_grads(ctx, output)


def _bn_backward(ctx, grad_out, *_):
    if grad_out is None:
        return (None,) * 4
    y, weight, bias, mean, invstd = ctx.saved_tensors
    grad_y, grad_weight, grad_bias = torch.ops.unet_fast.batch_norm_relu_backward(
        grad_out, y, weight, bias, mean, invstd)
    return (grad_y, grad_weight if weight is not None else None,
            grad_bias if bias is not None else None, None)


def conv_bias_relu_setup(ctx, inputs, output):
    x, weight, bias, padding = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.has_bias, ctx.padding = bias is not None, padding


def conv_bias_relu_backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    grad_y = torch.ops.aten.threshold_backward(grad_out, out, 0)
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_y, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1],
        [ctx.padding] * 2, [1, 1], False, [0, 0], 1,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias])
    return grad_x, grad_w, grad_b, None


def _grads(ctx, grads, has_bias, offset):
    """Maps (grad_w, grad_b, grad_g, grad_beta) to inputs, None for absent bias or parameters."""
    grad_w, grad_b, grad_g, grad_beta = grads
    needs = ctx.needs_input_grad[offset:offset + 4]
    return (grad_w if needs[0] else None, grad_b if has_bias and needs[1] else None,
            grad_g if needs[2] else None, grad_beta if needs[3] else None)


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
        grad_out, x, weight, ctx.has_bias, y, bn_weight, bn_bias, mean, invstd, ctx.padding,
        ctx.needs_input_grad[0])
    return (grad_x if ctx.needs_input_grad[0] else None, *_grads(ctx, grads, ctx.has_bias, 1),
            None, None)


def _double_setup(ctx, inputs, output):
    x, w1, b1, g1, be1, w2, b2, g2, be2 = inputs[:9]
    out, y1, y2, mean1, invstd1, _, mean2, invstd2, _ = output
    ctx.save_for_backward(x, w1, y1, g1, be1, mean1, invstd1, w2, y2, g2, be2, mean2, invstd2)
    ctx.has_bias = (b1 is not None, b2 is not None)
    ctx.padding = inputs[-1]
    _no_statistics_grads(ctx, output)


def _double_backward(ctx, grad_out, *_):
    if grad_out is None:
        return (None,) * 12
    x, w1, y1, g1, be1, mean1, invstd1, w2, y2, g2, be2, mean2, invstd2 = ctx.saved_tensors
    grads = torch.ops.unet_fast.double_conv_backward(
        grad_out, x, w1, ctx.has_bias[0], y1, g1, be1, mean1, invstd1, w2, ctx.has_bias[1], y2,
        g2, be2, mean2, invstd2, ctx.padding, ctx.needs_input_grad[0])
    return (grads[0] if ctx.needs_input_grad[0] else None,
            *_grads(ctx, grads[1:5], ctx.has_bias[0], 1),
            *_grads(ctx, grads[5:9], ctx.has_bias[1], 5), None, None, None)


if _backend.EXTENSION_ERROR is None:
    _lib = "unet_fast::"
    torch.library.register_fake(_lib + "batch_norm_relu", _fake_batch_norm_relu)
    torch.library.register_fake(_lib + "batch_norm_relu_backward", _fake_batch_norm_relu_backward)
    torch.library.register_fake(_lib + "batch_norm_relu_apply", _fake_batch_norm_relu_apply)
    torch.library.register_fake(_lib + "conv_bias_relu", _fake_conv_bias_relu)
    torch.library.register_fake(_lib + "conv_bn_relu", _fake_conv_bn_relu)
    torch.library.register_fake(_lib + "conv_bn_relu_backward", _fake_conv_bn_relu_backward)
    torch.library.register_fake(_lib + "double_conv", _fake_double_conv)
    torch.library.register_fake(_lib + "double_conv_backward", _fake_double_conv_backward)
    torch.library.register_autograd(_lib + "batch_norm_relu", _bn_backward, setup_context=_bn_setup)
    torch.library.register_autograd(_lib + "conv_bias_relu", conv_bias_relu_backward,
                                    setup_context=conv_bias_relu_setup)
    torch.library.register_autograd(_lib + "conv_bn_relu", _conv_backward, setup_context=_conv_setup)
    torch.library.register_autograd(_lib + "double_conv", _double_backward,
                                    setup_context=_double_setup)
