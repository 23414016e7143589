"""unet_fast.UNet: the tutorial's U-Net on the fused ops, a drop-in for the reference UNet."""
import torch
from torch.utils.checkpoint import checkpoint

from .. import _backend, ops, reference
from ..fuse import fuse
from .geometry import check_input


class UNet(reference.UNet):
    """The tutorial's UNet (same constructor, submodules and state_dict keys) computing through
    the fused ops: every DoubleConv is a FusedDoubleConv, every skip connection one crop_concat.

    Keyword-only extras:
        padding: "same" (any size >= 16) or "valid" (the paper's 572 -> 388 geometry)
        backend: "auto" | "cpu" | "cuda" | "triton" | "reference" for every op
        checkpointing: recompute the encoder blocks in backward instead of keeping their
            activations (the tutorial's MemoryEfficientUNet); running statistics are updated
            once per step all the same
    On the CPU the network runs internally in channels_last (oneDNN's fastest layout) and returns
    the memory format it was given.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, base_features: int = 64,
                 bilinear: bool = True, *, padding: str = "same", backend: str = "auto",
                 checkpointing: bool = False):
        super().__init__(in_channels, num_classes, base_features, bilinear, padding=padding)
        self.backend, self.checkpointing = backend, checkpointing
        fuse(self, backend=backend)
        # channels_last weights too: weight gradients then come out in the parameters' own layout
        # instead of being copied into it on every step
        self.to(memory_format=torch.channels_last)

    def _encode(self, block, x):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _decode(self, block, x, skip):
        x = block.up(x)
        size = skip.shape[-2:] if self.padding == "same" else x.shape[-2:]
        return block.conv(ops.crop_concat(skip, x, size, backend=self.backend))

    def forward(self, x):
        check_input(x, self.in_channels, self.padding)
        channels_last = x.device.type == "cpu" and _backend.resolve(
            self.backend, x.device, "conv_bn_relu") != "reference"
        fmt = torch._prims_common.suggest_memory_format(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x1 = self._encode(self.inc, x)
        x2 = self._encode(self.down1, x1)
        x3 = self._encode(self.down2, x2)
        x4 = self._encode(self.down3, x3)
        x5 = self._encode(self.down4, x4)
        x = self._decode(self.up1, x5, x4)
        x = self._decode(self.up2, x, x3)
        x = self._decode(self.up3, x, x2)
        x = self._decode(self.up4, x, x1)
        return self.outc(x).contiguous(memory_format=fmt)
