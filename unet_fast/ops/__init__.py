"""The fused ops: validate inputs, then dispatch to the chosen backend's kernel."""
from .conv_bn_relu import batch_norm_relu, conv_bias_relu, conv_bn_relu, double_conv, fold
from .crop_concat import crop_concat

__all__ = ["batch_norm_relu", "conv_bias_relu", "conv_bn_relu", "crop_concat", "double_conv", "fold"]
