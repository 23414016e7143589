"""The eval path (BatchNorm folded into the convolution, ReLU fused): a double conv in inference,
fused vs the module as written, both layouts, float32 and under bfloat16 autocast.

pytest benchmarks/bench_conv_bias_relu.py --benchmark-only
"""

import pytest
import torch
from bench_conv_bn_relu import CASES, DEVICES, LAYOUTS, activation, double_conv_pair, synchronized


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
