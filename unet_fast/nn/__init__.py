"""Modules over the fused ops, state_dict-compatible with the plain modules they replace."""

from .conv_bn_relu import (
    FusedConvBNReLU,
    FusedDoubleConv,
    FusedSequential,
    convert_sync_batchnorm,
    fusable,
)
from .conv_norm_act import FusedConvNormAct
from .crop_concat import CropConcat

__all__ = [
    "CropConcat",
    "FusedConvBNReLU",
    "FusedConvNormAct",
    "FusedDoubleConv",
    "FusedSequential",
    "convert_sync_batchnorm",
    "fusable",
]
