"""`unet-fast bench`: the reference (tutorial) UNet against unet_fast's, interleaved in one process.

Per dtype, inference rounds then training-step rounds (forward, backward); each round runs both
models once in turn, so drift in the machine's speed affects them alike; times are medians after
warm-up. Also reported: achieved FLOP/s (convolution FLOPs counted from the model's shapes; a
training step counts three times the forward's), on the CPU the fraction of a single large
convolution's FLOP/s (the practical ceiling), the bytes autograd saves for backward (activations,
parameters excluded), peak memory, and the largest output and gradient differences, flagged when
outside tolerance.
"""

import copy
import json
import math
import resource
import statistics
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

from . import _backend, reference
from .fuse import fuse
from .models import networks
from .models.unet import UNet
from .ops.conv_bias_relu import winograd_layers

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
        transposed = isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d))
        source = inputs[0] if transposed else output  # the side the kernel slides over
        macs = module.in_channels * module.out_channels // module.groups
        total += 2 * macs * math.prod(module.kernel_size) * source[0, 0].numel() * source.shape[0]

    kinds = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
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


def step(model, x, mode, autocast_dtype=None):
    """One inference or training step, under autocast when given its dtype: (seconds, output,
    parameter gradients)."""
    autocast = torch.autocast(x.device.type, autocast_dtype, enabled=autocast_dtype is not None)
    start = time.perf_counter()
    if mode == "inference":
        model.eval()
        with torch.no_grad(), autocast:
            out = model(x)
        grads = None
    else:
        model.train()
        model.zero_grad(set_to_none=True)
        with autocast:
            out = model(x)
        out.float().square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]  # used ones
    synchronize(x.device)
    return time.perf_counter() - start, out.detach(), grads


def largest_difference(got, want, dtype):
    """(max |got - want|, that relative to max |want|, within tolerance?) over tensors."""
    diff = max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))
    scale = max(max(w.float().abs().max().item() for w in want), 1e-12)
    return diff, diff / scale, diff / scale <= TOLERANCE[dtype]


def columns(model: str, compile_modes) -> list:
    """(key, header) of every model timed, in report order: the baseline as written (default
    layout), as experts run it (channels-last), ours, all with the same weights; with --compile,
    torch.compile of the channels-last baseline and of ours, per mode. The UNet's baseline is
    the tutorial's model; another network's is the network itself, ours fuse() of it."""
    base, mine = ("tut", "ours") if model == "unet" else ("orig", "fused")
    names = [
        ("baseline", "NCHW" if model == "unet" else "orig"),
        ("baseline_channels_last", "ch-last" if model == "unet" else "orig CL"),
        ("candidate", mine),
    ]
    for mode in compile_modes:
        short = {"default": "", "max-autotune": " ma", "reduce-overhead": " ro"}.get(mode, mode)
        names += [
            (f"baseline_compiled_{mode}", f"c-{base}{short}"),
            (f"candidate_compiled_{mode}", f"c-{mine}{short}"),
        ]
    return names


def channels_last_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def workload(args, device, weights):
    """(baseline, ours, input): the tutorial's UNet and unet_fast.UNet, or a network of
    models.networks and fuse() of a copy, with the same weights."""
    torch.manual_seed(0)
    if args.model == "unet":
        baseline = reference.UNet(3, 2, args.base_features, bilinear=False)
        ours = UNet(3, 2, args.base_features, bilinear=False, backend=args.backend)
        ours.load_state_dict(baseline.state_dict())
        x = torch.randn(args.batch, 3, args.size, args.size)
        return baseline.to(device, weights), ours.to(device, weights), x.to(device, weights)
    shape, dims = networks.NETWORKS[args.model]
    baseline = networks.build(args.model).to(device, weights)
    ours = fuse(copy.deepcopy(baseline), backend=args.backend)
    x = torch.randn(args.batch, shape[1], *[args.size] * dims, device=device, dtype=weights)
    # a fused network runs channels-last, where the convolutions are fastest
    return baseline, ours.to(memory_format=channels_last_of(x)), x


