"""Readable pure-PyTorch definitions of every unet_fast op, and the reference U-Net.

This module is the contract: the fallback when no kernel is built and the oracle every kernel is
tested against. It favours clarity over speed, and imports nothing of the package.
"""

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(
    x,
    weight,
    bias,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    training: bool,
    momentum: float,
    eps: float,
    padding: int,
):
    """relu(batch_norm(conv2d(x))), updating running_mean/running_var in place when training.

    `momentum` is the running-average factor as in F.batch_norm; a module with momentum=None
    passes 1 / num_batches_tracked (nn.BatchNorm2d's cumulative average).
    """
    y = F.conv2d(x, weight, bias, padding=padding)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return F.relu(y)


def conv_bias_relu(x, weight, bias, padding: int):
    """relu(conv2d(x)): the eval path once BatchNorm is folded into weight and bias."""
    return F.relu(F.conv2d(x, weight, bias, padding=padding))


def double_conv(
    x,
    weight1,
    bias1,
    bn_weight1,
    bn_bias1,
    running_mean1,
    running_var1,
    weight2,
    bias2,
    bn_weight2,
    bn_bias2,
    running_mean2,
    running_var2,
    training: bool,
    momentum1: float,
    momentum2: float,
    eps1: float,
    eps2: float,
    padding: int,
):
    """Two conv_bn_relu in a row."""
    x = conv_bn_relu(
        x,
        weight1,
        bias1,
        bn_weight1,
        bn_bias1,
        running_mean1,
        running_var1,
        training,
        momentum1,
        eps1,
        padding,
    )
    return conv_bn_relu(
        x,
        weight2,
        bias2,
        bn_weight2,
        bn_bias2,
        running_mean2,
        running_var2,
        training,
        momentum2,
        eps2,
        padding,
    )


def norm_act(
    y,
    norm: str,
    groups: Optional[int],
    weight,
    bias,
    running_mean,
    running_var,
    training: bool,
    momentum: float,
    eps: float,
    act: str,
    negative_slope: float,
    act_weight=None,
):
    """act(norm(y)) for a 4-D or 5-D y: norm "batch" | "instance" | "group" (`groups` groups) |
    "none", act "relu" | "leaky_relu" (`negative_slope`) | "prelu" (weight `act_weight`) |
    "identity". Batch and instance norm
    use batch statistics when training or without running statistics, and then update the
    running statistics in place."""
    if norm == "batch":
        y = F.batch_norm(y, running_mean, running_var, weight, bias, training, momentum, eps)
    elif norm == "instance":
        batch_stats = training or running_mean is None
        y = F.instance_norm(y, running_mean, running_var, weight, bias, batch_stats, momentum, eps)
    elif norm == "group":
        y = F.group_norm(y, groups, weight, bias, eps)
    if act == "relu":
        return F.relu(y)
    if act == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    if act == "prelu":
        return F.prelu(y, act_weight)
    return y


