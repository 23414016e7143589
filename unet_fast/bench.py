"""`unet-fast bench`: the reference (tutorial) UNet against unet_fast's, interleaved in one process.

Per dtype, inference rounds then training-step rounds (forward, backward); each round runs both
models once in turn, so drift in the machine's speed affects them alike; times are medians after
warm-up. Also reported: achieved FLOP/s (convolution FLOPs counted from the model's shapes; a
training step counts three times the forward's), on the CPU the fraction of a single large
convolution's FLOP/s (the practical ceiling), the bytes autograd saves for backward (activations,
parameters excluded), peak memory, and the largest output and gradient differences, flagged when
outside tolerance.
"""

import json
import resource
import statistics
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

from . import _backend, reference
from .models.unet import UNet

# flag differences above this fraction of the reference's largest magnitude (a sanity check;
# the tests hold every op and model to DESIGN.md's tolerances)
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-10, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def saved_bytes(model, x) -> int:
    """Bytes of the distinct activation storages autograd keeps for one training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


def conv_flops(model, x) -> int:
    """Multiply-add FLOPs (2 per MAC) of every convolution in one forward of `model` on `x`."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        source = inputs[0] if isinstance(module, nn.ConvTranspose2d) else output
        macs = module.in_channels * module.out_channels // module.groups
        total += (
            2
            * macs
            * module.kernel_size[0]
            * module.kernel_size[1]
            * source[0].numel()
            // (source.shape[1])
            * source.shape[0]
        )

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))
    ]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


def conv_ceiling(device, dtype, rounds: int = 5) -> float:
    """FLOP/s of one large 3x3 convolution (256 -> 256 channels, 64x64, channels_last)."""
    x = torch.randn(2, 256, 64, 64, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    w = torch.randn(256, 256, 3, 3, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    times = []
    with torch.no_grad():
        for _ in range(rounds + 1):
            start = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=1)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return 2 * 256 * 256 * 9 * 2 * 64 * 64 / statistics.median(times[1:])


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(model, x, mode):
    """One inference or training step: (seconds, output, parameter gradients)."""
    start = time.perf_counter()
    if mode == "inference":
        model.eval()
        with torch.no_grad():
            out = model(x)
        grads = None
    else:
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.float().square().mean().backward()
        grads = [p.grad for p in model.parameters()]
    synchronize(x.device)
    return time.perf_counter() - start, out.detach(), grads


def largest_difference(got, want, dtype):
    """(max |got - want|, that relative to max |want|, within tolerance?) over tensors."""
    diff = max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))
    scale = max(max(w.float().abs().max().item() for w in want), 1e-12)
    return diff, diff / scale, diff / scale <= TOLERANCE[dtype]


def bench_dtype(args, device, dtype, progress) -> dict:
    torch.manual_seed(0)
    baseline = reference.UNet(3, 2, args.base_features, bilinear=False)
    ours = UNet(3, 2, args.base_features, bilinear=False, backend=args.backend)
    ours.load_state_dict(baseline.state_dict())
    models = {"baseline": baseline.to(device, dtype), "candidate": ours.to(device, dtype)}
    x = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)
    result = {"dtype": str(dtype).replace("torch.", ""), "forward_flops": conv_flops(baseline, x)}
    for mode in ("inference", "train"):
        times = {name: [] for name in models}
        last = {}
        for i in range(args.warmup + args.rounds):
            for name, model in models.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds, out, grads = step(model, x, mode)
                if i >= args.warmup:
                    times[name].append(seconds)
                last[name] = (out, grads)
                if device.type == "cuda":
                    result[f"{name}_{mode}_peak_bytes"] = torch.cuda.max_memory_allocated()
            progress.update()
        flops = result["forward_flops"] * (1 if mode == "inference" else 3)
        for name in models:
            seconds = statistics.median(times[name])
            result[f"{name}_{mode}_images_per_s"] = args.batch / seconds
            result[f"{name}_{mode}_flops_per_s"] = flops / seconds
        (out, grads), (ref_out, ref_grads) = last["candidate"], last["baseline"]
        result[f"{mode}_output_diff"] = largest_difference([out], [ref_out], dtype)
        if grads is not None:
            result["gradient_diff"] = largest_difference(grads, ref_grads, dtype)
    for name, model in models.items():
        result[f"{name}_saved_bytes"] = saved_bytes(model.train(), x)
    if device.type == "cpu":
        result["conv_ceiling_flops_per_s"] = conv_ceiling(device, dtype)
    return result


