"""The original U-Net paper's overlap-tile geometry: where tiles go, how much context each
needs, how the image is mirrored around them and how their outputs are blended; for images
(H, W) and volumes (D, H, W) alike, each axis planned on its own.

Per axis, the image is covered by tiles of the model's output size that overlap by at least
`overlap` pixels; each tile's input is the output region plus the model's context margin (none
for "same" padding, the paper's 92 pixels for "valid"), taken from the image mirrored at its
borders. Tile outputs are blended with a separable cosine window divided by the summed weights,
so seams fade smoothly. Tiles start on multiples of 16 (the 4 poolings' grid), so every tile
sees the pooling grid a whole-image pass would. Tiles that run past the image's far edges see
it mirrored. An image that fits one tile is one tile of the next valid size: the image
mirror-padded (bottom and right), its output then cropped.
"""

import math
from typing import NamedTuple, Sequence

import torch

from ..reference import DEPTH, output_size

GRID = 2**DEPTH  # tile offsets on this grid keep the poolings aligned across tiles


def model_padding(model) -> str:
    """ "same" or "valid": how much of a tile's input the model's output covers."""
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
    raise ValueError(
        f"tile {tile} is too small for the valid-padding U-Net: the minimum is {smallest}"
    )


def quarter_overlap(tile, padding: str) -> int:
    """A quarter of the smallest tile edge as overlap, or less where tiles of that size could
    then not move (validation's tiling)."""
    edges = (tile,) if isinstance(tile, int) else tuple(tile)
    outputs = min(_tile_size(edge, padding)[1] for edge in edges)
    return max(0, min(min(edges) // 4, outputs - GRID))


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
    return Axis(
        tile_in,
        tile_out,
        (tile_in - tile_out) // 2,
        starts,
        starts[-1] + tile_out,
        tile_out - stride,
    )


def plan(
    shape: Sequence[int], tile: int | Sequence[int], overlap: int, padding: str
) -> tuple[Axis, ...]:
    """One Axis per spatial axis of an image of `shape` ((H, W) or (D, H, W)): `tile` is the
    largest model input per tile, one size for every axis or one per axis (rounded down to a
    valid size), `overlap` the least overlap of neighbouring tiles' outputs (the stride is
    rounded down to the grid). ValueError for a tile too small or an overlap that leaves no
    stride."""
    tiles = (tile,) * len(shape) if isinstance(tile, int) else tuple(tile)
    if len(tiles) != len(shape):
        raise ValueError(f"{len(tiles)} tile sizes for an image of {len(shape)} axes {shape}")
    axes = []
    for size, length in zip(shape, tiles, strict=True):
        tile_size = _tile_size(length, padding)
        if (tile_size[1] - overlap) // GRID < 1:
            raise ValueError(
                f"overlap {overlap} leaves no room to move: tiles of {tile_size[0]} "
                f"pixels (output {tile_size[1]}) need overlap <= {tile_size[1] - GRID}"
            )
        axes.append(_axis(size, tile_size, overlap, padding))
    return tuple(axes)


def _reflect(n: int, before: int, after: int, device) -> torch.Tensor:
    """Indices that mirror an axis of length n by `before` and `after` pixels without repeating
    the edge (numpy's "reflect"), for pads of any length: F.pad needs pads shorter than n."""
    index = torch.arange(-before, n + after, device=device)
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    index = index.remainder(period)
    return torch.where(index >= n, period - index, index)


def mirror_pad(image: torch.Tensor, axes: Sequence[Axis]) -> torch.Tensor:
    """The C×(D×)H×W `image` mirrored out to the tiles' canvas plus their context margins."""
    pads = []  # F.pad's order: last axis first, (before, after)
    for axis, n in zip(reversed(axes), reversed(image.shape[1:])):
        pads += [axis.margin, axis.margin + axis.canvas - n]
    if max(pads) < min(image.shape[1:]):  # F.pad's reflection, many times faster
        return torch.nn.functional.pad(image[None], pads, mode="reflect")[0]
    for dim, axis in enumerate(axes, start=1):
        n = image.shape[dim]
        index = _reflect(n, axis.margin, axis.margin + axis.canvas - n, image.device)
        image = image.index_select(dim, index)
    return image


def _window(length: int, ramp: int, device) -> torch.Tensor:
    """1 in the middle, a cosine ramp over `ramp` pixels at both ends; positive everywhere, so
    the blend's division by the summed weights is always defined."""
    if ramp <= 0:
        return torch.ones(length, device=device)
    j = torch.arange(length, device=device, dtype=torch.float64)
    edge = torch.minimum(j, length - 1 - j)
    weight = torch.sin(0.5 * math.pi * torch.clamp((edge + 0.5) / ramp, max=1.0)) ** 2
    return weight.float()


BLENDS = ("cosine", "constant")


def blend_weight(axes: Sequence[Axis], device, blend: str = "cosine") -> torch.Tensor:
    """The weight of each pixel of a tile's output in the blend: the product of the axes'
    cosine windows, or 1 everywhere for "constant" (a plain mean where tiles overlap, MONAI's
    `sliding_window_inference(mode="constant")`)."""
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, not {blend!r}")
    weight = torch.ones((), device=device)
    for axis in axes:
        ramp = axis.ramp if blend == "cosine" else 0
        weight = weight[..., None] * _window(axis.tile_out, ramp, device)
    return weight
