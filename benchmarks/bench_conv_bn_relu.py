"""BN+ReLU and double_conv in training: fused vs reference, both layouts (eval speed:
bench_conv_bias_relu.py).

pytest benchmarks/bench_conv_bn_relu.py --benchmark-only
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unet_fast import ops
from unet_fast.bench import saved_bytes
from unet_fast.nn import FusedDoubleConv

CASES = {"64x256": (2, 64, 256, 256), "512x32": (2, 512, 32, 32)}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def activation(case, layout, device):
    x = torch.randn(CASES[case], device=device).contiguous(memory_format=LAYOUTS[layout])
    return x.requires_grad_()


def synchronized(fn, device):
    """fn, ending with torch.cuda.synchronize() on a GPU so the timer sees the kernels."""
    if device != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_bn_relu_forward_backward(benchmark, case, layout, impl, device):
    """BatchNorm (batch statistics) + ReLU, forward and backward."""
    benchmark.group = f"BN+ReLU fwd+bwd {device} {case} {layout}"
    y = activation(case, layout, device)
    c = y.shape[1]
    weight = torch.ones(c, device=device, requires_grad=True)
    bias = torch.zeros(c, device=device, requires_grad=True)
    mean, var = torch.zeros(c, device=device), torch.ones(c, device=device)
    grad = torch.randn_like(y)

    def fused():
        out = ops.batch_norm_relu(y, weight, bias, mean, var)
        torch.autograd.grad(out, (y, weight, bias), grad)

    def reference():
        out = F.relu(F.batch_norm(y, mean, var, weight, bias, True))
        torch.autograd.grad(out, (y, weight, bias), grad)

    benchmark(synchronized(fused if impl == "fused" else reference, device))


def double_conv_pair(c):
    fused = FusedDoubleConv(c, c)
    plain = copy.deepcopy(fused)
    plain.__class__ = nn.Sequential
    return {"fused": fused, "reference": plain}


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_double_conv_training(benchmark, case, layout, impl, device):
    """Training forward + backward; saved-for-backward bytes in extra_info."""
    benchmark.group = f"double_conv train {device} {case} {layout}"
    x = activation(case, layout, device)
    model = double_conv_pair(x.shape[1])[impl].train().to(device, memory_format=LAYOUTS[layout])
    benchmark.extra_info["saved_bytes"] = saved_bytes(model, x)

    def step():
        model(x).sum().backward()

    benchmark(synchronized(step, device))
