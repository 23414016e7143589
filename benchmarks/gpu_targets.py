"""The GPU targets, measured interleaved in one process: UNet(3, 2, bilinear=False) training step
and inference against eager PyTorch (tutorial model, cuDNN, channels_last, autocast bf16) and
torch.compile of it; saved-for-backward bytes; the memory-bound kernels' bandwidth against a
plain device copy of the same bytes.

    python benchmarks/gpu_targets.py [--batch 8 --size 512 --rounds 20 --json out.json]

Each round runs every variant once in turn (CUDA events around each call); medians are reported.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import unet_fast
from unet_fast import ops
from unet_fast.bench import saved_bytes

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import tutorial_unet  # noqa: E402


def timer(device):
    """Seconds taken by fn(), with CUDA events on a GPU."""

    def cuda_time(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def cpu_time(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return cuda_time if device.type == "cuda" else cpu_time


def interleaved(fns: dict, rounds: int, warmup: int, device) -> dict:
    time_of = timer(device)
    times = {name: [] for name in fns}
    for i in range(warmup + rounds):
        for name, fn in fns.items():
            t = time_of(fn)
            if i >= warmup:
                times[name].append(t)
    return {name: statistics.median(t) for name, t in times.items()}


def training_step(model, x):
    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return step


def inference(model, x):
    def run():
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16):
            model(x)

    return run


def models(args, device):
    torch.manual_seed(0)
    eager = tutorial_unet.UNet(3, 2, bilinear=False).to(device, memory_format=torch.channels_last)
    variants = {"eager": eager}
    if args.compile:
        variants["compiled"] = torch.compile(copy.deepcopy(eager))
    for backend in args.backends:
        ours = unet_fast.UNet(3, 2, bilinear=False, backend=backend).to(device)
        ours.load_state_dict(eager.state_dict())
        variants[f"unet_fast[{backend}]"] = ours
    return variants


def bandwidth(device, dtype, rounds: int) -> dict:
    """GB/s (bytes read + written) of BN+ReLU apply and crop_concat against a device copy."""
    shape = (8, 64, 512, 512)
    y = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    up = torch.randn_like(y)
    mean, invstd = torch.zeros(64, device=device), torch.ones(64, device=device)
    g, b = torch.ones(64, device=device), torch.zeros(64, device=device)
    copy_dst = torch.empty_like(y)
    cat_bytes = 2 * 2 * y.numel() * y.element_size()
    fns = {
        "copy": lambda: copy_dst.copy_(y),
        "batch_norm_relu_apply": lambda: torch.ops.unet_fast.batch_norm_relu_apply(
            y, g, b, mean, invstd
        ),
        "crop_concat": lambda: ops.crop_concat(y, up, (512, 512)),
        "torch.cat (reference)": lambda: torch.cat([y, up], 1),
    }
    times = interleaved(fns, rounds, 3, device)
    moved = {
        "copy": 2 * y.numel() * y.element_size(),
        "batch_norm_relu_apply": 2 * y.numel() * y.element_size(),
        "crop_concat": cat_bytes,
        "torch.cat (reference)": cat_bytes,
    }
    return {name: moved[name] / t / 1e9 for name, t in times.items()}


def profile(name, fn, device, rows: int = 12):
    """Where a training step's device time goes, kernel by kernel."""
    activity = torch.profiler.ProfilerActivity
    with torch.profiler.profile(activities=[activity.CPU, activity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
    print(f"--- {name}: 3 training steps, top kernels by device time")
    print(
        prof.key_averages().table(
            sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70
        )
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["cuda", "triton"])
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print each model's top kernels of a training step (torch.profiler)",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "shape": [args.batch, 3, args.size, args.size],
        "dtype": "bfloat16 (autocast)",
    }
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    variants = models(args, device)
    for mode, make in (("training step", training_step), ("inference", inference)):
        fns = {
            name: make(model, x)
            for name, model in variants.items()
            if not (mode == "inference" and name == "compiled")
        }
        times = interleaved(fns, args.rounds, args.warmup, device)
        result[mode] = {
            name: {"ms": t * 1e3, "speedup vs eager": times["eager"] / t}
            for name, t in times.items()
        }
        if "compiled" in times:
            for name, t in times.items():
                result[mode][name]["speedup vs compiled"] = times["compiled"] / t
    with torch.autocast(device.type, dtype=torch.bfloat16):
        eager_saved = saved_bytes(variants["eager"], x)
        result["saved bytes vs eager"] = {
            name: saved_bytes(model, x) / eager_saved
            for name, model in variants.items()
            if name.startswith("unet_fast")
        }
    if device.type == "cuda":
        result["bandwidth GB/s (bf16, 8x64x512x512, channels_last)"] = bandwidth(
            device, torch.bfloat16, args.rounds
        )
        result["peak memory GiB"] = torch.cuda.max_memory_allocated() / 2**30
    if args.profile:
        for name, model in variants.items():
            profile(name, training_step(model, x), device)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
