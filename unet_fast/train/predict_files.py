"""`unet-fast predict CHECKPOINT INPUTS... --out DIR`: reads images and TIFF stacks as training
read them, predicts them with the checkpoint's model (predict.py) and writes masks in the
training masks' values beside overlays; every bad input is refused before anything is written."""

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, load_model
from .images import (
    is_image,
    is_volume,
    page_sizes,
    read_image,
    read_volume,
    volume_stem,
    write_volume_mask,
)
from .offset import load_offset
from .predict import predict_averaged
from .tiling import BLENDS


def _device(name) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but no CUDA GPU is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPUs are present")
    return device


def _data_entry(state: dict, path, model) -> dict:
    """The checkpoint's record of how images were prepared, checked against the model."""
    data = state.get("data")
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path} records no 'data' entry (channels, normalisation, "
            "classes): it cannot be used for prediction"
        )
    binary = data.get("binary")
    keys = (
        "channels",
        "mean",
        "std",
        "binary",
        "num_classes",
        "threshold",
        "foreground_value" if binary else "class_values",
    )
    missing = [key for key in keys if key not in data]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint's 'data' entry lacks {', '.join(missing)}")
    if data["channels"] != model.in_channels:
        raise CheckpointError(
            f"{path}: 'data' records {data['channels']} channels but the model "
            f"takes {model.in_channels}"
        )
    outputs = 1 if binary else len(data["class_values"])
    if model.num_classes != outputs:
        raise CheckpointError(
            f"{path}: the model has {model.num_classes} outputs, but 'data' "
            f"describes {'a binary task' if binary else f'{outputs} classes'}"
        )
    return data


def _collect(inputs, wanted=is_image, what="PNG or TIFF images") -> list[Path]:
    """Image files: each file as given, each folder's `wanted` files sorted by name."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                p
                for p in item.iterdir()
                if p.is_file() and wanted(p) and not p.name.startswith(".")
            )
            if not found:
                raise ValueError(f"folder {item} holds no {what}")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    if not files:
        raise ValueError("no input images given")
    unique = {}
    for path in files:  # the same file named twice (itself and its folder) is predicted once
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _unreadable(path: Path, error: Exception) -> ValueError:
    """One line naming the file, whatever PIL, tifffile or zlib raised."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, ValueError) and str(path) in message:  # read_image's own message
        return ValueError(message)
    return ValueError(f"{path} is not a readable image ({type(error).__name__}: {message})")


def _read(path: Path, page: int, channels: int) -> np.ndarray:
    try:
        return read_image(path, page, channels)
    except Exception as error:
        raise _unreadable(path, error) from None


def _samples(files: list[Path], channels: int) -> list[tuple[Path, int, str]]:
    """(file, page, output stem) for every image and TIFF page. Every file's first page is read
    here, so an unreadable file or a wrong channel count fails before anything is written."""
    samples = []
    quiet = logging.getLogger("tifffile")  # it logs each defect of a broken file; we raise one
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        for path in files:
            try:
                pages = len(page_sizes(path))
            except Exception as error:
                raise _unreadable(path, error) from None
            if pages == 0:
                raise ValueError(f"{path} is not a readable image (no pages)")
            _read(path, 0, channels)
            digits = len(str(pages - 1))
            samples += [
                (path, page, path.stem if pages == 1 else f"{path.stem}_p{page:0{digits}d}")
                for page in range(pages)
            ]
    finally:
        quiet.setLevel(level)
    return samples