def bench_dtype(args, device, dtype, progress) -> dict:
    """One dtype's figures: the models in `dtype`, or (--autocast) in float32 under
    torch.autocast to `dtype`, the drop-in case."""
    weights = torch.float32 if args.autocast else dtype
    autocast_dtype = dtype if args.autocast else None
    baseline, ours, x = workload(args, device, weights)
    layout = channels_last_of(x)
    x_channels_last = x.contiguous(memory_format=layout)
    channels_last = copy.deepcopy(baseline).to(memory_format=layout)
    x_ours = x if args.model == "unet" else x_channels_last  # the UNet converts internally
    models = {
        "baseline": (baseline, x),
        "baseline_channels_last": (channels_last, x_channels_last),
        "candidate": (ours, x_ours),
    }
    for mode in args.compile:
        models[f"baseline_compiled_{mode}"] = (
            torch.compile(copy.deepcopy(channels_last), mode=mode),
            x_channels_last,
        )
        models[f"candidate_compiled_{mode}"] = (
            torch.compile(copy.deepcopy(ours), mode=mode),
            x_ours,
        )
    name = str(dtype).replace("torch.", "")
    result = {
        "dtype": f"{name} autocast" if args.autocast else name,
        "forward_flops": conv_flops(baseline, x),
    }
    for mode in ("inference", "train"):
        times = {name: [] for name in models}
        last = {}
        for i in range(args.warmup + args.rounds):
            for name, (model, inputs) in models.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds, out, grads = step(model, inputs, mode, autocast_dtype)
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
        # against the baseline in ours' layout: a network's channels-last convolutions differ
        # from its channels-first ones by more than fusion does (oneDNN's weight gradients)
        ref_out, ref_grads = last["baseline" if args.model == "unet" else "baseline_channels_last"]
        for name in (n for n in models if n.startswith("candidate")):
            out, grads = last[name]
            suffix = name[len("candidate") :]
            result[f"{mode}_output_diff{suffix}"] = largest_difference([out], [ref_out], dtype)
            if grads is not None:
                result[f"gradient_diff{suffix}"] = largest_difference(grads, ref_grads, dtype)
    result["winograd_layers"] = winograd_layers(ours)
    for name, (model, inputs) in models.items():
        with torch.autocast(device.type, autocast_dtype, enabled=args.autocast):
            result[f"{name}_saved_bytes"] = saved_bytes(model.train(), inputs)
    if device.type == "cpu":
        result["conv_ceiling_flops_per_s"] = conv_ceiling(device, dtype)
    return result


def bench(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is available")
    if args.model == "unet":
        args.batch, args.size = args.batch or 2, args.size or 128
        backend = _backend.resolve(args.backend, device, "conv_bn_relu")
    else:
        shape = networks.NETWORKS[args.model][0]
        args.batch, args.size = args.batch or shape[0], args.size or shape[2]
        backend = _backend.resolve(args.backend, device, "norm_act")
    dtypes = [getattr(torch, name) for name in args.dtype]
    if args.autocast:  # float32 runs as it is; autocast takes the low-precision dtypes
        dtypes = [d for d in dtypes if d in (torch.bfloat16, torch.float16)]
        if not dtypes:
            raise ValueError("--autocast needs --dtype bfloat16 or float16")
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
            "dims": 2 if args.model == "unet" else networks.NETWORKS[args.model][1],
            "backend": backend,
            "backend_asked": args.backend,
            "backends": _backend.backends(),
        },
        "runs": runs,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_cache": _backend.cpu_cache_info(),
    }


def unverified_note(cfg) -> str:
    """Why "auto" chose the reference for ops whose kernels were built: not yet run there."""
    device = torch.device(cfg["device"]).type
    unverified = [
        op
        for op in cfg["backends"].get("unverified", {}).get(device, [])
        if op != "norm_act" or cfg["model"] != "unet"  # the tutorial's UNet has no norm_act
    ]
    if cfg.get("backend_asked", "auto") != "auto" or not unverified:
        return ""
    return (
        f" (the {device} {', '.join(unverified)} kernels are built but unverified, so the "
        f"reference runs: --backend {device} runs them)"
    )


