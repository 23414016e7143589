"""UNet(3, 2, bilinear=False) end to end: unet_fast vs the tutorial's model (NCHW, and
channels_last), inference (1x3x256x256) and a training step (2x3x256x256, SGD), float32,
bfloat16 (ours in bfloat16, the tutorial under torch.autocast) and autocast (every model in
float32 under bfloat16 autocast: the drop-in case). Weights shared.

    pytest benchmarks/bench_unet.py --benchmark-only

On a GPU the timed functions end with torch.cuda.synchronize().
"""

import copy
import sys
from pathlib import Path

import pytest
import torch

import unet_fast
from unet_fast.bench import saved_bytes

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import tutorial_unet  # noqa: E402

IMPLS = ["fused", "tutorial", "tutorial_channels_last"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def model_and_input(impl, mode, dtype, device="cpu"):
    torch.manual_seed(0)
    tutorial = tutorial_unet.UNet(3, 2, bilinear=False).to(device)
    x = torch.randn(1 if mode == "inference" else 2, 3, 256, 256, device=device)
    if impl == "fused":
        model = unet_fast.UNet(3, 2, bilinear=False).to(device)
        model.load_state_dict(tutorial.state_dict())
        if dtype == "bfloat16":  # our bf16 path: the model in bfloat16
            model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
        return model, x, dtype == "autocast"
    model = copy.deepcopy(tutorial)
    if impl == "tutorial_channels_last":
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    return model, x, dtype != "float32"  # the tutorial runs bfloat16 under autocast


def step_fn(impl, mode, dtype, device="cpu"):
    model, x, autocast = model_and_input(impl, mode, dtype, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def inference():
        model.eval()
        with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=autocast):
            model(x)
        sync()

    def train():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, torch.bfloat16, enabled=autocast):
            out = model(x)
        out.float().square().mean().backward()
        optimizer.step()
        sync()

    return (inference if mode == "inference" else train), model, x


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "autocast"])
@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("device", DEVICES)
def test_unet(benchmark, device, mode, dtype, impl):
    benchmark.group = f"UNet {mode} {device} {dtype}"
    fn, model, x = step_fn(impl, mode, dtype, device)
    if mode == "train":
        model.train()
        benchmark.extra_info["saved_bytes"] = saved_bytes(model, x)
    benchmark(fn)
