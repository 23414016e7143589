"""unet_fast.UNet: the tutorial's U-Net on the fused ops, a drop-in for the reference UNet."""

import inspect

import torch
from torch.utils.checkpoint import checkpoint

from .. import _backend, ops, reference
from ..fuse import fuse
from ..ops import recompute


class FusedModel:
    """What every unet_fast model shares: fused Conv-BN-ReLU runs, channels_last on the CPU, and
    `init_kwargs`, the constructor's arguments (checkpoints rebuild the model from them)."""

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        signature = inspect.signature(cls.__init__)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        self.init_kwargs = {}
        for name, value in list(bound.arguments.items())[1:]:
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                self.init_kwargs.update(value)  # a variant's **kwargs, passed on to UNet
            else:
                self.init_kwargs[name] = value
        return self

    def finish(self, spatial_dims: int = 2):
        """Fuses every Conv -> Norm -> Act run (`fuse_report` says which) and keeps the weights
        channels-last (so their gradients come out in the parameters' own layout). Call after
        adding modules."""
        self.fuse_report = fuse(self, backend=self.backend, report=True)[1]
        self.channels_last = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
        self.to(memory_format=self.channels_last)

    def layout(self, x):
        """(x in the layout the network runs in, the memory format to return)."""
        fmt = torch._prims_common.suggest_memory_format(x)
        if (
            x.device.type == "cpu"
            and fmt != self.channels_last
            and _backend.resolve(self.backend, x.device, "conv_bn_relu") != "reference"
        ):
            # a copy, not .contiguous(): with one channel NCHW is already "channels_last
            # contiguous", keeps its NCHW strides, and every layer would then run in NCHW
            x = torch.empty_like(x, memory_format=self.channels_last).copy_(x)
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
    spatial_dims, norm, act, features: as reference.UNet's (3-D volumes, InstanceNorm or
        GroupNorm, LeakyReLU or PReLU); Conv -> Norm -> Act runs through ops.norm_act (see
        `fuse_report`)
    On the CPU the network runs internally in channels_last (oneDNN's fastest layout) and returns
    the memory format it was given.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        base_features: int = 64,
        bilinear: bool = True,
        *,
        padding: str = "same",
        spatial_dims: int = 2,
        norm="batch",
        act="relu",
        features=None,
        backend: str = "auto",
        checkpointing: bool = False,
    ):
        super().__init__(
            in_channels,
            num_classes,
            base_features,
            bilinear,
            padding=padding,
            spatial_dims=spatial_dims,
            norm=norm,
            act=act,
            features=features,
        )
        self.backend, self.checkpointing = backend, checkpointing
        self.finish(spatial_dims)

    def encode(self, level: int, x, recipe=None):
        """Encoder level 0 (`inc`) or `down{level}` (pool, then double conv) of x, the level
        above's output: ((output, recipe), x as the decoder should read it).

        In training the pooling and the decoder's join keep the recipe of the block's output
        (its conv output and statistics, kept anyway) instead of the output: see ops.recompute.
        The decoder then reads x through the pooling's node, which sums x's two gradients. That
        path calls the block's children, not the block (forward hooks on `down1` run in eval and
        without gradients).
        """
        block = getattr(self, "inc" if level == 0 else f"down{level}")
        if not (self.training and torch.is_grad_enabled()):
            return (block(x), None), x
        if self.checkpointing:
            return (checkpoint(block, x, use_reentrant=False), None), x
        pooled = x
        if level:
            pool, block = block.maxpool_conv
            pooled, x = recompute.max_pool2d(x, recipe) if recipe is not None else (pool(x), x)
        forward_recipe = getattr(getattr(block, "double_conv", None), "forward_recipe", None)
        return (forward_recipe(pooled) if forward_recipe else (block(pooled), None)), x

    def decode(self, level: int, x, skip, recipe=None):
        """Decoder block `up{level}`: upsample x, join it with the skip, double conv."""
        block = getattr(self, f"up{level}")
        x = block.up(x)
        size = skip.shape[2:] if self.padding == "same" else x.shape[2:]
        forward_joined = getattr(getattr(block.conv, "double_conv", None), "forward_joined", None)
        if forward_joined is not None:
            return forward_joined(skip, x, size, recipe)
        if self.spatial_dims == 3:  # crop_concat's kernels are 2-D: volumes join with torch.cat
            return block.conv(reference.crop_concat(skip, x, size))
        return block.conv(ops.crop_concat(skip, x, size, backend=self.backend))

    def forward(self, x):
        reference.check_input(
            x,
            self.in_channels,
            self.padding,
            reference.DEPTH,
            self.spatial_dims,
            self.norm,
            self.training,
        )
        x, fmt = self.layout(x)
        skips = [self.encode(0, x)[0]]  # (output, recipe) per level
        for level in range(1, 5):
            encoded, skip = self.encode(level, *skips[-1])
            skips[-1] = (skip, skips[-1][1])
            skips.append(encoded)
        x = skips.pop()[0]
        for level in range(1, 5):
            x = self.decode(level, x, *skips.pop())
        return self.outc(x).contiguous(memory_format=fmt)
