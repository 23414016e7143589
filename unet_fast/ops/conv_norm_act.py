"""conv_norm_act_chain: Conv -> Norm -> Act layers in a row (nnU-Net's stacked convolutions,
MONAI's TwoConv, a double conv with InstanceNorm), trained keeping less for backward.

Each layer's convolution (any stride, padding, dilation, groups; 2-D or 3-D) runs through ATen
and its norm + activation through norm_act's kernels. Saved for backward: the chain's input and
each layer's conv output y with its statistics; a layer's input, the previous layer's
activation, is rebuilt from that recipe in backward (norm_act_apply, the forward's arithmetic)
instead of being kept, as double_conv does for BatchNorm + ReLU. A chain's output carries its
recipe too: a chain that consumes it unchanged (nnU-Net's next encoder stage, whose strided
conv reads the previous stage's output) keeps the recipe, already kept by the chain before it,
instead of its input.
"""

from typing import NamedTuple, Optional, Sequence

import torch

from .. import _backend
from .norm_act import (
    check_act_weight,
    check_norm_act,
    kernel_arguments,
    kernels_for,
    triton_kernels,
    update_norm_stats,
)
from .up_conv import kernel_runs as up_conv_kernel_runs
from .up_conv import non_overlapping

aten = torch.ops.aten


class Layer(NamedTuple):
    """One Conv -> Norm -> Act layer, as its modules hold it."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    stride: Sequence[int]
    padding: Sequence[int]
    dilation: Sequence[int]
    conv_groups: int
    norm: str  # "batch" | "instance" | "group"
    groups: Optional[int]  # GroupNorm's
    norm_weight: Optional[torch.Tensor]
    norm_bias: Optional[torch.Tensor]
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    momentum: float
    eps: float
    act: str  # "relu" | "leaky_relu" | "prelu" | "identity"
    negative_slope: float
    act_weight: Optional[torch.Tensor] = None  # PReLU's


class Recipe(NamedTuple):
    """How to rebuild a chain's output: its last layer's conv output and statistics."""

    y: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor
    layer: Layer
    apply: object  # the backend's norm_act_apply, which made the output
    version: int  # the output's version when made: an in-place change voids the recipe


def _rebuild(recipe_layer, y, mean, invstd, norm_act_apply):
    """A layer's activation from its conv output and statistics (the forward's arithmetic)."""
    groups, slope = kernel_arguments(
        y, recipe_layer.norm, recipe_layer.groups, recipe_layer.act, recipe_layer.negative_slope
    )
    return norm_act_apply(
        y,
        groups,
        recipe_layer.norm_weight,
        recipe_layer.norm_bias,
        mean,
        invstd,
        recipe_layer.act,
        slope,
        recipe_layer.act_weight,
    )


class ConvOp(NamedTuple):
    """A convolution (or transposed one) whose backward reads its input."""

    stride: Sequence[int]
    padding: Sequence[int]
    dilation: Sequence[int]
    transposed: bool
    output_padding: Sequence[int]
    groups: int

    def forward(self, x, weight, bias):
        return aten.convolution(x, weight, bias, *self), ()

    def backward(self, grad, x, params, extra, needs):
        weight, bias = params
        mask = [needs[0], needs[1], bias is not None and needs[2]]
        up_conv = self.transposed and non_overlapping(
            weight.shape[2:],
            self.stride,
            self.padding,
            self.dilation,
            self.output_padding,
            self.groups,
        )
        if up_conv and up_conv_kernel_runs(x.device):
            grads = torch.ops.unet_fast.up_conv_backward(grad, x, weight, mask)
            grads = [g if wanted else None for g, wanted in zip(grads, mask, strict=True)]
        else:
            sizes = None if bias is None else [bias.shape[0]]
            grads = aten.convolution_backward(grad, x, weight, sizes, *self, mask)
        return grads[0], grads[1:]


def _conv_op(layer: Layer, dims: int) -> ConvOp:
    return ConvOp(layer.stride, layer.padding, layer.dilation, False, [0] * dims, layer.conv_groups)


class _Chain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layers, kernels, recipe, *params):
        norm_act, _, _ = kernels
        h, ys, stats, returned = x, [], [], []
        for layer in layers:
            y, _ = _conv_op(layer, h.dim() - 2).forward(h, layer.weight, layer.bias)
            check_norm_act(
                y,
                layer.norm,
                layer.groups,
                layer.norm_weight,
                layer.norm_bias,
                layer.running_mean,
                layer.running_var,
                layer.act,
                True,
            )
            check_act_weight("conv_norm_act_chain", y, layer.act, layer.act_weight)
            groups, slope = kernel_arguments(
                y, layer.norm, layer.groups, layer.act, layer.negative_slope
            )
            h, mean, invstd, var = norm_act(
                y,
                groups,
                layer.norm_weight,
                layer.norm_bias,
                layer.eps,
                layer.act,
                slope,
                layer.act_weight,
            )
            ys.append(y)
            stats += [mean, invstd]
            returned += [mean, var]
        # the input, or the recipe it is made from (tensors the chain before keeps already)
        source = [x] if recipe is None else [recipe.y, recipe.mean, recipe.invstd]
        ctx.save_for_backward(*source, *ys, *stats, *params)
        ctx.layers, ctx.kernels = layers, kernels
        ctx.recipe = None if recipe is None else (recipe.layer, recipe.apply)
        returned += [ys[-1], stats[-1]]  # the output's own recipe: last conv output, 1/std
        ctx.mark_non_differentiable(*returned)
        ctx.set_materialize_grads(False)
        return (h, *returned)

    @staticmethod
    def backward(ctx, grad, *_):
        layers, (_, norm_act_backward, norm_act_apply) = ctx.layers, ctx.kernels
        n = len(layers)
        saved = ctx.saved_tensors
        if ctx.recipe is None:
            x, saved = saved[0], saved[1:]
        else:  # the input was not kept: rebuilt from the previous chain's recipe
            recipe_layer, recipe_apply = ctx.recipe
            x = _rebuild(recipe_layer, *saved[:3], recipe_apply)
            saved = saved[3:]
        ys, stats = saved[:n], saved[n : 3 * n]
        param_grads = [None] * (5 * n)
        if grad is None:
            return (None, None, None, None, *param_grads)
        for i in reversed(range(n)):
            layer, y, mean, invstd = layers[i], ys[i], stats[2 * i], stats[2 * i + 1]
            groups, slope = kernel_arguments(
                y, layer.norm, layer.groups, layer.act, layer.negative_slope
            )
            grad_y, grad_g, grad_b, grad_a = norm_act_backward(
                grad,
                y,
                groups,
                layer.norm_weight,
                layer.norm_bias,
                mean,
                invstd,
                layer.act,
                slope,
                layer.act_weight,
            )
            if i:  # the layer's input: the previous activation, rebuilt from its recipe
                h = _rebuild(
                    layers[i - 1], ys[i - 1], stats[2 * i - 2], stats[2 * i - 1], norm_act_apply
                )
            else:
                h = x
            needs = (i > 0 or ctx.needs_input_grad[0], True, True)
            grad, (grad_w, grad_cb) = _conv_op(layer, y.dim() - 2).backward(
                grad_y, h, (layer.weight, layer.bias), (), needs
            )
            param_grads[5 * i : 5 * i + 5] = [
                grad_w,
                grad_cb,
                grad_g if layer.norm_weight is not None else None,
                grad_b if layer.norm_bias is not None else None,
                grad_a if layer.act_weight is not None else None,
            ]
        return (grad, None, None, None, *param_grads)


def recipe_of(x: torch.Tensor) -> Optional[Recipe]:
    """The recipe `x` carries as a chain's output, unless changed in place since (or compiled:
    tensor attributes are eager's business)."""
    if torch.compiler.is_compiling():
        return None
    recipe = getattr(x, "_unet_fast_recipe", None)
    return recipe if recipe is not None and recipe.version == x._version else None


