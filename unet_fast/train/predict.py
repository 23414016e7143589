"""Prediction on images of any size with the original U-Net paper's overlap-tile strategy.

Tiling (per axis): the image is covered by tiles of the model's output size that overlap by at
least `overlap` pixels; each tile's input is the output region plus the model's context margin
(none for "same" padding, the paper's 92 pixels for "valid"), taken from the image mirrored at
its borders. Tile logits are blended with a separable cosine window divided by the summed
weights, so seams fade smoothly. Tiles start on multiples of 16 (the 4 poolings' grid), so every
tile sees the pooling grid a whole-image pass would. Tiles that run past the image's bottom or
right edge see it mirrored. An image that fits one tile is a single forward pass of the image
mirror-padded (bottom and right) to the next valid size, then cropped.
"""
import math
from typing import NamedTuple

import torch

from ..models.geometry import DEPTH, output_size

GRID = 2 ** DEPTH  # tile offsets on this grid keep the poolings aligned across tiles


# ----------------------------------------------------------------------------- tiling

def _padding(model) -> str:
    return getattr(model, "padding", "same")  # UNet++ has same padding only


def _fit(size: int, padding: str) -> tuple[int, int]:
    """(input, output) of the smallest valid input whose output covers `size` pixels."""
    if padding == "same":
        valid = max(GRID, -(-size // GRID) * GRID)
        return valid, valid
    candidate = size
    while not (output_size(candidate, padding) or 0) >= size:
        candidate += 1
    return candidate, output_size(candidate, padding)


def _tile_size(tile: int, padding: str) -> tuple[int, int]:
    """(input, output) of the largest valid input tile no larger than `tile`."""
    if padding == "same":
        if tile < GRID:
            raise ValueError(f"tile {tile} is too small: the minimum is {GRID}")
        return tile // GRID * GRID, tile // GRID * GRID
    for candidate in range(tile, 0, -1):
        if output_size(candidate, padding):
            return candidate, output_size(candidate, padding)
    smallest = _fit(1, padding)[0]
    raise ValueError(f"tile {tile} is too small for the valid-padding U-Net: the minimum is "
                     f"{smallest}")


class Axis(NamedTuple):
    """How one image axis is tiled, in output pixels except `tile_in`."""
    tile_in: int  # model input per tile
    tile_out: int  # model output per tile
    margin: int  # context on each side: (tile_in - tile_out) / 2, the output being centred
    starts: list[int]  # where each tile's output begins
    canvas: int  # length the tiles cover, at least the image's
    ramp: int  # overlap of neighbouring tiles, blended; 0 for one tile


def _axis(size: int, tile: tuple[int, int], overlap: int, padding: str) -> Axis:
    tile_in, tile_out = tile
    if size <= tile_out:
        tile_in, tile_out = _fit(size, padding)
        return Axis(tile_in, tile_out, (tile_in - tile_out) // 2, [0], tile_out, 0)
    stride = (tile_out - overlap) // GRID * GRID
    starts = [k * stride for k in range(-(-(size - tile_out) // stride) + 1)]
    return Axis(tile_in, tile_out, (tile_in - tile_out) // 2, starts, starts[-1] + tile_out,
                tile_out - stride)


def _reflect(n: int, before: int, after: int, device) -> torch.Tensor:
    """Indices that mirror an axis of length n by `before` and `after` pixels without repeating
    the edge (numpy's "reflect"), for pads of any length: F.pad needs pads shorter than n."""
    index = torch.arange(-before, n + after, device=device)
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    index = index.remainder(period)
    return torch.where(index >= n, period - index, index)


def _window(length: int, ramp: int, device) -> torch.Tensor:
    """1 in the middle, a cosine ramp over `ramp` pixels at both ends; positive everywhere, so
    the blend's division by the summed weights is always defined."""
    if ramp <= 0:
        return torch.ones(length, device=device)
    j = torch.arange(length, device=device, dtype=torch.float64)
    edge = torch.minimum(j, length - 1 - j)
    weight = torch.sin(0.5 * math.pi * torch.clamp((edge + 0.5) / ramp, max=1.0)) ** 2
    return weight.float()


def predict_tiled(model, image: torch.Tensor, tile: int = 256, overlap: int = 32,
                  batch_size: int = 4) -> torch.Tensor:
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
        raise ValueError(f"the model expects {model.in_channels} channels, the image has "
                         f"{channels}")
    if height == 0 or width == 0:
        raise ValueError(f"the image is empty: {height}x{width}")
    if overlap < 0 or batch_size < 1:
        raise ValueError(f"need overlap >= 0 and batch_size >= 1, got {overlap} and {batch_size}")
    padding = _padding(model)
    tile_size = _tile_size(tile, padding)
    if (tile_size[1] - overlap) // GRID < 1:
        raise ValueError(f"overlap {overlap} leaves no room to move: tiles of {tile_size[0]} "
                         f"pixels (output {tile_size[1]}) need overlap <= {tile_size[1] - GRID}")

    parameter = next(model.parameters())
    device = parameter.device
    rows, cols = (_axis(size, tile_size, overlap, padding) for size in (height, width))
    padded = image.to(device=device, dtype=parameter.dtype)
    padded = padded.index_select(1, _reflect(height, rows.margin,
                                             rows.margin + rows.canvas - height, device))
    padded = padded.index_select(2, _reflect(width, cols.margin,
                                             cols.margin + cols.canvas - width, device))
    tiles = [(y, x) for y in rows.starts for x in cols.starts]
    weight = (_window(rows.tile_out, rows.ramp, device)[:, None]
              * _window(cols.tile_out, cols.ramp, device)[None, :])
    total = torch.zeros(model.num_classes, rows.canvas, cols.canvas, device=device)
    norm = torch.zeros(rows.canvas, cols.canvas, device=device)
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for first in range(0, len(tiles), batch_size):
                chunk = tiles[first:first + batch_size]
                out = model(torch.stack([padded[:, y:y + rows.tile_in, x:x + cols.tile_in]
                                         for y, x in chunk]))
                out = (out[-1] if isinstance(out, (list, tuple)) else out).float()
                if len(tiles) == 1:  # no blending: bit for bit the plain forward pass
                    return out[0, :, :height, :width].to(image.device)
                for (y, x), logits in zip(chunk, out):
                    total[:, y:y + rows.tile_out, x:x + cols.tile_out] += logits * weight
                    norm[y:y + rows.tile_out, x:x + cols.tile_out] += weight
    finally:
        model.train(training)
    return (total / norm)[:, :height, :width].to(image.device)
