"""FusedConvNormAct: an nn.Sequential whose Conv -> Norm -> Act runs normalise and activate in
one op (ops.norm_act) after the convolution; the blocks of nnU-Net, MONAI and most U-Nets.

A run is a Conv2d/Conv3d (any stride, padding, dilation, groups: the module itself runs), then
BatchNorm, InstanceNorm or GroupNorm of its width, then ReLU, LeakyReLU or nothing, with Dropout
anywhere after the conv; a child that is a plain Sequential of norm, dropout and activation
(MONAI's ADN) counts as the run's tail. A run whose dropout is active (training with p > 0),
or whose norm follows the activation, runs as written. Children, names and state_dict keys are
the Sequential's own.
"""

from collections import OrderedDict
from typing import NamedTuple, Optional

from torch import nn

from .. import _backend, ops
from .conv_bn_relu import batch_norm_mode

CONVS = (nn.Conv2d, nn.Conv3d)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
NORMS = {
    nn.BatchNorm2d: "batch",
    nn.BatchNorm3d: "batch",
    nn.InstanceNorm2d: "instance",
    nn.InstanceNorm3d: "instance",
    nn.GroupNorm: "group",
}
ACTS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Identity: "identity"}


class Run(NamedTuple):
    start: int  # the conv's index among the children
    length: int  # children the run spans
    conv: nn.Module
    norm: nn.Module
    act: Optional[nn.Module]
    dropouts: tuple


def plain_sequential(module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


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
        elif kind in ACTS or kind is nn.PReLU:
            why = "before any norm" if norm is None else "is not fused yet"
            return None, f"{kind.__name__} {why}"
        else:
            break
    if norm is None:
        return None, "no BatchNorm, InstanceNorm or GroupNorm after it"
    if act is None:  # the run ends at the norm; later dropouts are not part of it
        return norm, None, tuple(d for d in dropouts[: used - 1]), used
    return norm, act, tuple(dropouts), len(dropouts) + 2


def find_runs(children) -> tuple:
    """(runs, reasons): the fusable runs, and why each other conv was left as it is."""
    runs, reasons, i = [], [], 0
    while i < len(children):
        conv = children[i]
        if type(conv) not in CONVS:
            i += 1
            continue
        rest, nested = children[i + 1 :], False
        if (
            rest
            and plain_sequential(rest[0])
            and all(
                type(m) in NORMS or type(m) in ACTS or type(m) in (*DROPOUTS, nn.PReLU)
                for m in rest[0]
            )
        ):
            rest, nested = list(rest[0]), True  # MONAI's Convolution: conv, then ADN
        found = tail(rest)
        if found[0] is None:
            reasons.append(f"child {i} ({type(conv).__name__}): {found[1]}")
            i += 1
            continue
        norm, act, dropouts, used = found
        channels = norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.num_features
        dims = 3 if isinstance(conv, nn.Conv3d) else 2
        if channels != conv.out_channels or (
            not isinstance(norm, nn.GroupNorm) and f"{dims}d" not in type(norm).__name__
        ):
            reasons.append(f"child {i}: {type(norm).__name__} does not match {conv}")
            i += 1
            continue
        if nested and used != len(rest):
            reasons.append(f"child {i}: its norm/activation block holds more than one run")
            i += 1
            continue
        length = 2 if nested else 1 + used
        runs.append(Run(i, length, conv, norm, act, dropouts))
        i += length
    return runs, reasons


def norm_act_forward(y, norm, act, backend):
    """norm then act on the conv output y through ops.norm_act, as the modules compute it."""
    kind = NORMS[type(norm)]
    groups, running_mean, running_var = None, None, None
    if kind == "batch":
        batch_stats, running_mean, running_var, momentum = batch_norm_mode(norm)
    elif kind == "instance":
        batch_stats = norm.training or not norm.track_running_stats
        if norm.track_running_stats:
            running_mean, running_var = norm.running_mean, norm.running_var
        momentum = 0.0 if norm.momentum is None else norm.momentum
    else:
        batch_stats, groups, momentum = True, norm.num_groups, 0.0
    name = ACTS[type(act)] if act is not None else "identity"
    slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else 0.0
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
        backend=backend,
    )


class FusedConvNormAct(nn.Sequential):
    """A Sequential whose Conv -> Norm -> Act runs go through ops.norm_act; other children run
    as they are."""

    def __init__(self, modules: "OrderedDict[str, nn.Module]", *, backend: str = "auto"):
        super().__init__(modules)
        self.backend = backend
        self.runs, self.left = find_runs(list(self))

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, backend: str = "auto"):
        """Wraps seq's children (sharing parameters, keeping their names)."""
        module = cls(OrderedDict(seq.named_children()), backend=backend)
        module.train(seq.training)
        return module

    def forward(self, x):
        if _backend.resolve(self.backend, x.device, "norm_act") == "reference":
            return super().forward(x)
        children, starts, i = list(self), {run.start: run for run in self.runs}, 0
        while i < len(children):
            run = starts.get(i)
            if run is None or any(d.training and d.p > 0 for d in run.dropouts):
                x = children[i](x)  # not a run, or dropout in play: as written
                i += 1
                continue
            x = norm_act_forward(run.conv(x), run.norm, run.act, self.backend)
            i += run.length
        return x


def describe(run: Run) -> str:
    parts = [run.conv, *run.dropouts, run.norm] + ([run.act] if run.act is not None else [])
    return " -> ".join(type(m).__name__ for m in parts)
