"""fuse(model): run the Conv -> Norm -> Act Sequentials of any model through the fused ops."""

import importlib

from torch import nn

from .nn.conv_bn_relu import FusedConvBNReLU, FusedDoubleConv, FusedSequential, runs
from .nn.conv_norm_act import (
    FusedConvNormAct,
    describe,
    known_order,
    plain_sequential,
)
from .nn.recipe import read_recipes


class FuseReport:
    """What fuse() did: `fused` maps each replaced submodule's name to its fused runs, `left`
    each Sequential holding a convolution it left as it was to why, `leaner` each module given
    a class that keeps less for backward or runs it faster to what changes."""

    def __init__(self):
        self.fused, self.left, self.leaner = {}, {}, {}

    def __str__(self):
        lines = [f"fused {name}: {what}" for name, what in self.fused.items()]
        lines += [f"left  {name}: {why}" for name, why in self.left.items()]
        return "\n".join(lines + [f"lean  {name}: {what}" for name, what in self.leaner.items()])


# Modules that compute the same with a class that keeps less for backward or runs it faster:
# (module, class name) -> (where the class lives, what it changes). A class with `fits(module)`
# takes only the modules it accepts; each is imported only when such a module is there.
LEANER = {
    ("monai.networks.nets.basic_unet", "UpCat"): (
        "unet_fast.nn.upcat.LeanUpCat",
        "UpCat pads only where sizes differ (the zero replicate padding kept a copy)",
    ),
    ("torch.nn.modules.conv", "ConvTranspose2d"): (
        "unet_fast.nn.up_conv.UpConvTranspose2d",
        "stride = kernel: backward by two matrix products (ops.up_conv)",
    ),
    ("torch.nn.modules.conv", "ConvTranspose3d"): (
        "unet_fast.nn.up_conv.UpConvTranspose3d",
        "stride = kernel: backward by two matrix products (ops.up_conv)",
    ),
}


def _make_leaner(model: nn.Module, done: FuseReport, backend: str) -> None:
    for name, module in model.named_modules():
        found = LEANER.get((type(module).__module__, type(module).__qualname__))
        if found is not None:
            where, what = found
            module_name, class_name = where.rsplit(".", 1)
            leaner = getattr(importlib.import_module(module_name), class_name)
            if hasattr(leaner, "fits") and not leaner.fits(module):
                continue
            module.__class__ = leaner
            if hasattr(leaner, "backend"):
                module.backend = backend
            done.leaner[name] = what


def _fused(seq: nn.Module, backend: str):
    """(the most specific fused module for a Sequential or None, what it fuses or why not).

    Stride-1 Conv2d -> BatchNorm2d -> ReLU runs take the BN-ReLU ops (folded in eval, the double
    conv storing less for backward); other Conv -> Norm -> Act runs take ops.norm_act."""
    order = known_order(seq)
    if order is None and runs(list(seq)):
        for cls in (FusedDoubleConv, FusedConvBNReLU, FusedSequential):
            try:
                return cls.from_modules(*seq, backend=backend), "Conv2d -> BatchNorm2d -> ReLU"
            except ValueError:  # not that structure
                continue
    fused = FusedConvNormAct.from_module(seq, backend)
    if fused.runs:
        return fused, "; ".join(map(describe, fused.runs))
    return None, "; ".join(fused.left)


def fuse(model: nn.Module, *, backend: str = "auto", report: bool = False):
    """Replaces, in place, every nn.Sequential holding Conv -> Norm -> Act runs with a fused
    module wrapping the same children: parameters, buffers, names and state_dict keys are
    unchanged. Recognised: the tutorial's DoubleConv, Pytorch-UNet's, segmentation_models_pytorch's
    Conv2dReLU, nnU-Net's ConvDropoutNormReLU, StackedConvBlocks and residual blocks (BasicBlockD,
    BottleneckD), MONAI's Convolution (conv then ADN, in ResidualUnit too), TwoConv and DynUNet's
    UnetBasicBlock and UnetResBlock (residual blocks: both paths, the sum and its activation as
    written); 2-D and 3-D, BatchNorm / InstanceNorm / GroupNorm, ReLU / LeakyReLU / PReLU / none.
    Sequential subclasses count when they keep Sequential's forward; other modules with a
    forward of their own are left as written, but for those in LEANER (MONAI's UpCat, transposed
    convolutions whose stride is their kernel), given a subclass that computes the same and keeps
    less for backward or runs it faster.

    Returns the model, or (model, FuseReport) with report=True.
    """
    done, replaced = FuseReport(), {}
    for name, module in list(model.named_modules()):
        if any(name == f or name.startswith(f + ".") for f in done.fused):
            continue  # inside a module fused already (its runs include this one's)
        for child_name, child in list(module.named_children()):
            if not (plain_sequential(child) or known_order(child) is not None):
                continue
            path = f"{name}.{child_name}" if name else child_name
            if id(child) in replaced:  # one module under two names: one fused module too
                setattr(module, child_name, replaced[id(child)])
                continue
            fused, what = _fused(child, backend)
            if fused is None:
                if what:
                    done.left[path] = what
                continue
            fused.train(child.training)
            setattr(module, child_name, fused)
            replaced[id(child)] = fused
            done.fused[path] = what
    _make_leaner(model, done, backend)
    if any(isinstance(m, FusedConvNormAct) for m in model.modules()):
        read_recipes(model)  # its chains' outputs are kept by their recipes
    return (model, done) if report else model