class MaxPoolOp(NamedTuple):
    """A max pooling: its backward reads its input and the indices of the maxima."""

    kernel_size: Sequence[int]
    stride: Sequence[int]
    padding: Sequence[int]
    dilation: Sequence[int]
    ceil_mode: bool

    def forward(self, x):
        pool = aten.max_pool3d_with_indices if x.dim() == 5 else aten.max_pool2d_with_indices
        out, indices = pool(x, *self)
        return out, (indices,)

    def backward(self, grad, x, params, extra, needs):
        backward = (
            aten.max_pool3d_with_indices_backward
            if x.dim() == 5
            else aten.max_pool2d_with_indices_backward
        )
        return backward(grad, x, *self, extra[0]), ()


class _FromRecipe(torch.autograd.Function):
    """op(x) keeping, for backward, the recipe x is rebuilt from instead of x."""

    @staticmethod
    def forward(ctx, x, recipe, op, *params):
        out, extra = op.forward(x, *params)
        ctx.save_for_backward(recipe.y, recipe.mean, recipe.invstd, *params, *extra)
        ctx.recipe, ctx.op, ctx.params = (recipe.layer, recipe.apply), op, len(params)
        return out

    @staticmethod
    def backward(ctx, grad):
        y, mean, invstd, *rest = ctx.saved_tensors
        params, extra = rest[: ctx.params], rest[ctx.params :]
        x = _rebuild(ctx.recipe[0], y, mean, invstd, ctx.recipe[1])
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:])
        grad_x, grad_params = ctx.op.backward(grad, x, params, extra, needs)
        return (grad_x, None, None, *grad_params)


def from_recipe(op, x: torch.Tensor, recipe: Recipe, *params) -> torch.Tensor:
    """op(x) (a ConvOp with its weight and bias, or a MaxPoolOp) for a chain's output x, keeping
    x's recipe (tensors the chain keeps already) for backward instead of x."""
    return _FromRecipe.apply(x, recipe, op, *params)


def conv_norm_act_chain(x, layers: Sequence[Layer], *, backend: str = "auto"):
    """The layers one after the other, each with batch statistics (training; GroupNorm; an
    InstanceNorm that tracks no running statistics), updating running statistics as the
    modules do. Bitwise the same arithmetic as norm_act layer by layer."""
    layers = tuple(layers)
    chosen = _backend.resolve(backend, x.device, "norm_act")
    if chosen not in ("cpu", "cuda", "triton"):
        raise ValueError(f"conv_norm_act_chain runs the norm_act kernels, not {chosen!r}")
    if chosen == "triton":
        triton_kernels().check_dtype(x)
    params = [
        t
        for layer in layers
        for t in (layer.weight, layer.bias, layer.norm_weight, layer.norm_bias, layer.act_weight)
    ]
    kernels = kernels_for(chosen)
    out, *returned, last_y, last_invstd = _Chain.apply(x, layers, kernels, recipe_of(x), *params)
    if not torch.compiler.is_compiling():
        out._unet_fast_recipe = Recipe(
            last_y, returned[-2], last_invstd, layers[-1], kernels[2], out._version
        )
    for layer, mean, var in zip(layers, returned[::2], returned[1::2], strict=True):
        # an empty batch leaves the running statistics as they are (only zero is looked at)
        update_norm_stats(
            layer.norm, layer.running_mean, layer.running_var, mean, var, layer.momentum, x.numel()
        )
    return out
