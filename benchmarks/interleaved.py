"""Fused vs reference ratios for the op targets, measured interleaved in one process.

pytest-benchmark runs each case's rounds back to back; on a shared 2-core machine the speed drifts
between cases, so the ratios quoted in notes come from here: every round times the fused and the
reference version one after the other, and the ratio is of the medians.

    python benchmarks/interleaved.py [--rounds 15] [--only norm]
                                     [--unet | --autocast | --predict | --winograd]
"""

import argparse
import statistics
import time

import bench_conv_bias_relu as eval_cases
import bench_conv_bn_relu as conv_cases
import bench_crop_concat as crop_cases
import bench_norm_act as norm_cases
import bench_unet
import bench_up_conv as up_cases
import torch

from unet_fast import _backend


def interleaved(fns: dict, rounds: int, warmup: int = 2, block_seconds: float = 0.05) -> dict:
    """Median seconds per call of each function. A round times a block of calls of each function
    in turn; blocks repeat fast functions so each lasts about `block_seconds`."""
    repeats = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        repeats[name] = max(1, round(block_seconds / max(time.perf_counter() - start, 1e-6)))
    times = {name: [] for name in fns}
    for i in range(warmup + rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(repeats[name]):
                fn()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) / repeats[name])
    return {name: statistics.median(t) for name, t in times.items()}


class Recorder:
    """Stands in for pytest-benchmark's fixture: keeps the function instead of timing it."""

    def __init__(self):
        self.extra_info, self.fn = {}, None

    def __call__(self, fn, *args):
        self.fn = lambda: fn(*args)


def case_fns(test, **params):
    fns, info = {}, {}
    for impl in ("fused", "reference"):
        recorder = Recorder()
        test(recorder, impl=impl, **params)
        fns[impl], info[impl] = recorder.fn, recorder.extra_info
    return fns, info


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--unet",
        action="store_true",
        help="the UNet targets instead: unet_fast vs the tutorial's model",
    )
    parser.add_argument(
        "--autocast",
        action="store_true",
        help="a training step in float32 vs under bfloat16 autocast instead",
    )
    parser.add_argument(
        "--winograd",
        action="store_true",
        help="the UNet's 3x3 layers in inference instead: Winograd F(2x2, 3x3) vs oneDNN's direct",
    )
    parser.add_argument("--only", default="", help="op suites whose title contains this text")
    parser.add_argument(
        "--predict",
        action="store_true",
        help="overlap-tile prediction instead: TTA views sharing batches vs view by view, and "
        "one view vs MONAI's sliding_window_inference",
    )
    args = parser.parse_args()
    if args.predict:
        return predict_ratios(args.rounds)
    if args.unet:
        return unet_ratios(args.rounds)
    if args.autocast:
        return autocast_ratios(args.rounds)
    if args.winograd:
        return winograd_ratios(args.rounds)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; reference time / fused time "
        f"(medians of {args.rounds} interleaved rounds)"
    )
    suites = [
        ("BN+ReLU fwd+bwd", conv_cases.test_bn_relu_forward_backward, conv_cases.CASES),
        ("double_conv eval", eval_cases.test_double_conv_eval, conv_cases.CASES),
        ("double_conv train step", conv_cases.test_double_conv_training, conv_cases.CASES),
        ("crop_concat forward", crop_cases.test_crop_concat_forward, crop_cases.CASES),
        ("norm+LeakyReLU fwd+bwd", norm_cases.test_norm_act_forward_backward, norm_cases.CASES),
        ("up_conv fwd+bwd", up_cases.test_up_conv_forward_backward, up_cases.CASES),
    ]
    for title, test, cases in suites:
        if args.only not in title:
            continue
        for case in cases:
            for layout in ("nchw", "nhwc"):
                params = {"case": case, "device": "cpu"}
                if test is up_cases.test_up_conv_forward_backward:
                    if layout == "nchw":
                        continue  # channels-last only: the layout the kernel is for
                    params = {"case": case, "device": "cpu"}
                elif test is norm_cases.test_norm_act_forward_backward:
                    params = {"case": case, "layout": layout}
                elif test is crop_cases.test_crop_concat_forward:
                    params["channels_last"] = layout == "nhwc"
                elif test is eval_cases.test_double_conv_eval:
                    params.update(layout=layout, autocast=False)
                else:
                    params["layout"] = layout
                fns, info = case_fns(test, **params)
                t = interleaved(fns, args.rounds)
                line = (
                    f"{title:24} {case:20} {layout}: {t['reference'] / t['fused']:5.2f}x "
                    f"({t['reference'] * 1e3:.1f} ms / {t['fused'] * 1e3:.1f} ms)"
                )
                if "saved_bytes" in info["fused"]:
                    ratio = info["fused"]["saved_bytes"] / info["reference"]["saved_bytes"]
                    line += f"   saved-for-backward bytes {ratio:.3f}x"
                print(line, flush=True)


