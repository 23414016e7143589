"""The eval path (BatchNorm folded into the convolution, ReLU fused): a double conv in inference,
fused vs the module as written, both layouts, float32 and under bfloat16 autocast; and the UNet's
3x3 layers by Winograd F(2x2, 3x3) vs oneDNN's direct convolution.

pytest benchmarks/bench_conv_bias_relu.py --benchmark-only
"""

import pytest
import torch
from bench_conv_bn_relu import CASES, DEVICES, LAYOUTS, activation, double_conv_pair, synchronized

from unet_fast import _backend
from unet_fast.ops.conv_bias_relu import prepack, winograd_weight

# (C_in, C_out, H = W) of UNet(3, 2)'s 3x3 layers at 1x3x256x256, from narrow to wide
WINOGRAD_LAYERS = {
    f"{c_in}->{c_out} at {size}": (c_in, c_out, size)
    for c_in, c_out, size in [
        (64, 64, 256),
        (128, 64, 256),
        (128, 128, 128),
        (256, 128, 128),
        (256, 256, 64),
        (512, 256, 64),
        (512, 512, 32),
        (1024, 512, 32),
        (1024, 1024, 16),
    ]
}


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_double_conv_eval(benchmark, case, layout, impl, device, autocast):
    """Inference: BatchNorm folded into the convs, ReLU fused (fused) vs the module as written."""
    benchmark.group = f"double_conv eval {device} {case} {layout} autocast={autocast}"
    x = activation(case, layout, device).detach()
    model = double_conv_pair(x.shape[1])[impl].eval().to(device, memory_format=LAYOUTS[layout])

    def run():
        with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=autocast):
            model(x)

    benchmark(synchronized(run, device))


def winograd_layer_fns(layer: str, dtype: torch.dtype) -> dict:
    """{"winograd": ..., "direct": ...}: one layer in inference (1 image, channels_last, folded
    weights prepared once), bfloat16 from float32 weights as under autocast."""
    c_in, c_out, size = WINOGRAD_LAYERS[layer]
    torch.manual_seed(0)
    x = torch.randn(1, c_in, size, size).relu().to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, 3, 3) * (2 / (9 * c_in)) ** 0.5
    bias = (torch.randn(c_out) * 0.1).to(dtype)
    direct, u = prepack(weight.to(dtype), x, 1), winograd_weight(weight, dtype)
    return {
        "winograd": lambda: torch.ops.unet_fast.conv_bias_relu_winograd(x, direct, bias, u),
        "direct": lambda: torch.ops.unet_fast.conv_bias_relu(x, direct, bias, 1),
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["winograd", "direct"])
@pytest.mark.parametrize("layer", list(WINOGRAD_LAYERS))
def test_winograd_layer(benchmark, layer, impl, dtype):
    if _backend.EXTENSION_ERROR is not None or (dtype == "bfloat16" and not _backend.BF16_GEMM):
        pytest.skip("needs unet_fast._C (and AVX512-BF16 for bfloat16)")
    benchmark.group = f"winograd {layer} {dtype}"
    benchmark(winograd_layer_fns(layer, getattr(torch, dtype))[impl])
