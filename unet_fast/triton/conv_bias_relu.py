"""Triton eval convolution: relu(conv3x3(x) + bias) in one implicit-GEMM kernel, BatchNorm already
folded into weight and bias. Its autograd is registered in unet_fast/ops/conv_bias_relu.py."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch.library import triton_op

from .channelwise import check_dtype
from .conv3x3 import conv3x3

Tensor = torch.Tensor


@triton_op("unet_fast::conv_bias_relu_triton", mutates_args=())
def conv_bias_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int) -> Tensor:
    """relu(conv3x3(x) + bias), the ReLU in the kernel's epilogue."""
    return conv3x3(x, weight, bias, padding, None, relu=True)[0]


def conv_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int) -> Tensor:
    """The Triton backend's eval convolution: the implicit-GEMM kernel for 3x3 weights, ATen's
    convolution and ReLU for other sizes."""
    check_dtype(x)
    if weight.shape[2:] == (3, 3):
        return conv_bias_relu(x, weight, bias, padding)
    return F.relu(F.conv2d(x, weight, bias, padding=padding))
