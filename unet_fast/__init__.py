"""unet_fast: fused U-Net kernels for PyTorch and a drop-in UNet."""
from . import ops, reference
from ._backend import backends
from .ops import crop_concat

__version__ = "0.1.0"
__all__ = ["backends", "crop_concat", "ops", "reference"]
