"""The tutorial's U-Net variants on the fused blocks: Attention U-Net, ResU-Net, U-Net++.

Each is written with plain modules (Conv2d, BatchNorm2d, ReLU in nn.Sequential) and fused like
any model (`FusedModel.finish`); backend="reference" runs the same modules in plain PyTorch.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..reference import DoubleConv, check_input
from .unet import FusedModel, UNet


class AttentionGate(nn.Module):
    """The tutorial's attention gate (Oktay et al., 2018): weights the skip connection by
    sigmoid(psi(relu(W_g(gate) + W_x(skip)))), with the gating signal upsampled to the skip."""

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int):
        super().__init__()
        self.W_g = nn.Conv2d(gate_channels, inter_channels, kernel_size=1, bias=False)
        self.W_x = nn.Conv2d(skip_channels, inter_channels, kernel_size=1, bias=False)
        self.psi = nn.Sequential(
            nn.Conv2d(inter_channels, 1, kernel_size=1, bias=False), nn.BatchNorm2d(1), nn.Sigmoid()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, gate, skip):
        gate_up = F.interpolate(
            self.W_g(gate), size=skip.shape[2:], mode="bilinear", align_corners=True
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
        f = [base_features * 2**i for i in range(5)]
        factor = 2 if bilinear else 1
        gates = [f[4] // factor] + [f[i] // factor for i in (3, 2, 1)]  # decoder inputs
        for level, (gate, skip) in enumerate(zip(gates, (f[3], f[2], f[1], f[0])), start=1):
            setattr(self, f"att{level}", AttentionGate(gate, skip, skip // 2))
        self.finish()

    def decode(self, level, x, skip, recipe=None):
        # the gated skip is no double conv's output: its recipe no longer applies
        return super().decode(level, x, getattr(self, f"att{level}")(x, skip))


class ResidualDoubleConv(nn.Module):
    """The tutorial's residual double conv: relu(conv-bn-relu-conv-bn(x) + shortcut(x))."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        mid_channels: Optional[int] = None,
        padding: str = "same",
    ):
        super().__init__()
        if padding != "same":
            raise ValueError("ResUNet supports padding='same' only (the residual sum needs it)")
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential()
        if in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv(x) + self.shortcut(x))


class ResUNet(UNet):
    """UNet whose double convs are the tutorial's ResidualDoubleConv (first Conv-BN-ReLU fused)."""

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
            return ResidualDoubleConv(seq[0].in_channels, seq[3].out_channels, padding=self.padding)

        self.inc = residual(self.inc)
        for level in range(1, 5):
            down, up = getattr(self, f"down{level}"), getattr(self, f"up{level}")
            down.maxpool_conv[1] = residual(down.maxpool_conv[1])
            up.conv = residual(up.conv)
        self.finish()


class UNetPlusPlus(FusedModel, nn.Module):
    """U-Net++ (Zhou et al., 2018): nested, densely connected skips. Node X(i, j) is `conv{i}_{j}`:
    X(i, 0) is the encoder; X(i, j) = DoubleConv([X(i, 0), ..., X(i, j-1), up(X(i+1, j-1))]).
    With deep_supervision the forward returns the four heads' logits (from X(0, 1..4)) as a list,
    else the last one. Bilinear upsampling; same padding; any input size >= 16.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        base_features: int = 32,
        deep_supervision: bool = False,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.deep_supervision, self.backend = deep_supervision, backend
        f = [base_features * 2**i for i in range(5)]
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        for i in range(5):
            setattr(self, f"conv{i}_0", DoubleConv(f[i - 1] if i else in_channels, f[i]))
        for j in range(1, 5):
            for i in range(5 - j):
                setattr(self, f"conv{i}_{j}", DoubleConv(f[i] * j + f[i + 1], f[i]))
        heads = range(1, 5) if deep_supervision else [4]
        self.heads = nn.ModuleList(nn.Conv2d(f[0], num_classes, 1) for _ in heads)
        self.finish()

    def forward(self, x):
        check_input(x, self.in_channels, "same")
        x, fmt = self.layout(x)
        nodes = [[self.conv0_0(x)]]
        for i in range(1, 5):
            nodes.append([getattr(self, f"conv{i}_0")(self.pool(nodes[i - 1][0]))])
        for j in range(1, 5):
            for i in range(5 - j):
                dense = torch.cat(nodes[i][:j], dim=1) if j > 1 else nodes[i][0]
                joined = ops.crop_concat(dense, self.up(nodes[i + 1][j - 1]), backend=self.backend)
                nodes[i].append(getattr(self, f"conv{i}_{j}")(joined))
        first_head = 1 if self.deep_supervision else 4
        outs = [
            head(nodes[0][j]).contiguous(memory_format=fmt)
            for head, j in zip(self.heads, range(first_head, 5))
        ]
        return outs if self.deep_supervision else outs[0]
