"""A model's logits for images of any size: overlap-tile prediction (the geometry is in
tiling.py) and test-time augmentation, the mean over a task's symmetry views (symmetry.py).
Reading images and writing masks, and `unet-fast predict`, are in predict_files.py."""

import torch

from .symmetry import symmetric_mean
from .tiling import blend_weight, mirror_pad, model_padding, plan


def predict_tiled(
    model, image: torch.Tensor, tile: int = 256, overlap: int = 32, batch_size: int = 4
) -> torch.Tensor:
    """Logits K×H×W (float32, on the image's device) for a normalised C×H×W float image.

    `tile`: the largest model input per tile (rounded down to a valid size: a multiple of 16
    for "same" padding, the paper's geometry for "valid"); `overlap`: the least overlap of
    neighbouring tiles' outputs (the stride is rounded down to a multiple of 16). Runs under
    inference_mode in batches of `batch_size` tiles on the model's device, with the model in
    eval mode (restored afterwards), so a tile's result never depends on its batch.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"predict_tiled expects a C×H×W tensor, got {shape}")
    if not image.is_floating_point():
        raise ValueError(f"predict_tiled expects a floating-point image, got {image.dtype}")
    channels, height, width = image.shape
    if channels != model.in_channels:
        raise ValueError(
            f"the model expects {model.in_channels} channels, the image has {channels}"
        )
    if height == 0 or width == 0:
        raise ValueError(f"the image is empty: {height}x{width}")
    if overlap < 0 or batch_size < 1:
        raise ValueError(f"need overlap >= 0 and batch_size >= 1, got {overlap} and {batch_size}")
    rows, cols = plan(height, width, tile, overlap, model_padding(model))

    parameter = next(model.parameters())
    device = parameter.device
    padded = mirror_pad(image.to(device=device, dtype=parameter.dtype), rows, cols)
    tiles = [(y, x) for y in rows.starts for x in cols.starts]
    weight = blend_weight(rows, cols, device)
    total = torch.zeros(model.num_classes, rows.canvas, cols.canvas, device=device)
    norm = torch.zeros(rows.canvas, cols.canvas, device=device)
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for first in range(0, len(tiles), batch_size):
                chunk = tiles[first : first + batch_size]
                out = model(
                    torch.stack(
                        [padded[:, y : y + rows.tile_in, x : x + cols.tile_in] for y, x in chunk]
                    )
                )
                out = (out[-1] if isinstance(out, (list, tuple)) else out).float()
                if len(tiles) == 1:  # no blending: bit for bit the plain forward pass
                    return out[0, :, :height, :width].to(image.device)
                for (y, x), logits in zip(chunk, out, strict=True):
                    total[:, y : y + rows.tile_out, x : x + cols.tile_out] += logits * weight
                    norm[y : y + rows.tile_out, x : x + cols.tile_out] += weight
    finally:
        model.train(training)
    return (total / norm)[:, :height, :width].to(image.device)


def predict_averaged(
    model, image: torch.Tensor, tta: bool = False, symmetry: str = "dihedral", **tiling
) -> torch.Tensor:
    """predict_tiled, or with tta=True its mean over the image's views under `symmetry` (on
    ISBI 2012 the 8 flips and rotations lower the pixel error by about 8%)."""
    if not tta:
        return predict_tiled(model, image, **tiling)
    return symmetric_mean(lambda view: predict_tiled(model, view, **tiling), image, symmetry)