def unet_ratios(rounds: int):
    """Tutorial time / unet_fast time for UNet(3, 2, bilinear=False), and saved-bytes ratios."""
    from unet_fast.bench import saved_bytes

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; tutorial UNet time / "
        f"unet_fast.UNet time (medians of {rounds} interleaved rounds)"
    )
    # autocast: every model in float32 under bfloat16 autocast, the drop-in inference case
    for mode, dtypes in (
        ("inference", ("float32", "bfloat16", "autocast")),
        ("train", ("float32", "bfloat16")),
    ):
        for dtype in dtypes:
            fns = {impl: bench_unet.step_fn(impl, mode, dtype)[0] for impl in bench_unet.IMPLS}
            t = interleaved(fns, rounds, warmup=1, block_seconds=0)
            print(
                f"{mode:9} {dtype:8}: vs tutorial NCHW {t['tutorial'] / t['fused']:.2f}x, "
                f"vs tutorial channels_last {t['tutorial_channels_last'] / t['fused']:.2f}x",
                flush=True,
            )
    saved = {}
    for impl in ("fused", "tutorial"):
        _, model, x = bench_unet.step_fn(impl, "train", "float32")
        saved[impl] = saved_bytes(model.train(), x)
    print(f"saved-for-backward bytes, training step: {saved['fused'] / saved['tutorial']:.3f}x")


def winograd_ratios(rounds: int):
    """direct time / Winograd time of each 3x3 layer of the UNet at 1x3x256x256, with the rule's
    C_in * C_out / (C_in + C_out)."""
    print(f"direct time / Winograd time (medians of {rounds} interleaved rounds)")
    dtypes = [torch.float32] + [torch.bfloat16] * bool(_backend.BF16_GEMM)
    for layer, (c_in, c_out, _) in eval_cases.WINOGRAD_LAYERS.items():
        for dtype in dtypes:
            t = interleaved(eval_cases.winograd_layer_fns(layer, dtype), rounds)
            print(
                f"{layer:18} {str(dtype)[6:]:9} C_in*C_out/(C_in+C_out) "
                f"{c_in * c_out / (c_in + c_out):5.0f}: {t['direct'] / t['winograd']:5.2f}x "
                f"({t['direct'] * 1e3:.1f} ms / {t['winograd'] * 1e3:.1f} ms)",
                flush=True,
            )


