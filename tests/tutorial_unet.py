"""The seed tutorial's U-Net, copied verbatim: the specification the reference UNet must match."""

# ruff: noqa
import torch
import torch.nn as nn
import torch.nn.functional as F


class DoubleConv(nn.Module):
    """
    Double convolution block: (Conv → BN → ReLU) × 2

    This is the core building block of U-Net. Each encoder and decoder
    level consists of two consecutive 3×3 convolutions with batch
    normalization and ReLU activation.

    Args:
        in_channels: Number of input channels
        out_channels: Number of output channels
        mid_channels: Number of channels after first conv (default: out_channels)
    """

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int = None):
        super().__init__()

        if mid_channels is None:
            mid_channels = out_channels

        self.double_conv = nn.Sequential(
            # First convolution
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            # Second convolution
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class EncoderBlock(nn.Module):
    """
    Encoder block: MaxPool → DoubleConv

    Downsamples spatial dimensions by 2× and applies double convolution.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(
            nn.MaxPool2d(kernel_size=2, stride=2), DoubleConv(in_channels, out_channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class DecoderBlock(nn.Module):
    """
    Decoder block: Upsample → Concatenate → DoubleConv

    Upsamples spatial dimensions by 2×, concatenates with encoder features
    via skip connection, and applies double convolution.

    Args:
        in_channels: Number of input channels (from previous decoder level)
        out_channels: Number of output channels
        bilinear: If True, use bilinear upsampling; if False, use transposed conv
    """

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = True):
        super().__init__()

        if bilinear:
            # Bilinear upsampling + 1×1 conv to reduce channels
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                nn.Conv2d(in_channels, in_channels // 2, kernel_size=1),
            )
            # After concatenation: in_channels // 2 + in_channels // 2 = in_channels
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)
        else:
            # Transposed convolution (learnable upsampling)
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """
        Forward pass with skip connection.

        Args:
            x: Input from previous decoder level
            skip: Skip connection from corresponding encoder level
        """
        x = self.up(x)

        # Handle size mismatch due to pooling/unpooling
        # Calculate padding needed to match sizes
        diff_h = skip.size()[2] - x.size()[2]
        diff_w = skip.size()[3] - x.size()[3]

        # Pad x to match skip's size (center crop alternative)
        x = F.pad(x, [diff_w // 2, diff_w - diff_w // 2, diff_h // 2, diff_h - diff_h // 2])

        # Concatenate along channel dimension
        x = torch.cat([skip, x], dim=1)

        return self.conv(x)


class UNet(nn.Module):
    """
    U-Net Architecture for Semantic Segmentation.

    The network consists of a contracting path (encoder) and an expansive
    path (decoder). The encoder captures context while the decoder enables
    precise localization through skip connections.

    Args:
        in_channels: Number of input channels (1 for grayscale, 3 for RGB)
        num_classes: Number of output classes
        base_features: Number of features in first encoder level (default: 64)
        bilinear: Whether to use bilinear upsampling (default: True)

    Example:
        >>> model = UNet(in_channels=3, num_classes=21)
        >>> x = torch.randn(1, 3, 256, 256)
        >>> output = model(x)
        >>> print(output.shape)  # torch.Size([1, 21, 256, 256])
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        base_features: int = 64,
        bilinear: bool = True,
    ):
        super().__init__()

        self.in_channels = in_channels
        self.num_classes = num_classes
        self.bilinear = bilinear

        # Feature progression: 64 → 128 → 256 → 512 → 1024
        features = [base_features * (2**i) for i in range(5)]

        # Initial double convolution (no downsampling)
        self.inc = DoubleConv(in_channels, features[0])

        # Encoder path
        self.down1 = EncoderBlock(features[0], features[1])
        self.down2 = EncoderBlock(features[1], features[2])
        self.down3 = EncoderBlock(features[2], features[3])

        # Bottleneck (factor for bilinear affects last encoder)
        factor = 2 if bilinear else 1
        self.down4 = EncoderBlock(features[3], features[4] // factor)

        # Decoder path
        self.up1 = DecoderBlock(features[4], features[3] // factor, bilinear)
        self.up2 = DecoderBlock(features[3], features[2] // factor, bilinear)
        self.up3 = DecoderBlock(features[2], features[1] // factor, bilinear)
        self.up4 = DecoderBlock(features[1], features[0], bilinear)

        # Final classification layer
        self.outc = nn.Conv2d(features[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Forward pass through U-Net.

        Args:
            x: Input tensor of shape (B, C, H, W)

        Returns:
            Output tensor of shape (B, num_classes, H, W)
        """
        # Encoder path (save features for skip connections)
        x1 = self.inc(x)  # (B, 64, H, W)
        x2 = self.down1(x1)  # (B, 128, H/2, W/2)
        x3 = self.down2(x2)  # (B, 256, H/4, W/4)
        x4 = self.down3(x3)  # (B, 512, H/8, W/8)
        x5 = self.down4(x4)  # (B, 1024 or 512, H/16, W/16) - bottleneck

        # Decoder path (with skip connections)
        x = self.up1(x5, x4)  # (B, 512 or 256, H/8, W/8)
        x = self.up2(x, x3)  # (B, 256 or 128, H/4, W/4)
        x = self.up3(x, x2)  # (B, 128 or 64, H/2, W/2)
        x = self.up4(x, x1)  # (B, 64, H, W)

        # Classification
        logits = self.outc(x)  # (B, num_classes, H, W)

        return logits

    def count_parameters(self) -> int:
        """Count total trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
