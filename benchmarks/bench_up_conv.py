"""up_conv forward + backward vs ATen's transposed convolution (stride = kernel), channels-last,
at the tutorial UNet's four upsamplings (2x2, 2x3x256^2 input) and nnU-Net 3D's (2x2x2).

pytest benchmarks/bench_up_conv.py --benchmark-only
"""

import pytest
import torch
from bench_conv_bn_relu import DEVICES, synchronized

from unet_fast import ops, reference

# (N, C_in, *spatial) of the input, C_out, kernel
CASES = {
    "unet-128->64-128^2": ((2, 128, 128, 128), 64, (2, 2)),
    "unet-256->128-64^2": ((2, 256, 64, 64), 128, (2, 2)),
    "unet-512->256-32^2": ((2, 512, 32, 32), 256, (2, 2)),
    "unet-1024->512-16^2": ((2, 1024, 16, 16), 512, (2, 2)),
    "nnunet-64->32-32^3": ((2, 64, 32, 32, 32), 32, (2, 2, 2)),
}


def make(case, device):
    shape, c_out, kernel = CASES[case]
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape, device=device).contiguous(memory_format=fmt).requires_grad_()
    weight = torch.randn(shape[1], c_out, *kernel, device=device)
    weight = weight.contiguous(memory_format=fmt).requires_grad_()
    bias = torch.randn(c_out, device=device, requires_grad=True)
    grad = torch.randn_like(reference.up_conv(x, weight, bias))
    return x, weight, bias, grad


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_up_conv_forward_backward(benchmark, case, impl, device, layout="nhwc"):
    benchmark.group = f"up_conv fwd+bwd {device} {case}"
    x, weight, bias, grad = make(case, device)
    fn = ops.up_conv if impl == "fused" else reference.up_conv

    def step():
        torch.autograd.grad(fn(x, weight, bias), (x, weight, bias), grad)

    benchmark(synchronized(step, device))
