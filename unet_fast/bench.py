"""`unet-fast bench`: the reference (tutorial) UNet against unet_fast's, interleaved in one process.

Times are medians over rounds after warm-up; each round runs every model once in turn, so drift in
the machine's speed affects them alike. Memory is the bytes autograd saves for backward
(activations only, parameters excluded) and the process's peak RSS.
"""
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from . import _backend, reference
from .models.unet import UNet


@dataclass
class Case:
    """One model under test and its times."""
    label: str
    model: torch.nn.Module
    times: dict = field(default_factory=lambda: {"inference": [], "train": []})


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


def run_once(case, x, mode):
    start = time.perf_counter()
    if mode == "inference":
        case.model.eval()
        with torch.no_grad():
            out = case.model(x)
    else:
        case.model.train()
        case.model.zero_grad(set_to_none=True)
        out = case.model(x)
        out.float().square().mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out.detach()


def bench(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is available")
    backend = _backend.resolve(args.backend, device, "conv_bn_relu")
    dtype = getattr(torch, args.dtype)
    baseline = Case("tutorial UNet (reference, eager)",
                    reference.UNet(3, 2, args.base_features, bilinear=False))
    ours = Case(f"unet_fast.UNet (fused ops, backend {backend})",
                UNet(3, 2, args.base_features, bilinear=False, backend=args.backend))
    ours.model.load_state_dict(baseline.model.state_dict())
    cases = [baseline, ours]
    for case in cases:
        case.model.to(device=device, dtype=dtype)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)

    # Inference rounds first, then training rounds: each round runs every model once in turn.
    # (Alternating modes would re-fold each eval-mode weight after every training step.)
    outputs = {}
    with tqdm(total=2 * (args.warmup + args.rounds), desc="bench rounds", file=sys.stderr,
              disable=args.quiet) as progress:
        for mode in ("inference", "train"):
            for _ in range(args.warmup + args.rounds):
                for case in cases:
                    seconds, outputs[case.label, mode] = run_once(case, x, mode)
                    case.times[mode].append(seconds)
                progress.update()
    result = {
        "config": {**vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "backend": backend, "backends": _backend.backends()},
        "cases": [],
    }
    for case in cases:
        case.model.train()
        entry = {"label": case.label, "saved_bytes": saved_bytes(case.model, x)}
        for mode in ("inference", "train"):
            median = statistics.median(case.times[mode][args.warmup:])
            entry[f"{mode}_images_per_s"] = args.batch / median
            entry[f"{mode}_max_abs_diff"] = (outputs[case.label, mode].float()
                                             - outputs[baseline.label, mode].float()).abs().max().item()
        result["cases"].append(entry)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def report(result) -> str:
    cfg = result["config"]
    base, ours = result["cases"]
    lines = [
        f"unet-fast bench: UNet(3, 2, base_features={cfg['base_features']}, bilinear=False), input "
        f"{cfg['batch']}x3x{cfg['size']}x{cfg['size']} {cfg['dtype']} on {cfg['device']} "
        f"({cfg['threads']} threads), torch {cfg['torch']}, backend {cfg['backend']}",
        f"  baseline:  {base['label']}",
        f"  candidate: {ours['label']}",
        f"  medians of {cfg['rounds']} interleaved rounds after {cfg['warmup']} warm-up",
        "",
        f"  {'':28}{'baseline':>12}{'candidate':>12}{'ratio':>9}",
    ]
    for mode in ("inference", "train"):
        b, o = base[f"{mode}_images_per_s"], ours[f"{mode}_images_per_s"]
        name = "inference images/s" if mode == "inference" else "training step images/s"
        lines.append(f"  {name:28}{b:12.2f}{o:12.2f}{o / b:8.2f}x")
    b, o = base["saved_bytes"] / 2**20, ours["saved_bytes"] / 2**20
    lines.append(f"  {'saved for backward (MiB)':28}{b:12.1f}{o:12.1f}{o / b:8.2f}x")
    for mode in ("inference", "train"):
        lines.append(f"  {'max |diff| ' + mode + ' output':28}{'':12}{ours[f'{mode}_max_abs_diff']:12.2e}")
    lines.append(f"  peak RSS of this process: {result['peak_rss_mb']:.0f} MiB")
    return "\n".join(lines)


def main(args) -> None:
    result = bench(args)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
