"""Norm + activation, forward and backward: unet_fast.ops.norm_act against the functional ops it
replaces (F.instance_norm / F.group_norm / F.batch_norm, then F.leaky_relu), channels-first and
channels-last. The nnU-Net case is InstanceNorm + LeakyReLU(0.01) on 2x64x64^3.

pytest benchmarks/bench_norm_act.py --benchmark-only
python benchmarks/interleaved.py   (the ratios, interleaved)
"""

import pytest
import torch
import torch.nn.functional as F

from unet_fast import ops
from unet_fast.bench import saved_bytes

# name -> (shape, norm, groups)
CASES = {
    "instance 2x64x64^3": ((2, 64, 64, 64, 64), "instance", None),
    "group8 2x64x64^3": ((2, 64, 64, 64, 64), "group", 8),
    "batch 2x64x64^3": ((2, 64, 64, 64, 64), "batch", None),
    "instance 8x32x256^2": ((8, 32, 256, 256), "instance", None),
}
LAYOUTS = ("nchw", "nhwc")  # channels-first / channels-last (channels_last_3d in 3-D)


def activation(case, layout):
    shape = CASES[case][0]
    fmt = torch.contiguous_format
    if layout == "nhwc":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    return torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()


class NormAct(torch.nn.Module):
    """Norm + LeakyReLU(0.01) with affine parameters, fused or as the functional ops."""

    def __init__(self, impl, norm, groups, channels):
        super().__init__()
        self.impl, self.norm, self.groups = impl, norm, groups
        self.weight = torch.nn.Parameter(torch.ones(channels))
        self.bias = torch.nn.Parameter(torch.zeros(channels))

    def forward(self, y):
        if self.impl == "fused":
            return ops.norm_act(
                y, self.norm, self.weight, self.bias, act="leaky_relu", groups=self.groups
            )
        if self.norm == "instance":
            z = F.instance_norm(y, weight=self.weight, bias=self.bias)
        elif self.norm == "group":
            z = F.group_norm(y, self.groups, self.weight, self.bias)
        else:
            z = F.batch_norm(y, None, None, self.weight, self.bias, training=True)
        return F.leaky_relu(z, 0.01)


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES))
def test_norm_act_forward_backward(benchmark, case, layout, impl, device="cpu"):
    """One forward and backward of Norm + LeakyReLU; saved-for-backward bytes in extra_info."""
    benchmark.group = f"norm_act fwd+bwd {case} {layout}"
    _, norm, groups = CASES[case]
    y = activation(case, layout)
    module = NormAct(impl, norm, groups, y.shape[1])
    grad = torch.randn_like(y)

    def step():
        module(y).backward(grad)
        y.grad = None
        module.zero_grad(set_to_none=True)

    benchmark.extra_info["saved_bytes"] = saved_bytes(module, y)
    benchmark(step)
