"""FusedConvNormAct: an nn.Sequential whose Conv -> Norm -> Act runs normalise and activate in
one op (ops.norm_act) after the convolution; the blocks of nnU-Net, MONAI and most U-Nets. A
run is a Conv2d/Conv3d (any stride, padding, dilation, groups), then BatchNorm, InstanceNorm or
GroupNorm of its width, then ReLU, LeakyReLU, PReLU (its weight trained through the kernels) or
nothing, with Dropout anywhere after the conv. Runs are found among the Sequential's leaves:
children that are plain Sequentials (MONAI's Convolution and its ADN, TwoConv) or nnU-Net's
ConvDropoutNormReLU (whose forward runs its all_modules) are looked into; a residual block of
KNOWN_ORDER has its two paths' runs. Consecutive runs trained with batch statistics form a
chain (ops.conv_norm_act_chain) that keeps each conv output and rebuilds the activations
between them in backward. A run whose dropout is active (training with p > 0) runs as written,
and so does anything else. Children, names and state_dict keys are the Sequential's own.
"""

from collections import OrderedDict
from typing import NamedTuple, Optional

import torch
from torch import nn

from .. import _backend, ops
from ..ops.conv_norm_act import Layer, conv_norm_act_chain
from .conv_bn_relu import batch_norm_mode
from .recipe import RecipeConv2d, RecipeConv3d

CONVS = (nn.Conv2d, nn.Conv3d, RecipeConv2d, RecipeConv3d)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
NORMS = {
    nn.BatchNorm2d: "batch",
    nn.BatchNorm3d: "batch",
    nn.InstanceNorm2d: "instance",
    nn.InstanceNorm3d: "instance",
    nn.GroupNorm: "group",
}
ACTS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.PReLU: "prelu", nn.Identity: "identity"}


class Run(NamedTuple):
    start: int  # the conv's index among the leaves
    length: int  # leaves the run spans
    conv: nn.Module
    norm: nn.Module
    act: Optional[nn.Module]
    dropouts: tuple