def fit(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Centre-crop (if larger) or zero-pad (if smaller) x's last len(size) dims to `size`.

    Odd differences split as F.pad(x, [d // 2, d - d // 2]); negative padding crops.
    """
    pad = []
    for axis in range(len(size) - 1, -1, -1):  # F.pad lists the last dim first
        d = size[axis] - x.shape[x.dim() - len(size) + axis]
        pad += [d // 2, d - d // 2]
    return F.pad(x, pad)


def crop_concat(skip: torch.Tensor, up: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[skip, up] on channels, each fitted to `size` ((H, W), or (D, H, W) for volumes)."""
    return torch.cat([fit(skip, size), fit(up, size)], dim=1)


def up_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """A transposed convolution (2-D or 3-D) whose stride is its kernel size: every input pixel
    becomes its own block of output pixels (the U-Net's 2x2 stride-2 upsampling)."""
    conv = F.conv_transpose2d if x.dim() == 4 else F.conv_transpose3d
    return conv(x, weight, bias, stride=tuple(weight.shape[2:]))


# Sizes through the U-Net, and input checks with clear messages.

DEPTH = 4  # poolings in the tutorial's UNet


def output_size(size: int, padding: str, depth: int = DEPTH):
    """Output size along one axis, or None when the input does not fit the network.

    "same": any size >= 2**depth (pooling floors; the decoder pads back to the skip's size).
    "valid": the paper's geometry — every double conv loses 4 pixels and every pooled map must be
    even, so 572 -> 388; other sizes are rejected rather than silently cropped.
    """
    if padding == "same":
        return size if size >= 2**depth else None
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
    candidates = [s for s in range(1, size + 16 * 2**depth) if output_size(s, padding, depth)]
    return sorted(candidates, key=lambda s: (abs(s - size), s))[:count]


def check_input(
    x: torch.Tensor,
    in_channels: int,
    padding: str,
    depth: int = DEPTH,
    spatial_dims: int = 2,
    norm: str = "batch",
    training: bool = False,
) -> None:
    """Raises TypeError/ValueError naming the expected shape when a UNet cannot take `x`: also
    when its norm would see one value per channel at the bottleneck (InstanceNorm always,
    BatchNorm in training with a batch of one)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"UNet expects a torch.Tensor, got {type(x).__name__}")
    axes = ("height", "width") if spatial_dims == 2 else ("depth", "height", "width")
    expected = f"(N, {in_channels}, {', '.join(a[0].upper() for a in axes)})"
    if x.dim() != 2 + spatial_dims:
        raise ValueError(
            f"UNet expects a {2 + spatial_dims}-D input {expected}, got shape {tuple(x.shape)}"
        )
    if x.shape[1] != in_channels:
        raise ValueError(
            f"UNet expects {in_channels} input channels {expected}, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"UNet expects a floating-point input, got {x.dtype}")
    for axis, size in zip(axes, x.shape[2:], strict=True):
        if output_size(size, padding, depth) is None:
            if padding == "same":
                raise ValueError(
                    f"input {axis} {size} is too small for {depth} poolings: the "
                    f"minimum is {2**depth} (got shape {tuple(x.shape)})"
                )
            near = " or ".join(map(str, nearest_valid_sizes(size, padding, depth)))
            raise ValueError(
                f"input {axis} {size} does not fit the valid-padding U-Net (every "
                f"pooled map must be even); nearest valid sizes: {near}"
            )
    bottom = [size // 2**depth for size in x.shape[2:]]
    batch = x.shape[0] if norm == "batch" else 1
    if padding == "same" and math.prod(bottom) * batch == 1 and (norm == "instance" or training):
        what = "InstanceNorm" if norm == "instance" else "BatchNorm in training (a batch of one)"
        raise ValueError(
            f"input of shape {tuple(x.shape)} leaves one value per channel at the "
            f"{'x'.join(map(str, bottom))} bottleneck, and {what} needs more: make an axis at "
            f"least {2 ** (depth + 1)}" + (" or the batch larger" if norm == "batch" else "")
        )


# The reference U-Net: the tutorial's modules and state_dict keys. With bilinear=False it computes
# exactly what the tutorial's code does. The tutorial's bilinear=True cannot run (its 1x1 conv
# expects in_channels but receives in_channels // 2); here bilinear=True has Pytorch-UNet's
# semantics: upsample, concatenate, DoubleConv(in, out, mid=in // 2), no 1x1 conv.

PADDING = {"same": 1, "valid": 0}


class Layers:
    """The layer classes of a U-Net: 2-D or 3-D, its norm and its activation.

    norm: "batch" | "instance" (affine, as nnU-Net's) | ("group", groups)
    act: "relu" | ("leaky_relu", negative_slope) | "prelu" (one weight per channel)
    """

    def __init__(self, spatial_dims: int = 2, norm="batch", act="relu"):
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        name = norm[0] if isinstance(norm, (tuple, list)) else norm
        if name not in ("batch", "instance", "group"):
            raise ValueError(f"norm must be 'batch', 'instance' or ('group', G), got {norm!r}")
        if name == "group" and not (isinstance(norm, (tuple, list)) and len(norm) == 2):
            raise ValueError(f"norm 'group' needs its number of groups: ('group', G), got {norm!r}")
        act_name = act[0] if isinstance(act, (tuple, list)) else act
        if act_name not in ("relu", "leaky_relu", "prelu"):
            raise ValueError(f"act must be 'relu', ('leaky_relu', slope) or 'prelu', got {act!r}")
        self.spatial_dims, self.norm, self.act = spatial_dims, norm, act
        three = spatial_dims == 3
        self.conv = nn.Conv3d if three else nn.Conv2d
        self.batch_norm = nn.BatchNorm3d if three else nn.BatchNorm2d
        self.conv_transpose = nn.ConvTranspose3d if three else nn.ConvTranspose2d
        self.max_pool = nn.MaxPool3d if three else nn.MaxPool2d
        self.upsample_mode = "trilinear" if three else "bilinear"
        self.norm_name = name

    def make_norm(self, channels: int) -> nn.Module:
        if self.norm_name == "batch":
            return self.batch_norm(channels)
        if self.norm_name == "instance":
            kind = nn.InstanceNorm3d if self.spatial_dims == 3 else nn.InstanceNorm2d
            return kind(channels, affine=True)
        return nn.GroupNorm(self.norm[1], channels)

    def make_act(self, channels: int) -> nn.Module:
        if self.act == "relu":
            return nn.ReLU(inplace=True)
        if self.act == "prelu":
            return nn.PReLU(channels)
        return nn.LeakyReLU(self.act[1], inplace=True)


class DoubleConv(nn.Module):
    """(Conv 3x3 -> Norm -> Act) x 2; keys double_conv.{0,1,3,4}.* (and .2, .5 for PReLU)"""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        mid_channels: Optional[int] = None,
        padding: str = "same",
        layers: Optional[Layers] = None,
    ):
        super().__init__()
        mid_channels = mid_channels or out_channels
        layers = layers or Layers()
        self.double_conv = nn.Sequential(
            layers.conv(in_channels, mid_channels, 3, padding=PADDING[padding], bias=False),
            layers.make_norm(mid_channels),
            layers.make_act(mid_channels),
            layers.conv(mid_channels, out_channels, 3, padding=PADDING[padding], bias=False),
            layers.make_norm(out_channels),
            layers.make_act(out_channels),
        )

    def forward(self, x):
        return self.double_conv(x)


class EncoderBlock(nn.Module):
    """MaxPool 2x2 -> DoubleConv; keys maxpool_conv.1.double_conv.*"""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        padding: str = "same",
        layers: Optional[Layers] = None,
    ):
        super().__init__()
        layers = layers or Layers()
        self.maxpool_conv = nn.Sequential(
            layers.max_pool(2, 2),
            DoubleConv(in_channels, out_channels, padding=padding, layers=layers),
        )

    def forward(self, x):
        return self.maxpool_conv(x)


class DecoderBlock(nn.Module):
    """Upsample -> crop_concat with the skip -> DoubleConv.

    Same padding pads the upsampled map to the skip's size (the tutorial's F.pad); valid padding
    centre-crops the skip to the upsampled map's size (the paper's "copy and crop").
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bilinear: bool = True,
        padding: str = "same",
        layers: Optional[Layers] = None,
        skip_channels: Optional[int] = None,
    ):
        """bilinear: in_channels is the joined width (skip + upsampled); transposed: the width
        from below, halved by the transposed conv and joined with skip_channels (default: the
        same half, the tutorial's doubling widths)."""
        super().__init__()
        self.padding = padding
        layers = layers or Layers()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode=layers.upsample_mode, align_corners=True)
            self.conv = DoubleConv(
                in_channels, out_channels, in_channels // 2, padding=padding, layers=layers
            )
        else:
            half = in_channels // 2
            self.up = layers.conv_transpose(in_channels, half, kernel_size=2, stride=2)
            joined = half + (half if skip_channels is None else skip_channels)
            self.conv = DoubleConv(joined, out_channels, padding=padding, layers=layers)

    def forward(self, x, skip):
        x = self.up(x)
        size = skip.shape[2:] if self.padding == "same" else x.shape[2:]
        return self.conv(crop_concat(skip, x, size))


