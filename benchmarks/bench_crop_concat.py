"""crop_concat forward (+ backward) vs F.pad / slicing + torch.cat, both layouts.

pytest benchmarks/bench_crop_concat.py --benchmark-only
"""

import pytest
import torch
from bench_conv_bn_relu import DEVICES, synchronized

import unet_fast
from unet_fast import reference

# U-Net-sized skips: (N, C, H, W) of skip and up, and the target size
CASES = {
    "same-pad-64x256": ((2, 64, 256, 256), (2, 64, 255, 255), (256, 256)),
    "valid-crop-512x32": ((2, 512, 40, 40), (2, 512, 32, 32), (32, 32)),
}


def make(case, channels_last, device):
    skip_shape, up_shape, size = CASES[case]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    skip = torch.randn(skip_shape, device=device).contiguous(memory_format=fmt)
    up = torch.randn(up_shape, device=device).contiguous(memory_format=fmt)
    return skip, up, size


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_crop_concat_forward(benchmark, case, channels_last, impl, device):
    benchmark.group = f"crop_concat {device} {case} {'nhwc' if channels_last else 'nchw'}"
    skip, up, size = make(case, channels_last, device)
    fn = unet_fast.crop_concat if impl == "fused" else reference.crop_concat
    benchmark.extra_info["bytes_written"] = fn(skip, up, size).nbytes
    benchmark(synchronized(lambda: fn(skip, up, size), device))