def report(result) -> str:
    cfg = result["config"]
    under = ", under torch.autocast" if cfg["autocast"] else ""
    models = columns(cfg["model"], cfg["compile"])
    (_, base), (_, base_cl), (_, mine) = models[:3]
    if cfg["model"] == "unet":
        what = f"UNet(3, 2, base_features={cfg['base_features']}, bilinear=False)"
        shape = f"{cfg['batch']}x3x{cfg['size']}x{cfg['size']}"
        described = [
            f"  {base}: the tutorial's UNet (unet_fast.reference.UNet, eager, NCHW){under}",
            f"  {base_cl}: the same in channels_last (model and input), as experts run it{under}",
            f"  {mine}: unet_fast.UNet, backend {cfg['backend']}, same weights{under}",
        ]
    else:
        what = cfg["model"]
        shape = "x".join(map(str, [cfg["batch"], 1] + [cfg["size"]] * cfg["dims"]))
        described = [
            f"  {base}: the network as its library builds it (eager, channels-first){under}",
            f"  {base_cl}: the same in channels-last (model and input){under}",
            f"  {mine}: unet_fast.fuse() of it in channels-last, backend {cfg['backend']}"
            f"{unverified_note(cfg)}, same weights{under}",
        ]
    lines = [
        f"unet-fast bench: {what}, input {shape} on {cfg['device']} ({cfg['threads']} "
        f"threads), torch {cfg['torch']}",
        *described,
    ]
    if cfg["compile"]:
        c_base, c_mine = models[3][1], models[4][1]
        lines.append(
            f"  {c_base} / {c_mine}: torch.compile of {base_cl} / of {mine} (ma: mode "
            "max-autotune, ro: reduce-overhead)"
        )
    lines.append(
        f"  medians of {cfg['rounds']} interleaved rounds after {cfg['warmup']} warm-up; "
        f"ratios: {mine} vs {base}, {mine} vs {base_cl}"
        + (f", compiled {mine} vs compiled {base} per mode" if cfg["compile"] else "")
    )
    ratios = [
        ("candidate", "baseline", f"vs {base}"),
        ("candidate", "baseline_channels_last", f"vs {base_cl}"),
    ]
    ratios += [
        (f"candidate_compiled_{mode}", f"baseline_compiled_{mode}", f"vs {header}")
        for mode, (_, header) in zip(cfg["compile"], models[3::2])
    ]

    def row(label, key, scale=1.0, digits=2, with_ratios=True):
        values = {name: run.get(f"{name}_{key}") for name, _ in models}
        if values["baseline"] is None:
            return None
        text = f"  {label:28}" + "".join(f"{v / scale:10.{digits}f}" for v in values.values())
        if with_ratios:
            text += "".join(f"{values[a] / values[b]:11.2f}x" for a, b, _ in ratios)
        return text

    for run in result["runs"]:
        header = f"  {run['dtype']:28}" + "".join(f"{h:>10}" for _, h in models)
        lines += ["", header + "".join(f"{h:>12}" for *_, h in ratios)]
        for mode, name in (("inference", "inference"), ("train", "training step")):
            lines.append(row(name + " images/s", f"{mode}_images_per_s"))
            line = row(name + " GFLOP/s", f"{mode}_flops_per_s", 1e9, 1, with_ratios=False)
            if "conv_ceiling_flops_per_s" in run:
                ours = run[f"candidate_{mode}_flops_per_s"]
                line += f"   ({ours / run['conv_ceiling_flops_per_s']:.0%} of one large conv's)"
            lines.append(line)
            peak = row(name + " peak MiB", f"{mode}_peak_bytes", 2**20, 1)
            if peak:
                lines.append(peak)
        lines.append(row("saved for backward MiB", "saved_bytes", 2**20, 1))
        winograd, folded = run.get("winograd_layers", (0, 0))
        if winograd:
            lines.append(
                f"  {mine} inference: {winograd} of {folded} folded convolutions by Winograd "
                "F(2x2, 3x3), fewer multiplications than the direct FLOPs counted above "
                "(UNET_FAST_CPU_WINOGRAD=0: oneDNN's direct convolution)"
            )
        tolerance = TOLERANCE[getattr(torch, run["dtype"].split()[0])]
        for name, header in models:
            if not name.startswith("candidate"):
                continue
            suffix = name[len("candidate") :]
            for key, quantity in (
                ("inference_output_diff", "inference output"),
                ("train_output_diff", "training output"),
                ("gradient_diff", "gradients"),
            ):
                diff, relative, ok = run[key + suffix]
                flag = "ok" if ok else f"OUTSIDE TOLERANCE {tolerance:.0e}"
                label = f"max |diff| {quantity}" + (f", {header}" if suffix else "")
                lines.append(
                    f"  {label:40}{diff:10.1e}   ({relative:.1e} of the largest value, vs "
                    f"{base if cfg['model'] == 'unet' else base_cl}, "
                    f"{flag})"
                )
    if cfg["device"] == "cpu":
        lines.append(f"\n  peak RSS of this process: {result['peak_rss_mib']:.0f} MiB")
        cache = result.get("cpu_cache")
        if cache and cfg["backend"] == "cpu":
            lines.append(
                f"  {mine}: the CPU kernels reuse large freed buffers (limit "
                f"{cache['limit_bytes'] >> 20} MiB, UNET_FAST_CPU_CACHE_MIB=0 turns it off): "
                f"{cache['hits']} reused, {cache['misses']} new"
            )
    return "\n".join(lines)


def plot(result, path: str) -> None:
    """A bar chart of images/s of every model timed, per dtype and mode."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cfg = result["config"]
    models = columns(cfg["model"], cfg["compile"])
    labels = [
        f"{run['dtype']}\n{mode}" for run in result["runs"] for mode in ("inference", "train")
    ]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(2 + (1 + len(models) / 2) * len(labels), 4))
    for i, (name, header) in enumerate(models):
        bars = [
            run[f"{name}_{mode}_images_per_s"]
            for run in result["runs"]
            for mode in ("inference", "train")
        ]
        ax.bar(
            [p + (i - (len(models) - 1) / 2) * width for p in range(len(labels))],
            bars,
            width,
            label=header,
        )
    ax.set_xticks(list(range(len(labels))), labels)
    ax.set_ylabel("images/s")
    ax.set_title(
        f"{cfg['model']}, batch {cfg['batch']}, size {cfg['size']} on {cfg['device']} "
        "(c-: torch.compile)"
    )
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