def bench(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is available")
    backend = _backend.resolve(args.backend, device, "conv_bn_relu")
    dtypes = [getattr(torch, name) for name in args.dtype]
    with tqdm(
        total=2 * (args.warmup + args.rounds) * len(dtypes),
        desc="bench rounds",
        file=sys.stderr,
        disable=args.quiet,
    ) as progress:
        runs = [bench_dtype(args, device, dtype, progress) for dtype in dtypes]
    return {
        "config": {
            **vars(args),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "backend": backend,
            "backends": _backend.backends(),
        },
        "runs": runs,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def report(result) -> str:
    cfg = result["config"]
    lines = [
        f"unet-fast bench: UNet(3, 2, base_features={cfg['base_features']}, bilinear=False), input "
        f"{cfg['batch']}x3x{cfg['size']}x{cfg['size']} on {cfg['device']} ({cfg['threads']} "
        f"threads), torch {cfg['torch']}",
        "  baseline:  the tutorial's UNet (unet_fast.reference.UNet, eager, NCHW)",
        f"  candidate: unet_fast.UNet, backend {cfg['backend']}, same weights",
        f"  medians of {cfg['rounds']} interleaved rounds after {cfg['warmup']} warm-up",
    ]
    for run in result["runs"]:
        lines += ["", f"  {run['dtype']:28}{'baseline':>12}{'candidate':>12}{'ratio':>9}"]
        for mode, name in (("inference", "inference"), ("train", "training step")):
            b, o = run[f"baseline_{mode}_images_per_s"], run[f"candidate_{mode}_images_per_s"]
            lines.append(f"  {name + ' images/s':28}{b:12.2f}{o:12.2f}{o / b:8.2f}x")
            b, o = run[f"baseline_{mode}_flops_per_s"], run[f"candidate_{mode}_flops_per_s"]
            line = f"  {name + ' GFLOP/s':28}{b / 1e9:12.1f}{o / 1e9:12.1f}"
            if "conv_ceiling_flops_per_s" in run:
                line += f"   ({o / run['conv_ceiling_flops_per_s']:.0%} of one large conv's)"
            lines.append(line)
            if f"candidate_{mode}_peak_bytes" in run:
                b, o = run[f"baseline_{mode}_peak_bytes"], run[f"candidate_{mode}_peak_bytes"]
                lines.append(
                    f"  {name + ' peak MiB':28}{b / 2**20:12.1f}{o / 2**20:12.1f}{o / b:8.2f}x"
                )
        b, o = run["baseline_saved_bytes"], run["candidate_saved_bytes"]
        lines.append(
            f"  {'saved for backward MiB':28}{b / 2**20:12.1f}{o / 2**20:12.1f}{o / b:8.2f}x"
        )
        for key, name in (
            ("inference_output_diff", "inference output"),
            ("train_output_diff", "training output"),
            ("gradient_diff", "gradients"),
        ):
            diff, relative, ok = run[key]
            flag = (
                "ok" if ok else f"OUTSIDE TOLERANCE {TOLERANCE[getattr(torch, run['dtype'])]:.0e}"
            )
            lines.append(
                f"  {'max |diff| ' + name:28}{'':12}{diff:12.1e}   ({relative:.1e} of the "
                f"largest value, {flag})"
            )
    if cfg["device"] == "cpu":
        lines.append(f"\n  peak RSS of this process: {result['peak_rss_mib']:.0f} MiB")
    return "\n".join(lines)


def plot(result, path: str) -> None:
    """A bar chart of images/s, baseline and candidate, per dtype and mode."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels, base, ours = [], [], []
    for run in result["runs"]:
        for mode in ("inference", "train"):
            labels.append(f"{run['dtype']}\n{mode}")
            base.append(run[f"baseline_{mode}_images_per_s"])
            ours.append(run[f"candidate_{mode}_images_per_s"])
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(labels), 4))
    positions = range(len(labels))
    ax.bar([p - 0.2 for p in positions], base, 0.4, label="tutorial UNet")
    ax.bar([p + 0.2 for p in positions], ours, 0.4, label="unet_fast.UNet")
    for p, b, o in zip(positions, base, ours):
        ax.annotate(f"{o / b:.2f}x", (p + 0.2, o), ha="center", va="bottom")
    ax.set_xticks(list(positions), labels)
    ax.set_ylabel("images/s")
    cfg = result["config"]
    ax.set_title(f"UNet(3, 2) {cfg['batch']}x3x{cfg['size']}² on {cfg['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> None:
    result = bench(args)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    if args.plot:
        plot(result, args.plot)
