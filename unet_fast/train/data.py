"""Segmentation data sets: image/mask folders (PNG, TIFF stacks), the ISBI 2012 layout, and
generated cells for runs without data.

Every sample is `(image, mask)`: the image a float32 tensor C×H×W (values in [0, 1] unless a
transform normalises them), the mask a float32 tensor 1×H×W of 0/1 for binary tasks or an int64
tensor H×W of class indices for multi-class tasks; ignored pixels hold `ignore_index` in both.
A transform is called as `transform(image=HxWxC float32 array, mask=HxW int32 array)` and
returns a dict with "image" and "mask" (albumentations' convention, see augment.py). The
files themselves are read by images.py.
"""

import os
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .images import is_image, page_sizes, read_image, read_mask
from .synthetic import cell_sample

ISBI_TRAIN, ISBI_VAL = range(0, 20), range(20, 24)  # contiguous: neighbouring slices correlate


def _listing(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def binary_classes(foreground: int | None = None) -> dict[int, int]:
    """The value→class mapping of a binary mask stored as 0/1 or 0/255. By default 0 is
    background and 1 or 255 foreground; `foreground=0` makes black the positive class (ISBI 2012,
    where membrane = 0); any other stored value is an error, not silently background."""
    if foreground is None:
        return {0: 0, 1: 1, 255: 1}
    return {value: int(value == foreground) for value in {0, 1, 255, foreground}}


def map_mask(
    mask: np.ndarray,
    classes: Mapping[int, int],
    ignore_index: int | None = None,
    name: str = "mask",
) -> np.ndarray:
    """Stored values → class indices (int32). A stored value equal to `ignore_index` and absent
    from `classes` stays ignored; any other value not in `classes` is a ValueError naming it."""
    table = dict(classes)
    if ignore_index is not None:
        table.setdefault(ignore_index, ignore_index)
    values = np.unique(mask)
    unexpected = [int(v) for v in values if int(v) not in table]
    if unexpected:
        raise ValueError(
            f"{name}: unexpected mask values {_listing([str(v) for v in unexpected])}"
            f"; the class mapping covers {sorted(table)}"
        )
    keys = np.array(sorted(table))
    targets = np.array([table[k] for k in keys], np.int32)
    return targets[np.searchsorted(keys, mask)]


def _sample_tensors(
    image: np.ndarray, mask: np.ndarray, transform: Callable | None, binary: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if transform is not None:
        out = transform(image=image, mask=mask)
        image, mask = out["image"], out["mask"]
    if isinstance(image, np.ndarray):  # no ToTensorV2 (or no transform): (D×)H×W×C
        image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))
    mask = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask).long()
    if binary:
        return image.float().contiguous(), mask.float().unsqueeze(0)
    return image.float().contiguous(), mask


def seed_transform(transform, seed: int) -> None:
    """Seeds an albumentations pipeline so that each transform in it draws from a stream of its
    own. albumentations' `set_random_seed` hands every child the same seed, so two transforms
    that draw alike agree on every sample: HorizontalFlip and VerticalFlip (p=0.5 each) would
    always flip together and no mirror image would ever be drawn. Others are left alone."""

    def visit(node, sequence: np.random.SeedSequence) -> None:
        node.set_random_seed(int(sequence.generate_state(1)[0]))  # a Compose reseeds its
        children = getattr(node, "transforms", [])  # children: overwritten next
        for child, child_sequence in zip(children, sequence.spawn(len(children))):
            if hasattr(child, "set_random_seed"):
                visit(child, child_sequence)

    if hasattr(transform, "set_random_seed"):
        visit(transform, np.random.SeedSequence(seed))


class _SegmentationData(Dataset):
    """What both data sets share: the task's shape and how a sample becomes tensors."""

    transform: Callable | None = None
    binary: bool = True
    num_classes: int = 2
    _worker_seed: int | None = None

    @property
    def out_channels(self) -> int:
        """Channels of a model's logits for this task: 1 for binary, else the class count."""
        return 1 if self.binary else self.num_classes

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _seed_transform_in_worker(self) -> None:
        """albumentations' Compose keeps its own generator, which DataLoader workers inherit
        unchanged: every worker, in every epoch, would draw the same augmentations. Each worker
        reseeds it from its torch seed, which differs per worker and epoch and follows
        torch.manual_seed. In the main process seed it yourself: seed_transform."""
        info = get_worker_info()
        if info is None or info.seed == self._worker_seed:
            return
        seed_transform(self.transform, info.seed)
        self._worker_seed = info.seed

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        self._seed_transform_in_worker()
        return _sample_tensors(image, mask, self.transform, self.binary)


class Sample(NamedTuple):
    name: str  # the file stem, with "#page" for a page of a TIFF stack
    image: Path
    mask: Path
    page: int


