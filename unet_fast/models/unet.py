"""unet_fast.UNet: the tutorial's U-Net on the fused ops, a drop-in for the reference UNet."""
import torch
from torch.utils.checkpoint import checkpoint

from .. import _backend, ops, reference
from ..fuse import fuse
from .geometry import check_input


class FusedModel:
    """What every unet_fast model shares: fused Conv-BN-ReLU runs, channels_last on the CPU."""

    def finish(self):
        """Fuses every Conv -> BN -> ReLU run and keeps 4-D weights channels_last (so their
        gradients come out in the parameters' own layout). Call after adding modules."""
        fuse(self, backend=self.backend)
        self.to(memory_format=torch.channels_last)

    def layout(self, x):
        """(x in the layout the network runs in, the memory format to return)."""
        fmt = torch._prims_common.suggest_memory_format(x)
        if x.device.type == "cpu" and _backend.resolve(
                self.backend, x.device, "conv_bn_relu") != "reference":
            x = x.contiguous(memory_format=torch.channels_last)
        return x, fmt


class UNet(FusedModel, reference.UNet):
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
        self.finish()

    def encode(self, block, x):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def decode(self, level: int, x, skip):
        """Decoder block `up{level}`: upsample x, join it with the skip, double conv."""
        block = getattr(self, f"up{level}")
        x = block.up(x)
        size = skip.shape[-2:] if self.padding == "same" else x.shape[-2:]
        return block.conv(ops.crop_concat(skip, x, size, backend=self.backend))

    def forward(self, x):
        check_input(x, self.in_channels, self.padding)
        x, fmt = self.layout(x)
        skips = [self.encode(self.inc, x)]
        for level in range(1, 5):
            skips.append(self.encode(getattr(self, f"down{level}"), skips[-1]))
        x = skips.pop()
        for level in range(1, 5):
            x = self.decode(level, x, skips.pop())
        return self.outc(x).contiguous(memory_format=fmt)
