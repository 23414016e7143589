"""The tutorial's U-Net variants on the fused blocks: Attention U-Net, ResU-Net, U-Net++.

Each is written with plain modules (convolutions, norms and activations in nn.Sequential) and
fused like any model (`FusedModel.finish`); backend="reference" runs the same modules in plain
PyTorch. Like UNet, each takes spatial_dims, norm and act (reference.Layers): 2-D or 3-D, BatchNorm
(the tutorial's), InstanceNorm or GroupNorm, ReLU, LeakyReLU or PReLU.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..reference import DEPTH, DoubleConv, Layers, check_input, crop_concat
from .unet import FusedModel, UNet


class AttentionGate(nn.Module):
    """The tutorial's attention gate (Oktay et al., 2018): weights the skip connection by
    sigmoid(psi(relu(W_g(gate) + W_x(skip)))), with the gating signal upsampled to the skip.
    The gate keeps its own ReLU and its BatchNorm on the one-channel map whatever the network's
    norm and activation (GroupNorm cannot split one channel)."""

    def __init__(
        self,
        gate_channels: int,
        skip_channels: int,
        inter_channels: int,
        layers: Optional[Layers] = None,
    ):
        super().__init__()
        layers = layers or Layers()
        self.W_g = layers.conv(gate_channels, inter_channels, kernel_size=1, bias=False)
        self.W_x = layers.conv(skip_channels, inter_channels, kernel_size=1, bias=False)
        self.psi = nn.Sequential(
            layers.conv(inter_channels, 1, kernel_size=1, bias=False),
            layers.batch_norm(1),
            nn.Sigmoid(),
        )
        self.relu = nn.ReLU(inplace=True)
        self.upsample_mode = layers.upsample_mode

    def forward(self, gate, skip):
        gate_up = F.interpolate(
            self.W_g(gate), size=skip.shape[2:], mode=self.upsample_mode, align_corners=True
        )
        return skip * self.psi(self.relu(gate_up + self.W_x(skip)))


class AttentionUNet(UNet):
    """UNet with the tutorial's AttentionGate on every skip connection (gates `att1`..`att4`)."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        base_features: int = 64,
        bilinear: bool = True,
        **kwargs,
    ):
        super().__init__(in_channels, num_classes, base_features, bilinear, **kwargs)

        def width(block: DoubleConv) -> int:
            return block.double_conv[3].out_channels

        encoder = [self.inc] + [getattr(self, f"down{i}").maxpool_conv[1] for i in range(1, 5)]
        skips = [width(block) for block in encoder[3::-1]]
        # the decoder's inputs: the bottleneck's, then each decoder block's
        gates = [width(encoder[4])] + [width(getattr(self, f"up{i}").conv) for i in (1, 2, 3)]
        for level, (gate, skip) in enumerate(zip(gates, skips, strict=True), start=1):
            setattr(self, f"att{level}", AttentionGate(gate, skip, skip // 2, self.layers))
        self.finish(self.spatial_dims)

    def decode(self, level, x, skip, recipe=None):
        # the gated skip is no double conv's output: its recipe no longer applies
        return super().decode(level, x, getattr(self, f"att{level}")(x, skip))


class ResidualDoubleConv(nn.Module):
    """The tutorial's residual double conv: act(conv-norm-act-conv-norm(x) + shortcut(x))."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        mid_channels: Optional[int] = None,
        padding: str = "same",
        layers: Optional[Layers] = None,
    ):
        super().__init__()
        if padding != "same":
            raise ValueError("ResUNet supports padding='same' only (the residual sum needs it)")
        layers = layers or Layers()
        self.conv = nn.Sequential(
            layers.conv(in_channels, out_channels, 3, padding=1, bias=False),
            layers.make_norm(out_channels),
            layers.make_act(out_channels),
            layers.conv(out_channels, out_channels, 3, padding=1, bias=False),
            layers.make_norm(out_channels),
        )
        self.shortcut = nn.Sequential()
        if in_channels != out_channels:
            self.shortcut = layers.conv(in_channels, out_channels, 1, bias=False)
        self.relu = layers.make_act(out_channels)

    def forward(self, x):
        return self.relu(self.conv(x) + self.shortcut(x))


class ResUNet(UNet):
    """UNet whose double convs are the tutorial's ResidualDoubleConv (first Conv-Norm-Act fused)."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        base_features: int = 64,
        bilinear: bool = True,
        **kwargs,
    ):
        super().__init__(in_channels, num_classes, base_features, bilinear, **kwargs)

        def residual(block: DoubleConv):
            seq = block.double_conv
            return ResidualDoubleConv(
                seq[0].in_channels, seq[3].out_channels, padding=self.padding, layers=self.layers
            )

        self.inc = residual(self.inc)
        for level in range(1, 5):
            down, up = getattr(self, f"down{level}"), getattr(self, f"up{level}")
            down.maxpool_conv[1] = residual(down.maxpool_conv[1])
            up.conv = residual(up.conv)
        self.finish(self.spatial_dims)


class UNetPlusPlus(FusedModel, nn.Module):
    """U-Net++ (Zhou et al., 2018): nested, densely connected skips. Node X(i, j) is `conv{i}_{j}`:
    X(i, 0) is the encoder; X(i, j) = DoubleConv([X(i, 0), ..., X(i, j-1), up(X(i+1, j-1))]).
    With deep_supervision the forward returns the four heads' logits (from X(0, 1..4)) as a list,
    else the last one. Bilinear (trilinear) upsampling; same padding; any input size >= 16.
    spatial_dims, norm, act: as UNet's.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        base_features: int = 32,
        deep_supervision: bool = False,
        *,
        spatial_dims: int = 2,
        norm="batch",
        act="relu",
        backend: str = "auto",
    ):
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.deep_supervision, self.backend = deep_supervision, backend
        self.spatial_dims = spatial_dims
        layers = Layers(spatial_dims, norm, act)
        self.norm = layers.norm_name
        f = [base_features * 2**i for i in range(DEPTH + 1)]
        self.pool = layers.max_pool(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode=layers.upsample_mode, align_corners=True)
        for i in range(5):
            setattr(
                self, f"conv{i}_0", DoubleConv(f[i - 1] if i else in_channels, f[i], layers=layers)
            )
        for j in range(1, 5):
            for i in range(5 - j):
                setattr(self, f"conv{i}_{j}", DoubleConv(f[i] * j + f[i + 1], f[i], layers=layers))
        heads = range(1, 5) if deep_supervision else [4]
        self.heads = nn.ModuleList(layers.conv(f[0], num_classes, 1) for _ in heads)
        self.finish(spatial_dims)

    def join(self, dense, up):
        if self.spatial_dims == 3:  # crop_concat's kernels are 2-D: volumes join with torch.cat
            return crop_concat(dense, up, dense.shape[2:])
        return ops.crop_concat(dense, up, backend=self.backend)

    def forward(self, x):
        check_input(x, self.in_channels, "same", DEPTH, self.spatial_dims, self.norm, self.training)
        x, fmt = self.layout(x)
        nodes = [[self.conv0_0(x)]]
        for i in range(1, 5):
            nodes.append([getattr(self, f"conv{i}_0")(self.pool(nodes[i - 1][0]))])
        for j in range(1, 5):
            for i in range(5 - j):
                dense = torch.cat(nodes[i][:j], dim=1) if j > 1 else nodes[i][0]
                joined = self.join(dense, self.up(nodes[i + 1][j - 1]))
                nodes[i].append(getattr(self, f"conv{i}_{j}")(joined))
        first_head = 1 if self.deep_supervision else 4
        outs = [
            head(nodes[0][j]).contiguous(memory_format=fmt)
            for head, j in zip(self.heads, range(first_head, 5))
        ]
        return outs if self.deep_supervision else outs[0]
