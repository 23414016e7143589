"""The variants, fused, against the same models run in plain PyTorch (backend="reference")."""

import pytest
import torch
from torch import nn

import unet_fast
from tests.helpers import assert_histories_close, training_history
from unet_fast.nn import FusedConvNormAct, FusedDoubleConv, FusedSequential

VARIANTS = [
    (unet_fast.AttentionUNet, {"bilinear": False}, FusedDoubleConv),
    (unet_fast.AttentionUNet, {"bilinear": True}, FusedDoubleConv),
    (unet_fast.ResUNet, {"bilinear": False}, FusedSequential),
    (unet_fast.UNetPlusPlus, {"deep_supervision": True}, FusedDoubleConv),
    (unet_fast.UNetPlusPlus, {"deep_supervision": False}, FusedDoubleConv),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cls, kwargs, fused_type", VARIANTS)
def test_fused_variant_matches_its_plain_pytorch_self(cls, kwargs, fused_type, dtype):
    fused = cls(3, 2, base_features=4, **kwargs).to(dtype)
    plain = cls(3, 2, base_features=4, backend="reference", **kwargs).to(dtype)
    with torch.no_grad():
        for m in fused.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    plain.load_state_dict(fused.state_dict(), strict=True)
    assert any(type(m) is fused_type for m in fused.modules())
    x = torch.randn(2, 3, 37, 45, dtype=dtype)
    assert_histories_close(training_history(fused, x), training_history(plain, x), dtype)


# (constructor arguments, the input's spatial size, the norms that must be there)
LAYERS = [
    ({"spatial_dims": 3, "norm": "instance", "act": ("leaky_relu", 0.01)}, (32, 18, 19)),
    ({"norm": ("group", 2), "act": "prelu"}, (35, 33)),
]


@pytest.mark.parametrize(
    "cls", [unet_fast.AttentionUNet, unet_fast.ResUNet, unet_fast.UNetPlusPlus]
)
@pytest.mark.parametrize("layers, size", LAYERS)
def test_variants_take_unets_dimensions_norms_and_activations(cls, layers, size):
    fused = cls(2, 3, base_features=4, **layers).double()
    plain = cls(2, 3, base_features=4, backend="reference", **layers).double()
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    plain.load_state_dict(fused.state_dict(), strict=True)
    spatial = layers.get("spatial_dims", 2)
    conv = nn.Conv3d if spatial == 3 else nn.Conv2d
    norm = {"instance": nn.InstanceNorm3d, "group": nn.GroupNorm}[fused.norm]
    act = nn.PReLU if layers["act"] == "prelu" else nn.LeakyReLU
    # every block is built from the asked layers (the attention gate keeps its BatchNorm)
    convs = [m for m in plain.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert convs and all(isinstance(m, conv) for m in convs)
    norms = [
        m for m in plain.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm))
    ]
    assert {type(m) for m in norms} - {nn.BatchNorm2d, nn.BatchNorm3d} == {norm}
    assert any(type(m) is act for m in plain.modules())
    assert any(isinstance(m, FusedConvNormAct) for m in fused.modules())
    x = torch.randn(2, 2, *size, dtype=torch.float64)
    history = training_history(fused, x, steps=2)
    assert history[0][0].shape == (2, 3, *size)
    assert_histories_close(history, training_history(plain, x, steps=2), torch.float64)


def test_variants_keep_the_tutorials_names():
    att = unet_fast.AttentionUNet(3, 2, base_features=4)
    assert {"att1.W_g.weight", "att4.psi.1.running_var", "up1.conv.double_conv.0.weight"} <= set(
        att.state_dict()
    )
    res = unet_fast.ResUNet(3, 2, base_features=4)
    assert {"inc.conv.0.weight", "inc.conv.4.running_mean", "inc.shortcut.weight"} <= set(
        res.state_dict()
    )
    nested = unet_fast.UNetPlusPlus(3, 2, base_features=4, deep_supervision=True)
    assert {"conv0_4.double_conv.0.weight", "conv3_1.double_conv.4.bias", "heads.3.weight"} <= set(
        nested.state_dict()
    )
    assert nested.conv0_4.double_conv[0].in_channels == 4 * 4 + 8
