"""fuse(model): run the Conv2d -> BatchNorm2d -> ReLU Sequentials of any model through the fused ops."""

from torch import nn

from .nn.conv_bn_relu import FusedConvBNReLU, FusedDoubleConv, FusedSequential, runs


def _fused(seq: nn.Sequential, backend: str):
    """The most specific fused module for a Sequential, or None when it holds no Conv -> BN ->
    ReLU run (a double conv also stores less for backward)."""
    if not runs(list(seq)):
        return None
    for cls in (FusedDoubleConv, FusedConvBNReLU, FusedSequential):
        try:
            return cls.from_modules(*seq, backend=backend)
        except ValueError:  # not that structure
            continue


def fuse(model: nn.Module, *, backend: str = "auto", report: bool = False):
    """Replaces, in place, every nn.Sequential holding Conv2d -> BatchNorm2d -> ReLU runs (the
    tutorial's DoubleConv, Pytorch-UNet's, segmentation_models_pytorch's Conv2dReLU, ...) with a
    fused module wrapping the same children: parameters, buffers and state_dict keys are
    unchanged. A double conv becomes FusedDoubleConv (which also stores less for backward).
    Sequential subclasses count when they keep Sequential's forward (as Conv2dReLU does);
    convolutions that are strided, dilated, grouped or not zero-padded are left as they are.

    Returns the model, or (model, names of the replaced submodules) with report=True.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            plain = (
                isinstance(child, nn.Sequential) and type(child).forward is nn.Sequential.forward
            )
            if not plain or (fused := _fused(child, backend)) is None:
                continue
            fused.train(child.training)
            setattr(module, child_name, fused)
            replaced.append(f"{name}.{child_name}" if name else child_name)
    return (model, replaced) if report else model
