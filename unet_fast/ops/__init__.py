"""The fused ops: validate inputs, then dispatch to the chosen backend's kernel."""

from .._common import fold
from .conv_bias_relu import conv_bias_relu, conv_bn_relu_frozen
from .conv_bias_relu import triton_kernels as _triton_conv_bias_relu
from .conv_bn_relu import batch_norm_relu, conv_bn_relu, double_conv
from .conv_bn_relu import triton_kernels as _triton_conv_bn_relu
from .conv_norm_act import conv_norm_act_chain
from .crop_concat import crop_concat
from .crop_concat import triton_kernels as _triton_crop_concat
from .norm_act import norm_act
from .norm_act import triton_kernels as _triton_norm_act
from .up_conv import up_conv

__all__ = [
    "batch_norm_relu",
    "conv_bias_relu",
    "conv_bn_relu",
    "conv_bn_relu_frozen",
    "conv_norm_act_chain",
    "crop_concat",
    "double_conv",
    "fold",
    "load_triton",
    "norm_act",
    "up_conv",
]


def load_triton() -> None:
    """Imports every Triton op now (registering them and their autograd) rather than on first
    use; set TRITON_INTERPRET=1 before, to run them on the CPU."""
    for load in (
        _triton_conv_bias_relu,
        _triton_conv_bn_relu,
        _triton_crop_concat,
        _triton_norm_act,
    ):
        load()