def autocast_ratios(rounds: int):
    """float32 time / bfloat16-autocast time of a training step (forward, BCE loss, backward,
    AdamW) of UNet(1, 1, bilinear=False) at 4x1x256², the ISBI 2012 recipe's shape, and each
    width's bfloat16 step against base 16's (widths off the 16-lane grid run slower per FLOP)."""
    import unet_fast

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32 time / "
        f"bfloat16 autocast time (medians of {rounds} interleaved rounds)"
    )
    x = torch.randn(4, 1, 256, 256).contiguous(memory_format=torch.channels_last)
    target = (torch.rand(4, 1, 256, 256) > 0.5).float()
    bases, fns = (12, 16, 32), {}
    for base in bases:
        for dtype in (None, torch.bfloat16):
            model = unet_fast.UNet(1, 1, base_features=base, bilinear=False)
            optimizer = torch.optim.AdamW(model.parameters())

            def step(model=model, optimizer=optimizer, dtype=dtype):
                with torch.autocast(
                    "cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None
                ):
                    logits = model(x)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

            fns[base, dtype] = step
    t = interleaved(fns, rounds, warmup=1, block_seconds=0)
    for base in bases:
        bf16 = t[base, torch.bfloat16]
        print(
            f"base_features={base}: {t[base, None] / bf16:.2f}x ({t[base, None]:.3f} s vs "
            f"{bf16:.3f} s); bfloat16 step {bf16 / t[16, torch.bfloat16]:.2f}x base 16's",
            flush=True,
        )


def predict_ratios(rounds: int):
    """Overlap-tile prediction in eval. 2-D: UNet(1, 2, 16, bilinear=False) on a 1024² image,
    tiles of 256 overlapping by 64: the 8 dihedral views sharing batches of 4 tiles against
    view by view (each view's last batch partial), and one view against MONAI's
    sliding_window_inference. 3-D: UNet(1, 2, 8, spatial_dims=3, norm="instance") on a
    96×192×192 volume, tiles of 64³ overlapping by 16, batches of 2, against MONAI. Against
    MONAI: same model, tiles, overlap, batch and blending (constant: both average the tiles)."""
    import unet_fast
    from unet_fast.train.predict import predict_tiled, predict_views
    from unet_fast.train.symmetry import SYMMETRIES, symmetric_mean

    torch.manual_seed(0)
    model = unet_fast.UNet(1, 2, 16, bilinear=False).eval()
    volume_model = unet_fast.UNet(1, 2, 8, spatial_dims=3, norm="instance").eval()
    image, volume = torch.randn(1, 1024, 1024), torch.randn(1, 96, 192, 192)
    views = SYMMETRIES["dihedral"]
    fns = {
        "tta shared batches": lambda: predict_views(model, image, views, 256, 64, 4),
        "tta view by view": lambda: symmetric_mean(
            lambda view: predict_tiled(model, view, 256, 64, 4), image
        ),
        "2-D ours": lambda: predict_tiled(model, image, 256, 64, 4, "constant"),
        "3-D ours": lambda: predict_tiled(volume_model, volume, 64, 16, 2, "constant"),
    }
    try:
        from monai.inferers import sliding_window_inference

        def monai(net, x, tile, batch):
            with torch.inference_mode():
                sliding_window_inference(x[None], tile, batch, net, overlap=0.25)

        fns["2-D MONAI"] = lambda: monai(model, image, (256, 256), 4)
        fns["3-D MONAI"] = lambda: monai(volume_model, volume, (64, 64, 64), 2)
    except ImportError:
        print("monai is not installed: no sliding_window_inference figure")
    t = interleaved(fns, rounds, warmup=1, block_seconds=0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {rounds} rounds"
    )
    print(
        f"TTA (8 views): view by view / shared batches = "
        f"{t['tta view by view'] / t['tta shared batches']:.2f}x "
        f"({t['tta view by view']:.2f} s vs {t['tta shared batches']:.2f} s)"
    )
    for dims in ("2-D", "3-D"):
        if f"{dims} MONAI" in t:
            print(
                f"{dims} one view: MONAI / ours = {t[f'{dims} MONAI'] / t[f'{dims} ours']:.2f}x "
                f"({t[f'{dims} MONAI']:.2f} s vs {t[f'{dims} ours']:.2f} s)"
            )


if __name__ == "__main__":
    main()
