"""The reference UNet against the tutorial's code, and the reference ops against torch.nn."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests import tutorial_unet
from unet_fast import reference


def small(model_cls, **kw):
    return model_cls(in_channels=3, num_classes=2, base_features=8, **kw)


def train_step(model, x):
    """Output, every parameter gradient, and the BatchNorm buffers after one step."""
    model.zero_grad()
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), grads, {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("size", [(64, 64), (97, 131)])
def test_tutorial_checkpoint_gives_identical_outputs_and_gradients(size):
    tutorial = small(tutorial_unet.UNet, bilinear=False)
    ours = small(reference.UNet, bilinear=False)
    ours.load_state_dict(tutorial.state_dict(), strict=True)
    x = torch.randn(2, 3, *size)
    for _ in range(2):  # two steps: the second uses the running statistics the first updated
        out_t, grads_t, buffers_t = train_step(tutorial.train(), x)
        out_o, grads_o, buffers_o = train_step(ours.train(), x)
        assert out_o.shape == (2, 2, *size)
        torch.testing.assert_close(out_o, out_t, rtol=0, atol=0)
        torch.testing.assert_close(grads_o, grads_t, rtol=0, atol=0)
        torch.testing.assert_close(buffers_o, buffers_t, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), tutorial.eval()(x), rtol=0, atol=0)


def test_state_dict_keys_are_the_tutorials_both_ways():
    tutorial = small(tutorial_unet.UNet, bilinear=False)
    ours = small(reference.UNet, bilinear=False)
    assert list(ours.state_dict()) == list(tutorial.state_dict())
    for key in [
        "inc.double_conv.0.weight",
        "down1.maxpool_conv.1.double_conv.4.running_var",
        "up1.up.weight",
        "up1.conv.double_conv.3.weight",
        "outc.weight",
    ]:
        assert key in ours.state_dict()
    tutorial.load_state_dict(ours.state_dict(), strict=True)


def test_bilinear_has_pytorch_unet_semantics_where_the_tutorial_crashes():
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(RuntimeError, match="channels"):
        tutorial_unet.UNet(3, 2, bilinear=True)(x)
    # Pytorch-UNet's published parameter counts for UNet(3, 2) with and without bilinear
    assert reference.UNet(3, 2, bilinear=True).count_parameters() == 17_263_042
    assert reference.UNet(3, 2, bilinear=False).count_parameters() == 31_037_698
    model = small(reference.UNet, bilinear=True)
    assert "up1.up.weight" not in model.state_dict()  # an nn.Upsample has no parameters
    assert model.up1.conv.double_conv[0].in_channels == 128  # upsampled 64 + skip 64
    assert model.up1.conv.double_conv[0].out_channels == 64  # mid = in // 2
    assert model(torch.randn(2, 3, 97, 131)).shape == (2, 2, 97, 131)


def test_valid_padding_has_the_papers_geometry():
    model = reference.UNet(1, 2, base_features=2, bilinear=False, padding="valid")
    assert model(torch.randn(1, 1, 572, 572)).shape == (1, 2, 388, 388)
    with pytest.raises(ValueError, match="nearest valid sizes: 572"):
        model(torch.randn(1, 1, 570, 572))


@pytest.mark.parametrize(
    "shape, error, message",
    [
        ((1, 3, 15, 64), ValueError, "too small for 4 poolings: the minimum is 16"),
        ((1, 3, 64, 8), ValueError, "minimum is 16"),
        ((3, 64, 64), ValueError, r"4-D input \(N, 3, H, W\)"),
        ((1, 4, 64, 64), ValueError, r"expects 3 input channels \(N, 3, H, W\)"),
    ],
)
def test_bad_input_raises_a_clear_error(shape, error, message):
    with pytest.raises(error, match=message):
        small(reference.UNet)(torch.randn(shape))


def test_integer_input_raises_type_error():
    with pytest.raises(TypeError, match="floating-point"):
        small(reference.UNet)(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_minimum_size_works():
    assert small(reference.UNet)(torch.randn(2, 3, 16, 17)).shape == (2, 2, 16, 17)


def sequential(cin, cout, padding):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=padding), nn.BatchNorm2d(cout, momentum=0.3), nn.ReLU()
    ).double()


@pytest.mark.parametrize("training", [True, False])
def test_conv_bn_relu_is_the_module_composition(training):
    block = sequential(3, 5, padding=1)
    with torch.no_grad():
        block[1].weight.uniform_(0.5, 1.5), block[1].bias.uniform_(-0.5, 0.5)
        block[1].running_mean.uniform_(-1, 1), block[1].running_var.uniform_(0.5, 2)
    conv, bn = block[0], block[1]
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    expected = block.train(training)(x)
    got = reference.conv_bn_relu(
        x, conv.weight, conv.bias, bn.weight, bn.bias, mean, var, training, 0.3, bn.eps, 1
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close((mean, var), (bn.running_mean, bn.running_var), rtol=0, atol=0)
    assert (got >= 0).all() and (got == 0).any() and (got > 0).any()


def test_double_conv_is_two_module_compositions():
    a, b = sequential(2, 4, padding=0), sequential(4, 3, padding=0)
    x = torch.randn(3, 2, 12, 10, dtype=torch.float64)
    params = []
    for block in (a, b):
        conv, bn = block[0], block[1]
        params.append(
            (
                conv.weight,
                conv.bias,
                bn.weight,
                bn.bias,
                bn.running_mean.clone(),
                bn.running_var.clone(),
            )
        )
    got = reference.double_conv(x, *params[0], *params[1], True, 0.3, 0.3, 1e-5, 1e-5, 0)
    torch.testing.assert_close(got, b(a(x)), rtol=0, atol=0)
    assert got.shape == (3, 3, 8, 6)


@pytest.mark.parametrize("size", [(6, 8), (9, 11), (3, 4), (2, 13), (1, 1)])
def test_crop_concat_places_each_input_by_hand(size):
    skip, up = torch.randn(2, 3, 6, 8), torch.randn(2, 4, 5, 5)
    expected = torch.zeros(2, 7, *size)
    for channels, x in ((slice(0, 3), skip), (slice(3, 7), up)):
        top, left = (size[0] - x.shape[2]) // 2, (size[1] - x.shape[3]) // 2  # floor, as F.pad
        for h in range(size[0]):
            for w in range(size[1]):
                if 0 <= h - top < x.shape[2] and 0 <= w - left < x.shape[3]:
                    expected[:, channels, h, w] = x[:, :, h - top, w - left]
    torch.testing.assert_close(reference.crop_concat(skip, up, size), expected, rtol=0, atol=0)


def test_fit_matches_the_tutorials_pad_and_the_papers_centre_crop():
    x = torch.arange(5 * 7.0).view(1, 1, 5, 7)
    torch.testing.assert_close(reference.fit(x, (8, 8)), F.pad(x, [0, 1, 1, 2]))
    torch.testing.assert_close(reference.fit(x, (3, 4)), x[..., 1:4, 2:6])
