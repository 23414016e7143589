"""Spatial sizes through a U-Net of a given depth, and input checks with clear messages."""
import torch

DEPTH = 4  # poolings in the tutorial's UNet


def output_size(size: int, padding: str, depth: int = DEPTH):
    """Output size along one axis, or None when the input does not fit the network.

    "same": any size >= 2**depth (pooling floors; the decoder pads back to the skip's size).
    "valid": the paper's geometry — every double conv loses 4 pixels and every pooled map must be
    even, so 572 -> 388; other sizes are rejected rather than silently cropped.
    """
    if padding == "same":
        return size if size >= 2 ** depth else None
    for _ in range(depth):
        size -= 4
        if size <= 0 or size % 2:
            return None
        size //= 2
    size -= 4
    for _ in range(depth):
        if size <= 0:
            return None
        size = 2 * size - 4
    return size if size > 0 else None


def nearest_valid_sizes(size: int, padding: str, depth: int = DEPTH, count: int = 2):
    """The closest input sizes that `output_size` accepts, nearest first."""
    candidates = [s for s in range(1, size + 16 * 2 ** depth) if output_size(s, padding, depth)]
    return sorted(candidates, key=lambda s: (abs(s - size), s))[:count]


def check_input(x: torch.Tensor, in_channels: int, padding: str, depth: int = DEPTH) -> None:
    """Raises TypeError/ValueError naming the expected shape when a UNet cannot take `x`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"UNet expects a torch.Tensor, got {type(x).__name__}")
    expected = f"(N, {in_channels}, H, W)"
    if x.dim() != 4:
        raise ValueError(f"UNet expects a 4-D input {expected}, got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"UNet expects {in_channels} input channels {expected}, got shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"UNet expects a floating-point input, got {x.dtype}")
    for axis, size in (("height", x.shape[2]), ("width", x.shape[3])):
        if output_size(size, padding, depth) is None:
            if padding == "same":
                raise ValueError(f"input {axis} {size} is too small for {depth} poolings: the "
                                 f"minimum is {2 ** depth} (got shape {tuple(x.shape)})")
            near = " or ".join(map(str, nearest_valid_sizes(size, padding, depth)))
            raise ValueError(f"input {axis} {size} does not fit the valid-padding U-Net (every "
                             f"pooled map must be even); nearest valid sizes: {near}")