class UNet(nn.Module):
    """The tutorial's U-Net (Ronneberger et al., 2015) in plain PyTorch.

    Args:
        in_channels: input channels (1 grayscale, 3 RGB)
        num_classes: output channels (logits)
        base_features: channels of the first level; level i has base_features * 2**i
        bilinear: bilinear (trilinear in 3-D) upsampling (Pytorch-UNet semantics) instead of
            transposed convs
        padding: "same" (output size = input size, any size >= 16) or "valid" (the paper's
            unpadded convolutions: 572x572 in, 388x388 out)
        spatial_dims: 2 (images, N x C x H x W) or 3 (volumes, N x C x D x H x W)
        norm: "batch" (the tutorial's) | "instance" (affine) | ("group", groups)
        act: "relu" (the tutorial's) | ("leaky_relu", negative_slope) | "prelu"
        features: the five levels' widths, instead of base_features * 2**i
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
        features: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        if padding not in PADDING:
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        if features is not None and len(features) != DEPTH + 1:
            raise ValueError(f"features must give {DEPTH + 1} widths, got {features!r}")
        self.in_channels, self.num_classes, self.bilinear = in_channels, num_classes, bilinear
        self.padding, self.spatial_dims = padding, spatial_dims
        self.layers = layers = Layers(spatial_dims, norm, act)
        self.norm = layers.norm_name
        f = list(features) if features else [base_features * 2**i for i in range(DEPTH + 1)]
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(in_channels, f[0], padding=padding, layers=layers)
        self.down1 = EncoderBlock(f[0], f[1], padding, layers)
        self.down2 = EncoderBlock(f[1], f[2], padding, layers)
        self.down3 = EncoderBlock(f[2], f[3], padding, layers)
        self.down4 = EncoderBlock(f[3], f[4] // factor, padding, layers)
        below = f[4] // factor  # the widths meet the tutorial's when each level doubles
        for level in range(1, DEPTH + 1):
            skip = f[DEPTH - level]
            out = skip // factor if level < DEPTH else skip
            width = skip + below if bilinear else below
            block = DecoderBlock(width, out, bilinear, padding, layers, skip_channels=skip)
            setattr(self, f"up{level}", block)
            below = out
        self.outc = layers.conv(f[0], num_classes, kernel_size=1)

    def forward(self, x):
        check_input(
            x, self.in_channels, self.padding, DEPTH, self.spatial_dims, self.norm, self.training
        )
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)

    def count_parameters(self) -> int:
        """Trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
