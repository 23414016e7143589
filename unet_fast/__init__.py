"""unet_fast: fused U-Net kernels for PyTorch and a drop-in UNet."""

from . import nn, ops, reference
from ._backend import backends, cpu_cache_info, empty_cache
from .fuse import fuse
from .models.checkpoints import from_pytorch_unet
from .models.memory import estimate_memory, visualize_activations
from .models.unet import UNet
from .models.variants import AttentionUNet, ResUNet, UNetPlusPlus
from .ops import conv_bn_relu, crop_concat, double_conv

__version__ = "0.1.0"
__all__ = [
    "AttentionUNet",
    "ResUNet",
    "UNet",
    "UNetPlusPlus",
    "backends",
    "cpu_cache_info",
    "empty_cache",
    "estimate_memory",
    "from_pytorch_unet",
    "fuse",
    "conv_bn_relu",
    "crop_concat",
    "double_conv",
    "nn",
    "ops",
    "reference",
    "visualize_activations",
]