def _files(folder: Path, what: str, kind: "FileKind") -> dict[str, Path]:
    """The folder's files of `kind` (a FileKind) by name, hidden files left out."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if kind.wanted(path) and not path.name.startswith("."):
            name = kind.name(path)
            if name in found:
                raise ValueError(
                    f"{folder}: two files named {name}: {found[name].name} and {path.name}"
                )
            found[name] = path
    if not found:
        raise ValueError(f"{what} folder {folder} holds no {kind.description}")
    return found


class FileKind(NamedTuple):
    """The files a data set pairs: which to take, the name they pair by, what they are called."""

    wanted: Callable[[Path], bool]
    name: Callable[[Path], str]
    description: str  # "PNG or TIFF files"
    nouns: tuple[str, str]  # ("images", "an image")


IMAGES = FileKind(is_image, lambda path: path.stem, "PNG or TIFF files", ("images", "an image"))


def pair_files(
    image_dir: Path, mask_dir: Path, mask_suffix: str, kind: FileKind = IMAGES
) -> list[tuple[str, Path, Path]]:
    """(name, image, mask) of the images and masks paired by name (`mask_suffix` after the
    mask's); ValueError listing the files of either folder without a partner."""
    images, masks = _files(image_dir, "image", kind), _files(mask_dir, "mask", kind)
    lonely_images = [images[s].name for s in images if s + mask_suffix not in masks]
    names = {s + mask_suffix for s in images}
    lonely_masks = [p.name for s, p in masks.items() if s not in names]
    problems = []
    if lonely_images:
        problems.append(f"{kind.nouns[0]} without a mask in {mask_dir}: {_listing(lonely_images)}")
    if lonely_masks:
        problems.append(f"masks without {kind.nouns[1]} in {image_dir}: {_listing(lonely_masks)}")
    if problems:
        raise ValueError("; ".join(problems))
    return [(name, image, masks[name + mask_suffix]) for name, image in images.items()]


def _check_size(sample: Sample, image_size, mask_size) -> None:
    if tuple(image_size) != tuple(mask_size):
        raise ValueError(
            f"{sample.name}: mask size {mask_size[0]}x{mask_size[1]} does not match "
            f"image size {image_size[0]}x{image_size[1]} (HxW) "
            f"({sample.image} and {sample.mask})"
        )


def _pair(image_dir: Path, mask_dir: Path, mask_suffix: str) -> list[Sample]:
    samples = []
    for stem, image, mask in pair_files(image_dir, mask_dir, mask_suffix):
        sizes, mask_sizes = page_sizes(image), page_sizes(mask)
        if len(sizes) != len(mask_sizes):
            raise ValueError(
                f"{image.name}: {len(sizes)} pages but its mask {mask.name} has {len(mask_sizes)}"
            )
        for page, (size, mask_size) in enumerate(zip(sizes, mask_sizes, strict=True)):
            sample = Sample(stem if len(sizes) == 1 else f"{stem}#{page}", image, mask, page)
            _check_size(sample, size, mask_size)
            samples.append(sample)
    return samples


class SegmentationFolder(_SegmentationData):
    """Images in one folder, masks in another, paired by file stem (`mask_suffix` allows
    "01.png" ↔ "01_mask.png"). PNG and TIFF; every page of a multi-page TIFF is one sample.

    Classes: `classes` maps stored mask values to class indices ({0: 1, 255: 0} makes black the
    positive class of a binary task). Without it the task is binary with `binary_classes
    (foreground)`. The task is binary when the classes are {0, 1}, unless `binary=False` (two
    classes trained with cross-entropy). Stored values equal to `ignore_index` stay ignored.
    `indices` picks samples (sorted by name, pages in order) — e.g. `ISBI_TRAIN`. `cache=True`
    keeps each sample once read (decoded and mapped), so later epochs skip the decoding;
    `validate()` fills it, and DataLoader workers forked after that share it.

    File pairing and sizes are checked on construction; mask values when a sample is read, or all
    at once with `validate()`. Problems raise ValueError naming the file (FileNotFoundError for a
    missing folder).
    """

    def __init__(
        self,
        image_dir,
        mask_dir,
        *,
        classes: Mapping[int, int] | None = None,
        foreground: int | None = None,
        ignore_index: int | None = None,
        binary: bool | None = None,
        channels: int | None = None,
        transform: Callable | None = None,
        indices: Sequence[int] | None = None,
        mask_suffix: str = "",
        cache: bool = False,
    ):
        if classes is not None and foreground is not None:
            raise ValueError("give either classes or foreground, not both")
        self.classes = dict(classes) if classes is not None else binary_classes(foreground)
        targets = {c for c in self.classes.values() if c != ignore_index}
        if any(c < 0 for c in targets):
            raise ValueError(f"class indices must be non-negative, got {sorted(targets)}")
        self.num_classes = max(targets) + 1 if targets else 0
        self.binary = self.num_classes <= 2 if binary is None else binary
        if self.binary and self.num_classes > 2:
            raise ValueError(f"binary=True but the mapping has {self.num_classes} classes")
        self.num_classes = max(self.num_classes, 2) if self.binary else self.num_classes
        self.ignore_index, self.channels, self.transform = ignore_index, channels, transform
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        samples = self.pair(self.image_dir, self.mask_dir, mask_suffix)
        if indices is not None:
            bad = [i for i in indices if not -len(samples) <= i < len(samples)]
            if bad:
                raise ValueError(
                    f"sample indices {bad} out of range: {self.image_dir} holds "
                    f"{len(samples)} samples"
                )
            samples = [samples[i] for i in indices]
        self.samples = samples
        self._cache = {} if cache else None

    pair = staticmethod(_pair)  # (image folder, mask folder, mask suffix) -> samples

    def read(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """(image H×W×C float32, stored mask values H×W) of a sample, their sizes checked."""
        image = read_image(sample.image, sample.page, self.channels)
        raw = read_mask(sample.mask, sample.page)
        _check_size(sample, image.shape[:2], raw.shape)
        return image, raw

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample `index` before any transform: image H×W×C float32, mask H×W int32 classes."""
        if self._cache is not None and index in self._cache:  # copies: transforms may write
            return tuple(array.copy() for array in self._cache[index])
        sample = self.samples[index]
        image, raw = self.read(sample)
        mask = map_mask(raw, self.classes, self.ignore_index, str(sample.mask))
        if self._cache is not None:
            self._cache[index] = image.copy(), mask.copy()
        return image, mask

    def validate(self) -> None:
        """Read every sample once, raising the first problem (unexpected mask values, ...)."""
        for index in range(len(self)):
            self.load(index)


def find_image_mask_folders(root) -> tuple[Path, Path]:
    """(image folder, mask folder) of a data root laid out as ISBI 2012 (`train/image`,
    `train/label`) or as `image(s)/` beside `label(s)/` or `mask(s)/`, with or without `train/`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    for base in (root / "train", root):
        for images in ("image", "images"):
            for masks in ("label", "labels", "mask", "masks"):
                if (base / images).is_dir() and (base / masks).is_dir():
                    return base / images, base / masks
    raise FileNotFoundError(
        f"no image/mask folders in {root}: expected train/image and "
        "train/label (ISBI 2012), or images/ beside masks/ or labels/"
    )


def default_isbi_root() -> Path | None:
    """The ISBI 2012 data if present: $UNET_FAST_ISBI, else ../shared/data/isbi2012 beside the
    repository or the working directory (where the project keeps it; it is not redistributed)."""
    beside = Path("..") / "shared" / "data" / "isbi2012"
    candidates = [
        os.environ.get("UNET_FAST_ISBI"),
        Path(__file__).resolve().parents[2] / beside,
        Path.cwd() / beside,
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train" / "image").is_dir():
            return Path(candidate).resolve()
    return None


def isbi2012(root, split: str = "train", **options) -> SegmentationFolder:
    """The ISBI 2012 training slices as a binary task with membrane (stored 0) the positive
    class; split "train" is slices 00–19, "val" 20–23, "all" 00–23. Other options go to
    SegmentationFolder (transform, channels, ...)."""
    indices = {"train": ISBI_TRAIN, "val": ISBI_VAL, "all": None}
    if split not in indices:
        raise ValueError(f"split must be one of {sorted(indices)}, got {split!r}")
    image_dir, mask_dir = find_image_mask_folders(root)
    return SegmentationFolder(image_dir, mask_dir, foreground=0, indices=indices[split], **options)


class SyntheticCells(_SegmentationData):
    """Generated cell-like images with known masks, so training runs without any data: tightly
    packed cells with wavy dark membranes (a Voronoi tessellation under a smooth warp), some
    with a dark organelle, blurred and noisy. Sample `i` depends only on (seed, i).

    Binary (default): membrane = 1, as ISBI 2012 with `foreground=0`. `multiclass=True`: classes
    0 interior, 1 membrane, 2 organelle.
    """

    def __init__(
        self,
        length: int = 64,
        size: int | tuple[int, int] = 128,
        *,
        seed: int = 0,
        multiclass: bool = False,
        channels: int = 1,
        cell_size: float = 24.0,
        noise: float = 0.05,
        transform: Callable | None = None,
    ):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.length, self.seed, self.channels = length, seed, channels
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.multiclass, self.cell_size, self.noise = multiclass, cell_size, noise
        self.transform = transform
        self.binary = not multiclass
        self.num_classes = 3 if multiclass else 2
        self.ignore_index = None

    def __len__(self) -> int:
        return self.length

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample `index` before any transform: image H×W×C float32, mask H×W int32 classes."""
        if not 0 <= index < self.length:
            raise IndexError(f"sample {index} out of range for {self.length} samples")
        rng = np.random.default_rng([self.seed, index])
        image, classes = cell_sample(rng, self.size, self.cell_size, self.noise)
        mask = classes if self.multiclass else (classes == 1).astype(np.int32)
        return np.repeat(image[..., None], self.channels, axis=-1), mask
