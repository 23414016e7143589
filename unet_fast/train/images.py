"""Reading image and mask files, PNG and TIFF stacks, as training and prediction both see them:
images as float32 H×W×C in [0, 1], masks as the stored values."""

from pathlib import Path

import numpy as np

SUFFIXES = (".png", ".tif", ".tiff")


def is_image(path: Path) -> bool:
    """A PNG or TIFF file by its suffix."""
    return Path(path).suffix.lower() in SUFFIXES


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in (".tif", ".tiff")


def _read_raw(path: Path, page: int = 0) -> np.ndarray:
    """The stored values of one image or TIFF page: H×W or H×W×C, dtype as stored."""
    if _is_tiff(path):
        import tifffile

        array = tifffile.imread(path, key=page)
        if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
            array = array.transpose(1, 2, 0)  # planar RGB(A)
        return array
    from PIL import Image

    with Image.open(path) as image:
        if image.mode == "P":  # palette images hold colours; palette masks are read by read_mask
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif image.mode == "1":
            image = image.convert("L")
        array = np.asarray(image)
    return array.astype(array.dtype.newbyteorder("="))  # big-endian 16-bit PNGs


def page_sizes(path: Path) -> list[tuple[int, int]]:
    """(H, W) of every page (one for PNG) from the file header, without decoding pixels."""
    if _is_tiff(path):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return [(page.imagelength, page.imagewidth) for page in tif.pages]
    from PIL import Image

    with Image.open(path) as image:
        return [(image.height, image.width)]


def read_image(path, page: int = 0, channels: int | None = None) -> np.ndarray:
    """One image (or one page of a TIFF stack) as float32 H×W×C in [0, 1]: integer types are
    divided by their maximum (255, 65535, ...), floats kept; alpha dropped. `channels` 1 or 3
    converts grey↔RGB (ITU-R 601 luma for RGB→grey); None keeps what is stored."""
    path = Path(path)
    array = _read_raw(path, page)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 2-D image, got an array of shape {array.shape}")
    if array.shape[-1] in (2, 4):
        array = array[..., :-1]
    scale = np.iinfo(array.dtype).max if np.issubdtype(array.dtype, np.integer) else 1
    image = array.astype(np.float32) / np.float32(scale)
    have = image.shape[-1]
    if channels is None or channels == have:
        return np.ascontiguousarray(image)
    if channels == 3 and have == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 1 and have == 3:
        return image @ np.array([[0.299], [0.587], [0.114]], np.float32)
    raise ValueError(f"{path}: cannot convert a {have}-channel image to {channels} channels")


def read_mask(path: Path, page: int) -> np.ndarray:
    """Stored mask values H×W: palette indices for palette PNGs, one channel of a grey RGB(A)."""
    if _is_tiff(path):
        import tifffile

        mask = tifffile.imread(path, key=page)
    else:
        from PIL import Image

        with Image.open(path) as image:
            mask = np.asarray(image)  # mode P gives the indices, which are the classes
    if mask.ndim == 3:
        colour = mask[..., :3] if mask.shape[-1] >= 3 else mask[..., :1]
        if (colour != colour[..., :1]).any():
            raise ValueError(
                f"{path}: colour masks are not supported; store class values in a "
                "single-channel (grey or palette) image"
            )
        mask = colour[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D mask, got an array of shape {mask.shape}")
    return mask.astype(np.int64)


# ----------------------------------------------------------------------------- volumes

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".tif", ".tiff")


def volume_stem(path: Path) -> str:
    """The name without its volume suffix ("case.nii.gz" → "case")."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def is_volume(path: Path) -> bool:
    return Path(path).name.lower().endswith(VOLUME_SUFFIXES)


def _is_nifti(path: Path) -> bool:
    return Path(path).name.lower().endswith((".nii", ".nii.gz"))


def volume_shape(path: Path) -> tuple[int, ...]:
    """(D, H, W) of a volume from its header: a NIfTI's first three axes as stored, a TIFF
    stack's pages × rows × columns."""
    if _is_nifti(path):
        import nibabel

        return tuple(nibabel.load(path).shape[:3])
    return (len(page_sizes(Path(path))), *page_sizes(Path(path))[0])


def _read_volume_raw(path: Path) -> np.ndarray:
    if _is_nifti(path):
        import nibabel

        return np.asanyarray(nibabel.load(path).dataobj)  # the stored values, scaled
    import tifffile

    array = tifffile.imread(path)
    return array[None] if array.ndim == 2 else array  # one page: a volume one slice deep


def zscore(volume: np.ndarray) -> np.ndarray:
    """Each channel of a D×H×W×C volume to zero mean and unit standard deviation (nnU-Net's
    default normalisation: any intensity range, CT or MRI or microscopy, comes out alike)."""
    mean = volume.mean(axis=(0, 1, 2), dtype=np.float64)
    std = volume.std(axis=(0, 1, 2), dtype=np.float64)
    return ((volume - mean) / np.maximum(std, 1e-8)).astype(np.float32)


def read_volume(path, channels: int | None = None) -> np.ndarray:
    """A NIfTI volume or a TIFF stack as float32 D×H×W×C, z-scored per channel (`zscore`); a
    4-D NIfTI's last axis and a TIFF stack's samples are the channels. `channels` checks them."""
    path = Path(path)
    volume = _read_volume_raw(path)
    if volume.ndim == 3:
        volume = volume[..., None]
    if volume.ndim != 4:
        raise ValueError(f"{path}: expected a 3-D volume, got an array of shape {volume.shape}")
    if channels is not None and volume.shape[-1] != channels:
        raise ValueError(f"{path}: the volume has {volume.shape[-1]} channels, not {channels}")
    if not np.isfinite(volume).all():
        raise ValueError(f"{path}: the volume holds NaN or infinite values")
    return zscore(volume.astype(np.float32))


def read_volume_mask(path) -> np.ndarray:
    """The stored labels of a NIfTI or TIFF-stack mask, D×H×W int64 (float NIfTI labels must be
    whole numbers)."""
    path = Path(path)
    mask = _read_volume_raw(path)
    if mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D mask, got an array of shape {mask.shape}")
    if np.issubdtype(mask.dtype, np.floating) and (mask != np.round(mask)).any():
        raise ValueError(f"{path}: mask values must be whole numbers (class labels)")
    return mask.astype(np.int64)


def write_volume_mask(mask: np.ndarray, path: Path, like: Path) -> None:
    """A D×H×W mask as NIfTI (with the affine and orientation of the volume `like`) or as a
    TIFF stack, by `path`'s suffix."""
    if _is_nifti(path):
        import nibabel

        reference = nibabel.load(like) if _is_nifti(like) else None
        affine = reference.affine if reference is not None else np.eye(4)
        image = nibabel.Nifti1Image(mask, affine)
        if reference is not None:
            image.set_qform(*reference.get_qform(coded=True))
            image.set_sform(*reference.get_sform(coded=True))
        nibabel.save(image, path)
    else:
        import tifffile

        tifffile.imwrite(path, mask)
