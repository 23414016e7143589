"""Reading image and mask files, PNG and TIFF stacks, as training and prediction both see them:
images as float32 H×W×C in [0, 1], masks as the stored values."""

from pathlib import Path

import numpy as np

SUFFIXES = (".png", ".tif", ".tiff")


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
