"""CropConcat: the skip connection of a U-Net as a module."""

from torch import nn

from .. import ops


class CropConcat(nn.Module):
    """[skip, up] on channels, each centre-cropped or zero-padded to `size` (default: skip's)."""

    def __init__(self, *, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, skip, up, size=None):
        return ops.crop_concat(skip, up, size, backend=self.backend)
