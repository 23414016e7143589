"""The tutorial's augmentation pipeline on albumentations 2.x.

Inputs are what the data sets of data.py hand a transform: an H×W×C float32 image in [0, 1]
and an H×W int32 mask of class indices. Geometric transforms move image and mask together (the
mask with nearest-neighbour interpolation, so it keeps its class values); intensity transforms
touch the image only. The output is a normalised C×H×W image tensor and an H×W mask tensor.

Where albumentations 2.x changed an argument or a default, the value here reproduces what the
tutorial's call did on 1.x; the comments say which.
"""

import math

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from .symmetry import check_symmetry

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = (0.449,), (0.226,)  # ImageNet's statistics averaged over RGB


def normalize(channels: int, mean=None, std=None) -> A.Normalize:
    """(x - mean) / std per channel for images in [0, 1]: ImageNet's statistics for RGB, their
    channel average for grey, unless given."""
    if channels not in (1, 3) and (mean is None or std is None):
        raise ValueError(f"no default statistics for {channels} channels: pass mean and std")
    mean = mean if mean is not None else (IMAGENET_MEAN if channels == 3 else GREY_MEAN)
    std = std if std is not None else (IMAGENET_STD if channels == 3 else GREY_STD)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need {channels} values, got {len(mean)} and {len(std)}")
    return A.Normalize(mean=mean, std=std, max_pixel_value=1.0)


def train_transforms(
    size: int | tuple[int, int],
    channels: int = 1,
    *,
    mean=None,
    std=None,
    scale: tuple[float, float] | None = (0.5, 1.0),
    elastic_p: float = 0.3,
    intensity_p: float = 0.5,
    symmetry: str = "dihedral",
) -> A.Compose:
    """Rot90, flips, random resized crop to `size` (H, W) and elastic deformation on image and
    mask; one of brightness/contrast, Gauss noise or blur on the image; normalisation.

    `symmetry`: "dihedral" draws from all 8 flips and rotations (the tutorial's), "hflip" only
    mirrors left-right, "none" neither (see `symmetry.SYMMETRIES`).

    `scale`: the crop's area as a fraction of the image before resizing (its aspect ratio is
    drawn too); None crops at the image's own resolution: resizing moves a thin structure's
    edges in the image and (nearest-neighbour) in the mask differently, noise at the very pixels
    a boundary task is scored on."""
    height, width = (size, size) if isinstance(size, int) else size
    if scale is None:  # images smaller than the crop are mirrored out to it
        crop = A.RandomCrop(height, width, pad_if_needed=True, border_mode=cv2.BORDER_REFLECT_101)
    else:
        crop = A.RandomResizedCrop(
            size=(height, width),
            scale=scale,  # 1.x: (h, w) positional
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
        )
    check_symmetry(symmetry)
    # Rotations and flips before the crop, not after as in the tutorial: the same distribution,
    # but a non-square crop keeps its (H, W) and batches still stack.
    symmetries = {
        "dihedral": [A.RandomRotate90(p=0.5), A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)],
        "hflip": [A.HorizontalFlip(p=0.5)],
        "none": [],
    }
    return A.Compose(
        [
            *symmetries[symmetry],
            crop,
            # 1.x drew uniform noise and mirrored at the border; 2.x defaults to Gaussian noise (1.7x
            # stronger) and a constant fill, which would paint class 0 into the mask.
            A.ElasticTransform(
                alpha=120,
                sigma=120 * 0.05,
                noise_distribution="uniform",
                border_mode=cv2.BORDER_REFLECT_101,
                mask_interpolation=cv2.INTER_NEAREST,
                p=elastic_p,
            ),
            A.OneOf(
                [
                    A.RandomBrightnessContrast(p=1),
                    # 1.x's default var_limit=(10, 50) on the 0-255 scale, as 2.x's std fraction
                    A.GaussNoise(std_range=(math.sqrt(10) / 255, math.sqrt(50) / 255), p=1),
                    # 1.x's blur_limit=3 with sigma from the kernel size (OpenCV: 0.8 for 3x3);
                    # 2.x draws sigma in (0.5, 3) by default and sigma_limit=0 gives NaN
                    A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.8, 0.8), p=1),
                ],
                p=intensity_p,
            ),
            normalize(channels, mean, std),
            ToTensorV2(),
        ]
    )


def val_transforms(channels: int = 1, *, mean=None, std=None) -> A.Compose:
    """Normalisation only: whole images at their own size, so validation scores every pixel."""
    return A.Compose([normalize(channels, mean, std), ToTensorV2()])