def plain_sequential(module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def qualname(module) -> str:
    kind = type(module)
    return f"{kind.__module__}.{kind.__qualname__}"


# Modules whose forward is `return self.all_modules(x)` (a plain Sequential).
RUNS_ALL_MODULES = (
    "dynamic_network_architectures.building_blocks.simple_conv_blocks.ConvDropoutNormReLU",
)


class Residual(NamedTuple):
    """A block whose forward is `act(main(x) + shortcut(x))`, each path its children called in
    order; the shortcut is x itself when the block has none of its children, the act nothing
    when it is not a child. Blocks with a true attribute named in `unless` do more: left."""

    main: tuple
    shortcut: tuple
    act: str
    unless: tuple = ()


NNUNET_RESIDUAL = "dynamic_network_architectures.building_blocks.residual."
EXTRAS = ("apply_stochastic_depth", "apply_se")  # DropPath, squeeze-excitation: not fused
# Modules whose forward calls their children in this order, nothing else (MONAI's DynUNet
# blocks; UnetResBlock has conv3 and norm3 only when its shortcut changes the shape; nnU-Net's
# residual blocks' skip is a pooling and a 1x1 conv, or the identity).
KNOWN_ORDER = {
    NNUNET_RESIDUAL + "BasicBlockD": Residual(("conv1", "conv2"), ("skip",), "nonlin2", EXTRAS),
    NNUNET_RESIDUAL + "BottleneckD": Residual(
        ("conv1", "conv2", "conv3"), ("skip",), "nonlin3", EXTRAS
    ),
    "monai.networks.blocks.dynunet_block.UnetBasicBlock": (
        "conv1",
        "norm1",
        "lrelu",
        "conv2",
        "norm2",
        "lrelu",
    ),
    "monai.networks.blocks.dynunet_block.UnetResBlock": Residual(
        ("conv1", "norm1", "lrelu", "conv2", "norm2"), ("conv3", "norm3"), "lrelu"
    ),
}


def known_order(module: nn.Module):
    """The KNOWN_ORDER entry that describes `module`'s forward, or None."""
    order = KNOWN_ORDER.get(qualname(module))
    if isinstance(order, Residual) and any(getattr(module, a, False) for a in order.unless):
        return None
    return order


def leaves(seq: nn.Module, order=None) -> list:
    """The modules a Sequential's forward (or a KNOWN_ORDER module's path) calls in order,
    looking into children that are plain Sequentials or modules of RUNS_ALL_MODULES."""
    found = []
    named = None if order is None else [seq._modules[n] for n in order if n in seq._modules]
    for child in seq if named is None else named:
        if qualname(child) in RUNS_ALL_MODULES:
            found += leaves(child.all_modules)
        elif plain_sequential(child):
            found += leaves(child)
        else:
            found.append(child)
    return found


def tail(modules) -> tuple:
    """(norm, act or None, dropouts, how many modules they span) of the run after a conv, or
    (None, why not)."""
    norm, act, dropouts, used = None, None, [], 0
    for module in modules:
        kind = type(module)
        if kind in DROPOUTS:
            dropouts.append(module)
        elif kind in NORMS and norm is None:
            norm, used = module, len(dropouts) + 1
        elif kind in ACTS and norm is not None:
            act = module
            break
        elif kind in ACTS:
            return None, f"{kind.__name__} before any norm"
        else:
            break
    if norm is None:
        return None, "no BatchNorm, InstanceNorm or GroupNorm after it"
    if act is None:  # the run ends at the norm; later dropouts are not part of it
        return norm, None, tuple(d for d in dropouts[: used - 1]), used
    return norm, act, tuple(dropouts), len(dropouts) + 2


def find_runs(children) -> tuple:
    """(runs, reasons): the fusable runs among a list of leaves, and why each other conv was
    left as it is."""
    runs, reasons, i = [], [], 0
    while i < len(children):
        conv = children[i]
        if type(conv) not in CONVS:
            i += 1
            continue
        found = tail(children[i + 1 :])
        if found[0] is None:
            reasons.append(f"{type(conv).__name__} {i}: {found[1]}")
            i += 1
            continue
        norm, act, dropouts, used = found
        channels = norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.num_features
        dims = 3 if isinstance(conv, nn.Conv3d) else 2
        if channels != conv.out_channels or (
            not isinstance(norm, nn.GroupNorm) and f"{dims}d" not in type(norm).__name__
        ):
            reasons.append(f"{type(conv).__name__} {i}: {type(norm).__name__} does not match it")
            i += 1
            continue
        length = 1 + used
        runs.append(Run(i, length, conv, norm, act, dropouts))
        i += length
    return runs, reasons


def norm_mode(norm) -> tuple:
    """(kind, GroupNorm's groups, batch statistics?, running_mean, running_var, momentum) as the
    norm module's forward decides them (BatchNorm also counts the batch)."""
    kind = NORMS[type(norm)]
    if kind == "batch":
        batch_stats, running_mean, running_var, momentum = batch_norm_mode(norm)
        return kind, None, batch_stats, running_mean, running_var, momentum
    if kind == "instance":
        tracking = norm.track_running_stats
        momentum = 0.0 if norm.momentum is None else norm.momentum
        stats = (norm.running_mean, norm.running_var) if tracking else (None, None)
        return kind, None, norm.training or not tracking, *stats, momentum
    return kind, norm.num_groups, True, None, None, 0.0


def activation(act) -> tuple:
    """(name, negative slope, PReLU's weight) of the activation (None: identity)."""
    name = ACTS[type(act)] if type(act) in ACTS else "identity"
    slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else 0.0
    return name, slope, act.weight if isinstance(act, nn.PReLU) else None


def hooked(module: nn.Module) -> bool:
    """Whether forward hooks (the module's or global ones) may have kept its output."""
    return bool(module._forward_hooks or nn.modules.module._global_forward_hooks)


def norm_act_forward(y, norm, act, backend, inplace=False):
    """norm then act on the conv output y through ops.norm_act, as the modules compute it."""
    kind, groups, batch_stats, running_mean, running_var, momentum = norm_mode(norm)
    name, slope, act_weight = activation(act)
    return ops.norm_act(
        y,
        kind,
        norm.weight,
        norm.bias,
        running_mean,
        running_var,
        batch_stats,
        momentum,
        norm.eps,
        name,
        slope,
        groups=groups,
        act_weight=act_weight,
        inplace=inplace and batch_stats,  # (with running statistics the reference runs)
        backend=backend,
    )


def layer_forward(y, layer: Layer, backend):
    """A chain layer's norm then act on its conv output y (batch statistics)."""
    return ops.norm_act(
        y,
        layer.norm,
        layer.norm_weight,
        layer.norm_bias,
        layer.running_mean,
        layer.running_var,
        True,
        layer.momentum,
        layer.eps,
        layer.act,
        layer.negative_slope,
        groups=layer.groups,
        act_weight=layer.act_weight,
        backend=backend,
    )


def chain_layer(run: Run) -> Optional[Layer]:
    """The run as one layer of ops.conv_norm_act_chain, or None when it cannot be one (running
    statistics in use, a padding mode or string padding the op does not take). Decides the
    norm's mode, so call it once per forward (a training BatchNorm counts the batch)."""
    conv = run.conv
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    kind, groups, batch_stats, running_mean, running_var, momentum = norm_mode(run.norm)
    if not batch_stats:
        return None
    return Layer(
        conv.weight,
        conv.bias,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        kind,
        groups,
        run.norm.weight,
        run.norm.bias,
        running_mean,
        running_var,
        momentum,
        run.norm.eps,
        *activation(run.act),
    )


class FusedConvNormAct(nn.Sequential):
    """A Sequential (or a KNOWN_ORDER block) whose Conv -> Norm -> Act runs go through
    ops.norm_act; other children run as they are."""

    def __init__(
        self, modules: "OrderedDict[str, nn.Module]", *, backend: str = "auto", order=None
    ):
        super().__init__(modules)
        self.backend = backend
        # the modules each path of forward calls (KNOWN_ORDER's order for such a block) and
        # their runs, found once (the runs hold these modules already), not on every forward
        orders = list(order[:2]) if isinstance(order, Residual) else [order]
        self.after = order.act if isinstance(order, Residual) else None  # a child's name
        self.paths, self.runs, self.left = [], [], []
        for path_order in orders:
            calls = leaves(self, path_order)
            runs, left = find_runs(calls)
            self.paths.append((calls, {run.start: run for run in runs}))
            self.runs += runs
            self.left += left

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto"):
        """Wraps a plain Sequential's or a KNOWN_ORDER module's children (sharing parameters,
        keeping their names)."""
        order = known_order(module)
        fused = cls(OrderedDict(module.named_children()), backend=backend, order=order)
        fused.train(module.training)
        return fused

    def forward(self, x):
        out = self.run_path(x, *self.paths[0])
        if self.after is None:
            return out
        out = out + self.run_path(x, *self.paths[1])
        return self._modules[self.after](out) if self.after in self._modules else out

    def run_path(self, x, modules: list, starts: dict):
        if _backend.resolve(self.backend, x.device, "norm_act") == "reference":
            for module in modules:
                x = module(x)
            return x
        i = 0
        while i < len(modules):
            run = starts.get(i)
            if run is None or any(d.training and d.p > 0 for d in run.dropouts):
                x = modules[i](x)  # not a run, or dropout in play: as written
                i += 1
                continue
            # under autocast the layers run one by one (the chain's backward is float32-typed)
            chainable = torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
            chain = self.chain_from(run, starts) if chainable else []
            if len(chain) > 1:
                x = conv_norm_act_chain(x, [layer for layer, _ in chain], backend=self.backend)
            elif chain:  # its norm mode is decided (and a BatchNorm's batch counted) already
                x = layer_forward(run.conv(x), chain[0][0], self.backend)
            else:
                y = run.conv(x)
                # without autograd, the conv output nobody else sees is overwritten in place
                inplace = not (torch.is_grad_enabled() and y.requires_grad) and not hooked(run.conv)
                x = norm_act_forward(y, run.norm, run.act, self.backend, inplace)
            last = chain[-1][1] if chain else run
            i = last.start + last.length
        return x

    @staticmethod
    def chain_from(run: Run, starts: dict) -> list:
        """[(layer, run)] of the consecutive runs from `run` that can train as one chain."""
        chain = []
        while run is not None and not any(d.training and d.p > 0 for d in run.dropouts):
            layer = chain_layer(run)
            if layer is None:
                break
            chain.append((layer, run))
            run = starts.get(run.start + run.length)
        return chain


def describe(run: Run) -> str:
    parts = [run.conv, *run.dropouts, run.norm] + ([run.act] if run.act is not None else [])
    return " -> ".join(type(m).__name__ for m in parts)
