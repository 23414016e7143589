"""ConvTranspose2d / ConvTranspose3d whose stride equals the kernel, backward through ops.up_conv.

fuse() gives every such transposed convolution (the U-Net's 2x2 stride-2 upsampling, nnU-Net's
and MONAI's too) one of these classes: the same parameters, state_dict and outputs; its backward
is two matrix products instead of ATen's transposed-convolution backward.
"""

from torch import nn

from .. import ops
from ..ops.up_conv import non_overlapping as up_conv_geometry


def non_overlapping(m: nn.Module) -> bool:
    """A transposed convolution module with up_conv's geometry (and zero padding mode)."""
    return m.padding_mode == "zeros" and up_conv_geometry(
        m.kernel_size, m.stride, m.padding, m.dilation, m.output_padding, m.groups
    )


class UpConvMixin:
    backend = "auto"

    @classmethod
    def fits(cls, module: nn.Module) -> bool:
        return non_overlapping(module)

    def forward(self, x, output_size=None):
        if output_size is not None or not non_overlapping(self):
            return super().forward(x, output_size)
        return ops.up_conv(x, self.weight, self.bias, backend=self.backend)


class UpConvTranspose2d(UpConvMixin, nn.ConvTranspose2d):
    pass


class UpConvTranspose3d(UpConvMixin, nn.ConvTranspose3d):
    pass
