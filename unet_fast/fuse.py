"""fuse(model): swap Conv2d -> BatchNorm2d -> ReLU Sequentials of any model for the fused modules."""
from torch import nn

from .nn.conv_bn_relu import FusedConvBNReLU, FusedDoubleConv, fusable


def _runs(seq: nn.Sequential):
    """The Sequential's children as (conv, bn, relu) triples, or None if it is anything else."""
    children = list(seq)
    if len(children) not in (3, 6):
        return None
    triples = [children[i:i + 3] for i in range(0, len(children), 3)]
    for conv, bn, relu in triples:
        if not (fusable(conv, bn) and type(relu) is nn.ReLU):
            return None
    return triples


def fuse(model: nn.Module, *, backend: str = "auto", report: bool = False):
    """Replaces, in place, every nn.Sequential that is exactly Conv2d -> BatchNorm2d -> ReLU (or two
    such runs, a double conv) with FusedConvBNReLU / FusedDoubleConv wrapping the same modules, so
    parameters, buffers and state_dict keys are unchanged. Everything else is left as it is.

    Returns the model, or (model, names of the replaced submodules) with report=True.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Sequential or (triples := _runs(child)) is None:
                continue
            modules = [m for triple in triples for m in triple]
            if len(triples) == 1:
                fused = FusedConvBNReLU.from_modules(*modules, backend=backend)
            elif triples[0][0].padding == triples[1][0].padding:
                fused = FusedDoubleConv.from_modules(*modules, backend=backend)
            else:
                continue
            fused.train(child.training)
            setattr(module, child_name, fused)
            replaced.append(f"{name}.{child_name}" if name else child_name)
    return (model, replaced) if report else model
