"""FusedConvBNReLU and FusedDoubleConv: drop-in nn.Sequential(Conv2d, BatchNorm2d, ReLU[, ...]).

They *are* those Sequentials (same children, parameters, buffers and state_dict keys), with a
forward that runs the fused ops. Inference folds BatchNorm into the conv once and keeps the folded
weights until any conv/BN tensor changes (ops.conv_bn_relu_frozen, tracked by tensor versions), so
train -> eval -> train -> eval never uses stale weights.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import _backend, ops
from ..ops import recompute
from .recipe import RecipeConv2d
from .sync_batch_norm import sync_batch_norm_relu


def fusable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether a Conv2d -> BatchNorm2d pair has the form the fused ops compute."""
    return (
        type(conv) in (nn.Conv2d, RecipeConv2d)
        and type(bn) is nn.BatchNorm2d
        and conv.out_channels == bn.num_features
        and conv.groups == 1
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and conv.padding[0] == conv.padding[1]
    )


def recomputing() -> bool:
    """True while a forward runs again inside backward (activation checkpointing). A traced
    forward (torch.compile) is the real one."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def batch_norm_mode(bn: nn.BatchNorm2d):
    """(use batch statistics, running_mean, running_var, momentum factor), exactly as
    nn.BatchNorm2d.forward decides them (it also counts the batch in num_batches_tracked).

    A forward recomputed by activation checkpointing uses the same batch statistics but updates
    nothing, so checkpointed training keeps the running statistics of plain training."""
    if bn.training and recomputing():
        return True, None, None, 0.0
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return batch_stats, bn.running_mean if keep else None, bn.running_var if keep else None, factor


def conv_bn_relu_forward(x, conv, bn, backend, sync_group=None):
    """One Conv -> BN -> ReLU through the fused ops, as nn.Sequential(conv, bn, relu) would;
    with a sync_group (see convert_sync_batchnorm), training statistics span its processes."""
    batch_stats, running_mean, running_var, momentum = batch_norm_mode(bn)
    if sync_group is not None and bn.training and torch.distributed.is_initialized():
        y = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=conv.padding)
        return sync_batch_norm_relu(
            y, bn.weight, bn.bias, bn.eps, running_mean, running_var, momentum, sync_group
        )
    params = (conv.weight, conv.bias, bn.weight, bn.bias)
    if batch_stats or (
        torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
    ):
        # training, or eval that trains parameters: fold (if at all) per call
        return ops.conv_bn_relu(
            x,
            *params,
            running_mean,
            running_var,
            batch_stats,
            momentum,
            bn.eps,
            conv.padding[0],
            backend=backend,
        )
    return ops.conv_bn_relu_frozen(
        x, *params, running_mean, running_var, bn.eps, conv.padding[0], backend=backend
    )


def runs(modules) -> list:
    """Start indices of the Conv2d -> BatchNorm2d -> ReLU runs in a list of modules."""
    starts, i = [], 0
    while i + 2 < len(modules):
        if fusable(modules[i], modules[i + 1]) and type(modules[i + 2]) is nn.ReLU:
            starts.append(i)
            i += 3
        else:
            i += 1
    return starts


class FusedSequential(nn.Sequential):
    """Any nn.Sequential whose Conv2d -> BatchNorm2d -> ReLU runs go through the fused op; its
    other children run as they are. Children, indices and state_dict keys are unchanged."""

    def __init__(self, *modules: nn.Module, backend: str = "auto"):
        super().__init__(*modules)
        self.backend = backend
        self.fused_runs = runs(list(self))

    @classmethod
    def from_modules(cls, *modules: nn.Module, backend: str = "auto"):
        """Wraps existing modules (sharing their parameters) without copying."""
        module = cls.__new__(cls)
        FusedSequential.__init__(module, *modules, backend=backend)
        module.check()
        return module

    def check(self) -> None:
        """Subclasses that expect a fixed structure refuse anything else here."""

    def forward(self, x):
        if _backend.resolve(self.backend, x.device, "conv_bn_relu") == "reference":
            return super().forward(x)
        children, i = list(self), 0
        while i < len(children):
            if i in self.fused_runs:
                x = conv_bn_relu_forward(
                    x,
                    children[i],
                    children[i + 1],
                    self.backend,
                    getattr(self, "sync_group", None),
                )
                i += 3
            else:
                x = children[i](x)
                i += 1
        return x


class FusedConvBNReLU(FusedSequential):
    """Conv2d -> BatchNorm2d -> ReLU; state_dict keys 0.* (conv) and 1.* (BN)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        padding: int = 1,
        bias: bool = False,
        *,
        backend: str = "auto",
    ):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            backend=backend,
        )

    def check(self):
        if len(self) != 3 or self.fused_runs != [0]:
            raise ValueError(
                f"cannot fuse {list(self)}: needs a stride-1, ungrouped, zero-padded "
                "Conv2d feeding a BatchNorm2d of its width, then a ReLU"
            )


