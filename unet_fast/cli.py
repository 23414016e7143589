"""The `unet-fast` command."""

import argparse
import sys

from . import _backend
from .models.networks import NETWORKS


class Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit status 2, no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="unet-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    b = sub.add_parser("bench", help="reference vs unet_fast UNet, interleaved in one process")
    b.add_argument("--device", default="cpu")
    b.add_argument(
        "--model",
        default="unet",
        choices=["unet", *NETWORKS],
        help="unet: the tutorial's UNet against unet_fast.UNet; the others: that library's "
        "network against unet_fast.fuse() of it",
    )
    b.add_argument(
        "--size", type=int, help="input height and width (and depth); default 128 for unet"
    )
    b.add_argument("--batch", type=int, help="default 2 for unet")
    b.add_argument("--base-features", type=int, default=64)
    b.add_argument(
        "--dtype",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16", "float16", "float64"],
    )
    b.add_argument(
        "--autocast",
        action="store_true",
        help="every model in float32 under torch.autocast to each --dtype (the drop-in case)",
    )
    b.add_argument("--backend", default="auto", choices=_backend.NAMES)
    b.add_argument(
        "--compile",
        nargs="+",
        default=[],
        metavar="MODE",
        choices=["default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"],
        help="also time torch.compile of the tutorial (channels_last) and of ours in each mode",
    )
    b.add_argument("--rounds", type=int, default=5)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    b.add_argument("--plot", metavar="PATH", help="also draw images/s as a bar chart (PNG)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("backends", help="what was built and which backend each device uses")
    t = sub.add_parser("train", help="train a model (python -m unet_fast.train under torchrun)")
    from .train import main as train_main

    train_main.add_arguments(t)
    from .train import predict_files

    predict_files.add_arguments(
        sub.add_parser("predict", help="segment images with a trained checkpoint (overlap-tile)")
    )
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "bench":
            from . import bench

            if args.batch is not None and args.batch < 2:
                raise ValueError(
                    "--batch must be at least 2: a training step with BatchNorm needs "
                    "more than one value per channel"
                )
            if args.rounds < 1:
                raise ValueError("--rounds must be at least 1")
            bench.main(args)
        elif args.command == "train":
            from .train import main as train_main

            train_main.main(args)
        elif args.command == "predict":
            from .train import predict_files

            predict_files.main(args)
        else:
            from . import backends

            for key, value in backends().items():
                print(f"{key:10} {value}")
    except (
        ValueError,
        RuntimeError,
        NotImplementedError,
        FileNotFoundError,
        FloatingPointError,
    ) as error:
        print(f"unet-fast {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
