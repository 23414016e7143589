"""Triton kernels beside their launchers (backend="triton"), one module per op family:
conv_bn_relu (training BatchNorm + ReLU, double conv), conv_bias_relu (eval convolution),
crop_concat; channelwise and conv3x3 are the building blocks they share.

Importing a module decorates its kernels, compiling nothing: set TRITON_INTERPRET=1 *before*
importing it to run them on the CPU through Triton's interpreter (how the tests prove them
without a GPU). unet_fast.ops imports these lazily, on first use, and registers their autograd.
"""
