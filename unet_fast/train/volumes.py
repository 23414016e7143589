"""3-D segmentation data: volume/mask folders (NIfTI, TIFF stacks), generated cell volumes, and
their augmentation.

Every sample is `(volume, mask)` as data.py's samples with a depth axis: the volume float32
C×D×H×W (z-scored per channel when read, see images.zscore), the mask float32 1×D×H×W (binary)
or int64 D×H×W (class indices). A transform is called as `transform(image=D×H×W×C float32,
mask=D×H×W int32)` and returns a dict with "image" and "mask".
"""

import math
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from .data import FileKind, SegmentationFolder, _SegmentationData, pair_files
from .images import (
    is_volume,
    read_volume,
    read_volume_mask,
    volume_shape,
    volume_stem,
    zscore,
)
from .symmetry import check_symmetry
from .synthetic import cell_volume


class VolumeTransform:
    """Random crops of `size` (D, H, W) (volumes smaller than it mirrored out first), the
    in-plane flips and quarter turns of `symmetry` on volume and mask together, then with
    probability `intensity_p` one of brightness/contrast, Gaussian noise or blur on the volume
    (albumentations; the 3-D transforms take `volume`/`mask3d`, intensity the slices as
    `images`, which share one draw). Seed it as any albumentations pipeline (data.seed_transform).
    """

    def __init__(self, size, symmetry: str = "dihedral", intensity_p: float = 0.5):
        import albumentations as A

        check_symmetry(symmetry)
        self.size = tuple(size)
        turns = {
            "dihedral": [A.RandomRotate90(p=0.5), A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)],
            "hflip": [A.HorizontalFlip(p=0.5)],
            "none": [],
        }[symmetry]
        self.geometry = A.Compose([A.RandomCrop3D(size=self.size), *turns])
        noise = (math.sqrt(10) / 255, math.sqrt(50) / 255)  # the 2-D pipeline's (augment.py)
        self.intensity = A.Compose(
            [
                A.OneOf(
                    [
                        A.RandomBrightnessContrast(p=1),
                        A.GaussNoise(std_range=noise, p=1),
                        A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.8, 0.8), p=1),
                    ],
                    p=intensity_p,
                )
            ]
        )
        self.transforms = [self.geometry, self.intensity]  # what seed_transform visits

    def set_random_seed(self, seed: int) -> None:
        """Nothing of its own to seed: seed_transform seeds the two pipelines."""

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> dict:
        short = [max(want - have, 0) for want, have in zip(self.size, mask.shape, strict=True)]
        if any(short):
            pads = [(0, n) for n in short]
            image = np.pad(image, [*pads, (0, 0)], mode="symmetric")
            mask = np.pad(mask, pads, mode="symmetric")
        out = self.geometry(volume=image, mask3d=mask)
        image = self.intensity(images=np.ascontiguousarray(out["volume"]))["images"]
        return {"image": image, "mask": out["mask3d"]}


class VolumeSample(NamedTuple):
    name: str
    image: Path
    mask: Path


VOLUMES = FileKind(is_volume, volume_stem, "NIfTI or TIFF volumes", ("volumes", "a volume"))


def pair_volumes(image_dir: Path, mask_dir: Path, mask_suffix: str = "") -> list[VolumeSample]:
    """Volumes and masks paired by name, their sizes checked from the headers."""
    samples = []
    for name, image, mask in pair_files(image_dir, mask_dir, mask_suffix, VOLUMES):
        sample = VolumeSample(name, image, mask)
        _check_shape(sample, volume_shape(image), volume_shape(mask))
        samples.append(sample)
    return samples


def _check_shape(sample: VolumeSample, image_shape, mask_shape) -> None:
    if tuple(image_shape) != tuple(mask_shape):
        raise ValueError(
            f"{sample.name}: mask size {'x'.join(map(str, mask_shape))} does not match volume "
            f"size {'x'.join(map(str, image_shape))} (DxHxW) ({sample.image} and {sample.mask})"
        )


class VolumeFolder(SegmentationFolder):
    """Volumes (NIfTI `.nii`/`.nii.gz`, multi-page TIFF) in one folder, masks in another, paired
    by name; SegmentationFolder's options (classes, foreground, ignore_index, binary, channels,
    transform, indices, mask_suffix, cache) mean the same. Volumes are z-scored per channel as
    they are read; `load` gives D×H×W×C float32 and D×H×W int32 classes."""

    pair = staticmethod(pair_volumes)

    def read(self, sample: VolumeSample) -> tuple[np.ndarray, np.ndarray]:
        image = read_volume(sample.image, self.channels)
        raw = read_volume_mask(sample.mask)
        _check_shape(sample, image.shape[:3], raw.shape)
        return image, raw


class SyntheticVolumes(_SegmentationData):
    """Generated cell volumes (synthetic.cell_volume) with known masks, so 3-D training runs
    without data; z-scored as read volumes are. Sample `i` depends only on (seed, i). Binary
    (membrane = 1) by default; `multiclass=True`: 0 interior, 1 membrane, 2 organelle."""

    def __init__(
        self,
        length: int = 16,
        size: int | Sequence[int] = 48,
        *,
        seed: int = 0,
        multiclass: bool = False,
        cell_size: float = 16.0,
        noise: float = 0.05,
        transform: Callable | None = None,
    ):
        self.length, self.seed, self.channels = length, seed, 1
        self.size = (size,) * 3 if isinstance(size, int) else tuple(size)
        self.multiclass, self.cell_size, self.noise = multiclass, cell_size, noise
        self.transform, self.binary = transform, not multiclass
        self.num_classes, self.ignore_index = (3 if multiclass else 2), None

    def __len__(self) -> int:
        return self.length

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.length:
            raise IndexError(f"sample {index} out of range for {self.length} samples")
        rng = np.random.default_rng([self.seed, index])
        volume, classes = cell_volume(rng, self.size, self.cell_size, self.noise)
        mask = classes if self.multiclass else (classes == 1).astype(np.int32)
        return zscore(volume[..., None]), mask
