"""`unet-fast train` and `python -m unet_fast.train` (the same arguments; under torchrun every
process runs it): data sets from the command line, the model, then `fit`."""

import argparse
import dataclasses
import math

import torch

from ..models.registry import MODELS
from .data import SegmentationFolder, SyntheticCells, find_image_mask_folders
from .fit import LOSSES, PRECISIONS, TrainConfig, fit
from .images import read_image
from .symmetry import SYMMETRIES


def add_arguments(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        metavar="DIR",
        help="image and mask folders (DIR/train/image + DIR/train/label as ISBI "
        "2012, or DIR/images + DIR/masks); default: generated cells",
    )
    data.add_argument(
        "--val-count",
        type=int,
        metavar="N",
        help="the last N samples validate (slices are correlated, so the split is "
        "contiguous); default 15%% of the samples, 4 of ISBI's 24",
    )
    data.add_argument(
        "--foreground",
        type=int,
        metavar="VALUE",
        help="binary masks: the stored value of the positive class (ISBI 2012: 0, "
        "the membranes); default: non-zero",
    )
    data.add_argument(
        "--spatial-dims",
        type=int,
        default=2,
        choices=(2, 3),
        help="3: volumes (NIfTI .nii/.nii.gz or TIFF stacks in the image and mask folders; "
        "generated cell volumes without --data), z-scored per volume, and a 3-D UNet",
    )
    data.add_argument(
        "--crop",
        type=int,
        nargs="+",
        metavar="N",
        help="training crop size: one value (square or cube) or one per axis (H W, or D H W); "
        "default 256 (2-D), 64 (3-D)",
    )
    data.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        default=(0.5, 1.0),
        metavar=("MIN", "MAX"),
        help="area of the crop taken before resizing it to --crop, as a fraction "
        "of the image (the tutorial's 0.5 1.0); its aspect ratio is drawn "
        "from 3/4 to 4/3",
    )
    data.add_argument(
        "--resize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="random resized crops (the tutorial's); --no-resize: plain random "
        "crops at the images' own resolution, --crop-scale unused",
    )
    data.add_argument(
        "--elastic-p",
        type=float,
        default=0.3,
        help="probability of the elastic deformation (the tutorial's 0.3)",
    )
    data.add_argument(
        "--intensity-p",
        type=float,
        default=0.5,
        help="probability of one of brightness/contrast, noise, blur (0.5)",
    )
    data.add_argument(
        "--symmetry",
        default="dihedral",
        choices=sorted(SYMMETRIES),
        help="flips and rotations the labels are symmetric under, drawn in "
        "training and averaged by --tta: dihedral, all 8 (the tutorial's); "
        "hflip, left-right mirroring only; none",
    )
    data.add_argument(
        "--learn-offset",
        action="store_true",
        help="learn a constant offset of the labels from the images (ISBI 2012's "
        "sit 0.6 pixels above the membranes), which flips and rotations would "
        "blur: the views are drawn in the training loop and the logits, "
        "turned back, pass a learnt 3x3 convolution",
    )
    data.add_argument("--epoch-samples", type=int, help="training samples per epoch")
    data.add_argument(
        "--cache-mb",
        type=float,
        default=2048,
        metavar="MB",
        help="keep the decoded images and masks in memory when they fit in this "
        "many megabytes (0: decode every sample every epoch)",
    )
    model = p.add_argument_group("model")
    model.add_argument("--model", default="unet", choices=sorted(MODELS))
    model.add_argument("--base-features", type=int, default=32)
    model.add_argument(
        "--bilinear",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="bilinear upsampling instead of transposed convolutions (UNet)",
    )
    model.add_argument(
        "--norm",
        type=norm_choice,
        default="batch",
        metavar="NORM",
        help="batch (the tutorial's), instance (nnU-Net's) or group:G",
    )
    model.add_argument(
        "--act",
        type=act_choice,
        default="relu",
        metavar="ACT",
        help="relu (the tutorial's), leaky_relu[:SLOPE] (nnU-Net's, slope 0.01) or prelu",
    )
    model.add_argument("--backend", default="auto")
    run = p.add_argument_group("training")
    defaults = TrainConfig()
    run.add_argument("--out", default=defaults.out, help="output folder")
    run.add_argument("--epochs", type=int, default=defaults.epochs)
    run.add_argument("--batch-size", type=int, default=defaults.batch_size)
    run.add_argument("--lr", type=float, default=defaults.lr)
    run.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    run.add_argument("--loss", choices=sorted(LOSSES), help="default: bce_dice (binary), ce")
    run.add_argument("--pos-weight", type=float, help="BCE weight of positive pixels")
    run.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS])
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    run.add_argument(
        "--schedule",
        default=defaults.schedule,
        choices=["plateau", "cosine"],
        help="plateau: halve the rate when validation Dice stalls (the tutorial's); "
        "cosine: warm up, then decay to 0 at --epochs or --time-limit, "
        "whichever ends first",
    )
    run.add_argument(
        "--lr-patience",
        type=int,
        default=defaults.lr_patience,
        help="plateau: epochs without a better Dice before the rate is halved",
    )
    run.add_argument(
        "--warmup",
        type=float,
        default=defaults.warmup,
        help="cosine: fraction of the run with a linearly rising rate",
    )
    run.add_argument(
        "--patience",
        type=int,
        default=defaults.patience,
        help="early stopping after this many epochs without a better Dice",
    )
    run.add_argument(
        "--ema",
        type=float,
        default=defaults.ema,
        metavar="DECAY",
        help="validate and save an exponential moving average of the weights "
        "with this decay per step (e.g. 0.99); 0: the weights themselves",
    )
    run.add_argument(
        "--tta",
        action="store_true",
        help="validate on the mean over each image's views under --symmetry (all 8 "
        "flips and rotations by default: the paper's averaging; the validation "
        "work times the number of views)",
    )
    run.add_argument(
        "--time-limit",
        type=float,
        metavar="MINUTES",
        help="start no epoch after this many minutes of training (a resumed "
        "run counts the time before it)",
    )
    run.add_argument("--seed", type=int, default=defaults.seed)
    run.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    run.add_argument("--device", default="auto")
    run.add_argument("--resume", action="store_true", help="continue the run in --out")
    run.add_argument(
        "--sync-bn",
        action="store_true",
        help="distributed: BatchNorm statistics across all processes",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")


def crop_size(args) -> tuple[int, ...]:
    """--crop as one size per spatial axis."""
    crop = args.crop or [256 if args.spatial_dims == 2 else 64]
    if len(crop) not in (1, args.spatial_dims) or min(crop) < 1:
        raise ValueError(f"--crop takes 1 or {args.spatial_dims} positive sizes, got {crop}")
    return tuple(crop) * (args.spatial_dims // len(crop))


def volume_datasets(args):
    """datasets() for --spatial-dims 3: z-scored volumes, crops, flips and in-plane turns."""
    from .images import volume_shape
    from .volumes import SyntheticVolumes, VolumeFolder, VolumeTransform

    if args.learn_offset:
        raise ValueError("--learn-offset learns a 2-D label offset: not with --spatial-dims 3")
    crop = crop_size(args)
    augment = VolumeTransform(crop, args.symmetry, args.intensity_p)
    if args.data is None:
        train = SyntheticVolumes(32, crop, seed=args.seed, transform=augment)
        val = SyntheticVolumes(4, crop, seed=args.seed + 1)
        values = {"foreground_value": 255, "class_values": [0, 255]}
    else:
        image_dir, mask_dir = find_image_mask_folders(args.data)
        everything = VolumeFolder(image_dir, mask_dir, foreground=args.foreground)
        count, val_count = len(everything), validation_count(args, everything)
        # float32 volume + int32 mask per voxel (one channel assumed), read from the headers
        voxels = sum(math.prod(volume_shape(s.image)) for s in everything.samples)
        options = {"foreground": args.foreground, "cache": voxels * 8 <= args.cache_mb * 2**20}
        train = VolumeFolder(
            image_dir, mask_dir, indices=range(count - val_count), transform=augment, **options
        )
        val = VolumeFolder(image_dir, mask_dir, indices=range(count - val_count, count), **options)
        for part in (train, val):
            part.validate()
        values = class_values(everything)
    channels = train.load(0)[0].shape[-1]
    info = {
        "spatial_dims": 3,
        "normalisation": "zscore",
        "channels": channels,
        "mean": [0.0] * channels,  # z-scored when read
        "std": [1.0] * channels,
        "binary": train.binary,
        "num_classes": train.num_classes,
        "threshold": 0.5,
        "ignore_index": getattr(train, "ignore_index", None),
        **values,
    }
    return train, val, info


def validation_count(args, everything) -> int:
    """How many of the folder's last samples validate: --val-count, else 15%."""
    count = len(everything)
    val_count = args.val_count or max(1, round(0.15 * count))
    if not 0 < val_count < count:
        raise ValueError(
            f"{count} samples in {everything.image_dir} cannot leave {val_count} for "
            "validation and some for training"
        )
    return val_count


def class_values(dataset) -> dict:
    """The stored value of each class: what predicted masks are written in."""
    by_class = {}
    for value, index in sorted(dataset.classes.items(), reverse=True):
        by_class[index] = value
    return {
        "foreground_value": by_class.get(1, 255),
        "class_values": [by_class.get(k, k) for k in range(dataset.num_classes)],
    }


def datasets(args):
    """(train set, validation set, what the checkpoint records about the data)."""
    if args.spatial_dims == 3:
        return volume_datasets(args)
    from .augment import (
        GREY_MEAN,
        GREY_STD,
        IMAGENET_MEAN,
        IMAGENET_STD,
        train_transforms,
        val_transforms,
    )  # albumentations and OpenCV load only for a training run

    def augment(channels):
        return train_transforms(
            crop_size(args),
            channels,
            scale=args.crop_scale if args.resize else None,
            elastic_p=args.elastic_p,
            intensity_p=args.intensity_p,
            symmetry="none" if args.learn_offset else args.symmetry,
        )

    if args.data is None:
        channels = 1
        crop = crop_size(args)
        train = SyntheticCells(64, crop, seed=args.seed, transform=augment(1))
        val = SyntheticCells(16, crop, seed=args.seed + 1, transform=val_transforms(1))
        values = {"foreground_value": 255, "class_values": [0, 255]}
    else:
        image_dir, mask_dir = find_image_mask_folders(args.data)
        options = {"foreground": args.foreground}
        everything = SegmentationFolder(image_dir, mask_dir, **options)
        count, val_count = len(everything), validation_count(args, everything)
        first = read_image(everything.samples[0].image, everything.samples[0].page)
        channels = first.shape[2]
        # float32 image + int32 mask per pixel, the first sample's size taken for all
        cache_bytes = count * first[..., 0].size * 4 * (channels + 1)
        options["cache"] = cache_bytes <= args.cache_mb * 2**20
        train = SegmentationFolder(
            image_dir,
            mask_dir,
            indices=range(count - val_count),
            transform=augment(channels),
            **options,
        )
        val = SegmentationFolder(
            image_dir,
            mask_dir,
            indices=range(count - val_count, count),
            transform=val_transforms(channels),
            **options,
        )
        for part in (train, val):  # unexpected mask values fail now, not in epoch 7 (and the
            part.validate()  # cache is filled before any DataLoader worker forks)
        values = class_values(everything)
    mean, std = (GREY_MEAN, GREY_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    info = {
        "channels": channels,
        "mean": list(mean),
        "std": list(std),
        "binary": train.binary,
        "num_classes": train.num_classes,
        "threshold": 0.5,
        "ignore_index": getattr(train, "ignore_index", None),
        **values,
    }
    return train, val, info


def norm_choice(text: str):
    """--norm: batch | instance | group:G, as UNet's norm argument."""
    if text in ("batch", "instance"):
        return text
    name, _, groups = text.partition(":")
    if name == "group" and groups.isdigit() and int(groups) > 0:
        return ("group", int(groups))
    raise argparse.ArgumentTypeError(f"expected batch, instance or group:G, got {text!r}")


def act_choice(text: str):
    """--act: relu | prelu | leaky_relu[:SLOPE], as UNet's act argument."""
    if text in ("relu", "prelu"):
        return text
    name, _, slope = text.partition(":")
    if name == "leaky_relu":
        try:
            return ("leaky_relu", float(slope or 0.01))
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"expected relu, leaky_relu[:SLOPE] or prelu, got {text!r}")


def build_model(args, in_channels: int, out_channels: int):
    kwargs = {"base_features": args.base_features, "backend": args.backend}
    kwargs.update(spatial_dims=args.spatial_dims, norm=args.norm, act=args.act)
    if args.model in ("unet", "attention_unet", "resunet"):
        kwargs["bilinear"] = args.bilinear
    return MODELS[args.model](in_channels, out_channels, **kwargs)


def main(args) -> list:
    train, val, info = datasets(args)
    model = build_model(args, info["channels"], train.out_channels)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(
        **{k: v for k, v in vars(args).items() if k in fields}, progress=not args.quiet
    )
    if args.spatial_dims == 3:  # whole volumes may not fit: validate them as predict does
        config = dataclasses.replace(config, val_tile=crop_size(args))
    history = fit(model, train, val, config, info)
    if torch.distributed.is_initialized():  # started by fit under torchrun
        # no rank tears its connections down while rank 0 still saves (else gloo can abort);
        # after an error torchrun ends the other ranks itself
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return history
