"""Overlap-tile prediction: one tile is exactly a plain forward pass, many tiles agree with the
whole-image pass."""
import numpy as np
import pytest
import torch

import unet_fast
from unet_fast.train.predict import predict_tiled


def forward(model, image):
    with torch.inference_mode():
        return model(image[None])[0]


def mirrored(image, after_h, after_w, before=0):
    """numpy's reflect padding (pads of any length), independent of predict's own indexing."""
    pads = [(0, 0), (before, before + after_h), (before, before + after_w)]
    return torch.from_numpy(np.pad(image.numpy(), pads, mode="reflect"))


@pytest.mark.parametrize("channels, classes, size", [(1, 1, (97, 130)), (3, 2, (97, 130)),
                                                     (1, 3, (5, 7)), (3, 1, (64, 48))])
def test_one_tile_is_exactly_the_padded_forward_pass(channels, classes, size):
    model = unet_fast.UNet(channels, classes, base_features=4).eval()
    image = torch.randn(channels, *size)
    got = predict_tiled(model, image, tile=256)
    padded_h, padded_w = (max(16, -(-s // 16) * 16) for s in size)
    want = forward(model, mirrored(image, padded_h - size[0], padded_w - size[1]))
    assert got.shape == (classes, *size)
    assert torch.equal(got, want[:, :size[0], :size[1]])
    if size == (64, 48):  # already a valid size: the plain forward pass, nothing padded
        assert torch.equal(got, forward(model, image))


def test_odd_sizes_tiled_keep_their_size_and_channels():
    for channels in (1, 3):
        model = unet_fast.UNet(channels, 3, base_features=4).eval()
        logits = predict_tiled(model, torch.randn(channels, 97, 130), tile=48, overlap=16,
                               batch_size=3)
        assert logits.shape == (3, 97, 130) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()


def test_tiles_agree_with_the_whole_image_and_overlap_removes_seams():
    model = unet_fast.UNet(1, 1, base_features=4).eval()
    image = torch.randn(1, 160, 224)
    whole = forward(model, image)[0]
    spread = (whole - whole.median()).abs().max()
    error = {overlap: (predict_tiled(model, image, tile=96, overlap=overlap)[0] - whole).abs()
             for overlap in (0, 32)}
    # the bottom and right tiles reach into mirrored pixels where the whole pass saw zeros
    interior = (slice(0, -32), slice(0, -32))
    assert error[32][interior].max() < 0.02 * spread
    assert error[0][interior].max() > 10 * error[32][interior].max()  # hard seams without overlap
    assert model.training is False


def test_valid_padding_tiles_equal_the_whole_mirrored_image():
    """The paper's geometry: 92 mirrored pixels of context on each side, outputs of 68 pixels
    for 252-pixel tiles. Transposed-conv upsampling is translation-equivariant on the pooling
    grid, so the blend of tiles equals one pass over the whole mirrored canvas."""
    model = unet_fast.UNet(1, 2, base_features=4, bilinear=False, padding="valid").train()
    image = torch.randn(1, 100, 130)
    got = predict_tiled(model, image, tile=260, overlap=16, batch_size=2)
    assert model.training  # eval for the prediction, then restored
    model.eval()
    # 68-pixel outputs at stride 48: rows 0, 48 (canvas 116), columns 0, 48, 96 (canvas 164)
    want = forward(model, mirrored(image, 116 - 100, 164 - 130, before=92))
    assert want.shape == (2, 116, 164) and got.shape == (2, 100, 130)
    torch.testing.assert_close(got, want[:, :100, :130], rtol=1e-4, atol=1e-5)
    small = torch.randn(1, 40, 60)  # one tile of the smallest valid size: outputs 52 x 68
    assert torch.equal(predict_tiled(model, small, tile=572),
                       forward(model, mirrored(small, 52 - 40, 68 - 60, before=92))[:, :40, :60])


@pytest.mark.parametrize("kwargs, message", [
    ({"tile": 8}, "tile 8 is too small"),
    ({"tile": 64, "overlap": 56}, "overlap 56 leaves no room"),
    ({"batch_size": 0}, "batch_size >= 1"),
])
def test_tiling_arguments_are_checked(kwargs, message):
    model = unet_fast.UNet(1, 1, base_features=4).eval()
    with pytest.raises(ValueError, match=message):
        predict_tiled(model, torch.randn(1, 100, 100), **kwargs)
    with pytest.raises(ValueError, match="expects 1 channels, the image has 3"):
        predict_tiled(model, torch.randn(3, 100, 100))
