"""Other libraries' U-Nets as they ship them, for benchmarks and tests against fuse(): nnU-Net's
PlainConvUNet (dynamic_network_architectures), MONAI's BasicUNet and UNet (residual units,
InstanceNorm, PReLU), in the configurations nnU-Net and MONAI use by default. Install them
with `pip install "unet_fast[test]"`."""

from torch import nn

# name -> (default input shape (N, C, *spatial), spatial dims)
NETWORKS = {
    "nnunet-2d": ((8, 1, 256, 256), 2),
    "nnunet-3d": ((2, 1, 64, 64, 64), 3),
    "monai-basicunet-3d": ((2, 1, 64, 64, 64), 3),
    "monai-unet-3d": ((2, 1, 64, 64, 64), 3),
}


def build(name: str) -> nn.Module:
    """The network `name` (see NETWORKS), freshly initialised, 2 output classes."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose one of {', '.join(NETWORKS)}")
    try:
        if name.startswith("nnunet"):
            from dynamic_network_architectures.architectures.unet import PlainConvUNet
        else:
            from monai.networks.nets import BasicUNet, UNet
    except ImportError as error:
        raise RuntimeError(
            f"{name} needs {error.name}: pip install monai dynamic_network_architectures"
        ) from error
    if name == "monai-basicunet-3d":
        return BasicUNet(spatial_dims=3, in_channels=1, out_channels=2)
    if name == "monai-unet-3d":  # MONAI's tutorials' UNet, its default norm and activation
        return UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)
    three_d = name == "nnunet-3d"
    features = (32, 64, 128, 256, 320) if three_d else (32, 64, 128, 256, 512, 512)
    stages = len(features)
    return PlainConvUNet(
        input_channels=1,
        n_stages=stages,
        features_per_stage=features,
        conv_op=nn.Conv3d if three_d else nn.Conv2d,
        kernel_sizes=3,
        strides=(1,) + (2,) * (stages - 1),
        n_conv_per_stage=(2,) * stages,
        num_classes=2,
        n_conv_per_stage_decoder=(2,) * (stages - 1),
        conv_bias=True,
        norm_op=nn.InstanceNorm3d if three_d else nn.InstanceNorm2d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=False,
    )