class FusedDoubleConv(FusedSequential):
    """(Conv2d -> BatchNorm2d -> ReLU) x 2, the tutorial's DoubleConv.double_conv; keys 0, 1, 3, 4.

    Training stores x and both conv outputs only; relu(bn(conv1(x))) is recomputed in backward.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        mid_channels: Optional[int] = None,
        padding: int = 1,
        bias: bool = False,
        *,
        backend: str = "auto",
    ):
        mid_channels = mid_channels or out_channels
        super().__init__(
            nn.Conv2d(in_channels, mid_channels, 3, padding=padding, bias=bias),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, 3, padding=padding, bias=bias),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            backend=backend,
        )

    def check(self):
        if len(self) != 6 or self.fused_runs != [0, 3] or self[0].padding != self[3].padding:
            raise ValueError(
                "cannot fuse: needs two stride-1, ungrouped, equally zero-padded "
                "Conv2d -> BatchNorm2d -> ReLU runs"
            )

    def forward(self, x):
        return self.forward_recipe(x)[0]

    def fused_training(self, x) -> bool:
        """Whether training runs the double-conv op (synchronised BatchNorm runs per layer)."""
        return (
            self[1].training
            and self[4].training
            and getattr(self, "sync_group", None) is None
            and _backend.resolve(self.backend, x.device, "conv_bn_relu") != "reference"
        )

    def training_layers(self):
        """((weight, bias, bn_weight, bn_bias, running_mean, running_var) of each layer, their
        momentum factors, their eps), as BatchNorm2d.forward decides them (counting the batch)."""
        layers, momenta = [], []
        for conv, bn in ((self[0], self[1]), (self[3], self[4])):
            _, running_mean, running_var, momentum = batch_norm_mode(bn)
            layers.append((conv.weight, conv.bias, bn.weight, bn.bias, running_mean, running_var))
            momenta.append(momentum)
        return layers, momenta, (self[1].eps, self[4].eps)

    def forward_recipe(self, x):
        """(output, recipe that recomputes it): see unet_fast.ops.recompute; the recipe is None
        outside fused training."""
        if not self.fused_training(x):
            return super().forward(x), None  # eval, or the reference
        (layer1, layer2), momenta, epsilons = self.training_layers()
        return ops.double_conv(
            x,
            *layer1,
            *layer2,
            True,
            *momenta,
            *epsilons,
            self[0].padding[0],
            backend=self.backend,
            return_recipe=True,
        )

    def forward_joined(self, skip, up, size, recipe=None):
        """self(crop_concat(skip, up, size)); given skip's recipe, training keeps that recipe and
        `up` for backward instead of the concatenated tensor."""
        if recipe is None or not self.fused_training(skip) or not torch.is_grad_enabled():
            return self(ops.crop_concat(skip, up, size, backend=self.backend))
        (layer1, layer2), momenta, epsilons = self.training_layers()
        return recompute.join_double_conv(
            skip, recipe, up, size, layer1, layer2, momenta, epsilons, self[0].padding[0]
        )


def convert_sync_batchnorm(model: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """Makes every fused Conv-BN-ReLU of `model` synchronise its BatchNorm statistics across
    `process_group` (default: all processes) in training, like
    torch.nn.SyncBatchNorm.convert_sync_batchnorm; returns the model."""
    converted = 0
    for module in model.modules():
        if isinstance(module, FusedSequential):
            module.sync_group = process_group if process_group is not None else dist.group.WORLD
            converted += 1
    if not converted:
        raise ValueError(f"{type(model).__name__} has no fused Conv-BN-ReLU to synchronise")
    return model