def _outputs(samples, out_dir: Path) -> list[tuple[Path, Path]]:
    """(mask, overlay) paths; refuses names two inputs share or that would replace an input."""
    owners: dict[str, Path] = {}
    for path, _, stem in samples:
        if owners.setdefault(stem, path) != path:
            raise ValueError(
                f"{owners[stem]} and {path} would both write {stem}_mask.png: "
                "predict them into separate folders"
            )
    outputs = [
        (out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png") for _, _, stem in samples
    ]
    inputs = {path.resolve() for path, _, _ in samples}
    for target in (t for pair in outputs for t in pair):
        if target.resolve() in inputs:
            raise ValueError(
                f"writing {target} would replace an input image: choose another --out folder"
            )
    return outputs


def _output_folder(out_dir) -> Path:
    """Creates `out_dir` if needed and proves it writable with a temporary file."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        raise ValueError(
            f"output folder {out_dir} is not writable ({error.strerror or error})"
        ) from None
    return out_dir


def _mask_values(logits: torch.Tensor, data: dict) -> tuple[np.ndarray, np.ndarray]:
    """(class index per pixel, mask in the training masks' value convention)."""
    if data["binary"]:
        classes = (torch.sigmoid(logits[0]) > data["threshold"]).numpy().astype(np.int64)
        foreground = int(data["foreground_value"])
        values = np.array([255 if foreground == 0 else 0, foreground])
    else:
        classes = logits.argmax(0).numpy()
        values = np.asarray(data["class_values"])
    mask = values[classes]
    return classes, mask.astype(np.uint8 if mask.max(initial=0) <= 255 else np.uint16)


def overlay(image: np.ndarray, classes: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """An RGB uint8 picture of `image` (H×W×C in [0, 1]; grey, RGB, else its first channel)
    with every class but 0 (background) coloured semi-transparently from matplotlib's tab10."""
    from matplotlib import colormaps

    picture = image if image.shape[-1] == 3 else np.repeat(image[..., :1], 3, axis=-1)
    low, high = float(picture.min(initial=0)), float(picture.max(initial=1))
    if low < 0 or high > 1:  # float images in their own range: stretch for display
        picture = (picture - low) / max(high - low, 1e-12)
    palette = np.asarray(colormaps["tab10"].colors, np.float32)
    colours = palette[(classes - 1) % len(palette)]
    blended = np.where(classes[..., None] > 0, (1 - alpha) * picture + alpha * colours, picture)
    return np.clip(np.rint(blended * 255), 0, 255).astype(np.uint8)


def predict_files(
    checkpoint,
    inputs,
    out_dir,
    *,
    tile: int | None = None,
    overlap: int = 32,
    batch_size: int = 4,
    device=None,
    progress: bool = False,
    tta: bool = False,
    blend: str = "cosine",
) -> list[Path]:
    """Predicts every image in `inputs` (files and folders; every page of a TIFF stack) with the
    model in `checkpoint` and writes `<stem>_mask.png` and `<stem>_overlay.png` (TIFF stack pages
    `<stem>_p<page>_...`) to `out_dir`. Returns the written paths, mask then overlay per image.
    A 3-D model's inputs are volumes (NIfTI, TIFF stacks), z-scored as training read them, and
    each gets `<stem>_mask.nii.gz` (the input's affine) or `<stem>_mask.tif`.

    Images are read and normalised as the checkpoint's "data" entry records. Binary masks hold
    `foreground_value` for the positive class and the other of 0/255 elsewhere; multi-class
    masks hold `class_values[argmax]`. `device` None picks CUDA when present. `tta` averages
    the views the model was trained under (the checkpoint's `symmetry`); a learnt label offset
    (`--learn-offset`) is applied to the logits. `tile` (default 256, 128 for volumes), `overlap`,
    `batch_size`, `blend`: see predict.predict_tiled.

    Grey and RGB images are converted to the model's channel count as training reads them.
    Errors, raised before anything is written: FileNotFoundError for a missing input,
    CheckpointError for a bad checkpoint, ValueError for no images, an unreadable image (every
    file's first page is read up front), a channel count the model cannot take, two inputs
    with one output name, or an output folder that is not writable. Nothing but the named
    outputs is ever written to.
    """
    from tqdm import tqdm

    from .augment import val_transforms  # albumentations and OpenCV: loaded when predicting

    device = _device(device)
    model, state = load_model(checkpoint, map_location=device)
    data = _data_entry(state, checkpoint, model)
    symmetry = state.get("config", {}).get("symmetry", "dihedral")  # --tta: the training's views
    three_d = getattr(model, "spatial_dims", 2) == 3
    tile = tile or (128 if three_d else 256)
    tiling = {"tile": tile, "overlap": overlap, "batch_size": batch_size, "blend": blend}
    if three_d:
        volumes = _collect(inputs, is_volume, "NIfTI or TIFF volumes")
        return _predict_volumes(model, data, volumes, Path(out_dir), tta, symmetry, tiling)
    files = _collect(inputs)
    offset = load_offset(state, model.num_classes, checkpoint)
    samples = _samples(files, data["channels"])
    out_dir = Path(out_dir)
    outputs = _outputs(samples, out_dir)
    _output_folder(out_dir)
    transform = val_transforms(data["channels"], mean=data["mean"], std=data["std"])

    written = []
    for (path, page, _), (mask_path, overlay_path) in zip(
        tqdm(samples, desc="predict", unit="image", file=sys.stderr, disable=not progress),
        outputs,
        strict=True,
    ):
        image = _read(path, page, data["channels"])
        x = transform(image=image)["image"]
        logits = predict_averaged(model, x, tta, symmetry, **tiling)
        if offset is not None:  # the labels' learnt offset (--learn-offset)
            with torch.inference_mode():
                logits = offset(logits[None])[0]
        logits = logits.cpu()
        classes, mask = _mask_values(logits, data)
        _save_png(mask, mask_path)
        _save_png(overlay(image, classes), overlay_path)
        written += [mask_path, overlay_path]
    return written


def _predict_volumes(model, data, files, out_dir, tta, symmetry, tiling) -> list[Path]:
    """predict_files for a 3-D model: every volume read (z-scored) and checked before anything
    is written; masks as NIfTI (with the input's affine) or TIFF stacks, as the input was."""
    suffixes = {
        p: ".nii.gz" if p.name.lower().endswith((".nii", ".nii.gz")) else ".tif" for p in files
    }
    outputs = [out_dir / f"{volume_stem(p)}_mask{suffixes[p]}" for p in files]
    if len(set(outputs)) < len(outputs):
        raise ValueError("two input volumes share a name: predict them into separate folders")
    if {o.resolve() for o in outputs} & {p.resolve() for p in files}:
        raise ValueError("a mask would replace an input volume: choose another --out folder")
    volumes = []
    for path in files:  # every volume read up front: a bad one fails before anything is written
        try:
            volumes.append(read_volume(path, data["channels"]))
        except Exception as error:
            raise _unreadable(path, error) from None
    _output_folder(out_dir)
    for path, volume, output in zip(files, volumes, outputs, strict=True):
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, -1, 0)))
        logits = predict_averaged(model, x, tta, symmetry, **tiling).cpu()
        write_volume_mask(_mask_values(logits, data)[1], output, like=path)
    return outputs


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG")


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `unet-fast predict`."""
    parser.add_argument("checkpoint", help="a checkpoint saved by `unet-fast train`")
    parser.add_argument(
        "inputs",
        nargs="+",
        help="images (PNG, TIFF stacks) or folders of them; volumes (NIfTI, TIFF stacks) for "
        "a 3-D model",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder for <stem>_mask.png and <stem>_overlay.png",
    )
    parser.add_argument(
        "--tile",
        type=int,
        help="largest model input per tile along each axis, in pixels (default 256 for "
        "images, 128 for volumes)",
    )
    parser.add_argument(
        "--overlap",
        type=int,
        default=32,
        help="least overlap of neighbouring tiles, in pixels (default 32)",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass")
    parser.add_argument(
        "--blend",
        default="cosine",
        choices=BLENDS,
        help="how overlapping tiles combine: cosine ramps (default) or a plain mean (constant, "
        "MONAI's sliding_window_inference default)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 ... (default: cuda when present, else cpu)",
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="average each image's flips and 90-degree rotations: the views "
        "the model was trained with (--symmetry; all 8 by default)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> list[Path]:
    """Runs `unet-fast predict`. Every failure is a ValueError (CheckpointError included) with a
    one-line message, so the command can print it and exit with status 2."""
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.overlap < 0:
        raise ValueError("--overlap must not be negative")
    try:
        written = predict_files(
            args.checkpoint,
            args.inputs,
            args.out,
            tile=args.tile,
            overlap=args.overlap,
            batch_size=args.batch_size,
            device=args.device,
            progress=not args.quiet,
            tta=args.tta,
            blend=args.blend,
        )
    except OSError as error:  # a missing input, or a disk failing mid-run
        raise ValueError(str(error)) from None
    overlays = sum(path.name.endswith("_overlay.png") for path in written)
    what = "masks and overlays" if overlays else "masks"
    print(f"wrote {len(written) - overlays} {what} to {args.out}")
    return written
