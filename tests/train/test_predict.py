"""Overlap-tile prediction: one tile is exactly a plain forward pass, many tiles agree with the
whole-image pass, and `predict_files` writes masks and overlays in the training masks' values,
with every bad input refused before anything is written."""

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import unet_fast
import unet_fast.train.predict_files as predict_command
from unet_fast import cli
from unet_fast.train import predict
from unet_fast.train.checkpoint import CheckpointError, model_spec, save_checkpoint
from unet_fast.train.predict import predict_tiled
from unet_fast.train.predict_files import predict_files


def forward(model, image):
    with torch.inference_mode():
        return model(image[None])[0]


def mirrored(image, after_h, after_w, before=0):
    """numpy's reflect padding (pads of any length), independent of predict's own indexing."""
    pads = [(0, 0), (before, before + after_h), (before, before + after_w)]
    return torch.from_numpy(np.pad(image.numpy(), pads, mode="reflect"))


@pytest.mark.parametrize(
    "channels, classes, size",
    [(1, 1, (97, 130)), (3, 2, (97, 130)), (1, 3, (5, 7)), (3, 1, (64, 48))],
)
def test_one_tile_is_exactly_the_padded_forward_pass(channels, classes, size):
    model = unet_fast.UNet(channels, classes, base_features=4).eval()
    image = torch.randn(channels, *size)
    got = predict_tiled(model, image, tile=256)
    padded_h, padded_w = (max(16, -(-s // 16) * 16) for s in size)
    want = forward(model, mirrored(image, padded_h - size[0], padded_w - size[1]))
    assert got.shape == (classes, *size)
    assert torch.equal(got, want[:, : size[0], : size[1]])
    if size == (64, 48):  # already a valid size: the plain forward pass, nothing padded
        assert torch.equal(got, forward(model, image))


# each symmetry's views as (quarter turns, mirror left-right), listed by hand
VIEWS = {
    "dihedral": [(t, f) for t in range(4) for f in (False, True)],
    "hflip": [(0, False), (0, True)],
    "none": [(0, False)],
}


@pytest.mark.parametrize("symmetry", sorted(VIEWS))
def test_test_time_augmentation_averages_the_views_mapped_back(symmetry):
    model = unet_fast.UNet(1, 2, base_features=4).eval()
    image = torch.randn(1, 40, 56)
    views = []
    for turns, flip in VIEWS[symmetry]:
        view = torch.rot90(image, turns, (1, 2))
        view = view.flip(2) if flip else view
        out = predict_tiled(model, view.contiguous(), tile=256)
        views.append(torch.rot90(out.flip(2) if flip else out, -turns, (1, 2)))
    got = predict.predict_averaged(model, image, tta=True, symmetry=symmetry, tile=256)
    torch.testing.assert_close(got, torch.stack(views).mean(0))
    if len(views) > 1:
        assert not torch.allclose(views[0], views[1])  # the views differ: the mean means something
    assert torch.equal(
        predict.predict_averaged(model, image, tile=256), predict_tiled(model, image, tile=256)
    )
    with pytest.raises(ValueError, match="symmetry must be one of"):
        predict.predict_averaged(model, image, tta=True, symmetry="rot45")


def test_odd_sizes_tiled_keep_their_size_and_channels():
    for channels in (1, 3):
        model = unet_fast.UNet(channels, 3, base_features=4).eval()
        logits = predict_tiled(
            model, torch.randn(channels, 97, 130), tile=48, overlap=16, batch_size=3
        )
        assert logits.shape == (3, 97, 130) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()


def test_tiles_agree_with_the_whole_image_and_overlap_removes_seams():
    model = unet_fast.UNet(1, 1, base_features=4).eval()
    image = torch.randn(1, 160, 224)
    whole = forward(model, image)[0]
    spread = (whole - whole.median()).abs().max()
    error = {
        overlap: (predict_tiled(model, image, tile=96, overlap=overlap)[0] - whole).abs()
        for overlap in (0, 32)
    }
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
    assert torch.equal(
        predict_tiled(model, small, tile=572),
        forward(model, mirrored(small, 52 - 40, 68 - 60, before=92))[:, :40, :60],
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tile": 8}, "tile 8 is too small"),
        ({"tile": 64, "overlap": 56}, "overlap 56 leaves no room"),
        ({"batch_size": 0}, "batch_size >= 1"),
    ],
)
def test_tiling_arguments_are_checked(kwargs, message):
    model = unet_fast.UNet(1, 1, base_features=4).eval()
    with pytest.raises(ValueError, match=message):
        predict_tiled(model, torch.randn(1, 100, 100), **kwargs)
    with pytest.raises(ValueError, match="expects 1 channels, the image has 3"):
        predict_tiled(model, torch.randn(3, 100, 100))


# ----------------------------------------------------------------------------- files

MEAN, STD = 0.3, 0.2


def save_model(tmp_path, model, data, name="model.pt"):
    return save_checkpoint(
        {"model": model_spec(model), "state_dict": model.state_dict(), "data": data},
        tmp_path / name,
    )


def binary_checkpoint(tmp_path, image):
    """A 1-channel binary model whose output bias puts the threshold at the median logit of
    `image`, so both classes appear; membrane (stored 0) is the positive class, as in ISBI."""
    model = unet_fast.UNet(1, 1, base_features=4).eval()
    logits = predict_tiled(model, (torch.from_numpy(image)[None] - MEAN) / STD, tile=64)
    with torch.no_grad():
        model.outc.bias -= logits.median()
    data = {
        "channels": 1,
        "mean": [MEAN],
        "std": [STD],
        "binary": True,
        "num_classes": 2,
        "threshold": 0.5,
        "foreground_value": 0,
        "class_values": [255, 0],
    }
    return save_model(tmp_path, model, data), model


def grey(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_binary_masks_hold_the_training_values_and_overlays_colour_the_foreground(tmp_path):
    pixels = grey((50, 70))
    Image.fromarray(pixels).save(tmp_path / "slice.png")
    path, model = binary_checkpoint(tmp_path, pixels.astype(np.float32) / 255)
    out = tmp_path / "out"
    written = predict_files(path, [tmp_path / "slice.png"], out, tile=32, overlap=16)
    assert written == [out / "slice_mask.png", out / "slice_overlay.png"]

    image = torch.from_numpy(pixels.astype(np.float32) / 255)[None]
    logits = predict_tiled(model, (image - MEAN) / STD, tile=32, overlap=16)
    positive = (torch.sigmoid(logits[0]) > 0.5).numpy()
    mask = np.asarray(Image.open(written[0]))
    assert mask.dtype == np.uint8 and mask.shape == (50, 70)
    np.testing.assert_array_equal(mask, np.where(positive, 0, 255))
    assert 0.2 < positive.mean() < 0.8

    overlay = np.asarray(Image.open(written[1]))
    assert overlay.shape == (50, 70, 3)
    np.testing.assert_array_equal(overlay[~positive], np.repeat(pixels[~positive, None], 3, -1))
    blue = np.array([31, 119, 180])  # tab10's first colour marks class 1
    want = np.rint(0.55 * pixels[positive, None] + 0.45 * blue).astype(np.uint8)
    np.testing.assert_allclose(overlay[positive], want, atol=1)


def test_multiclass_rgb_and_tiff_stack_pages(tmp_path):
    model = unet_fast.UNet(3, 3, base_features=4).eval()
    data = {
        "channels": 3,
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.25, 0.3],
        "binary": False,
        "num_classes": 3,
        "threshold": 0.5,
        "foreground_value": 1,
        "class_values": [0, 7, 9],
    }
    mean, std = np.array(data["mean"], np.float32), np.array(data["std"], np.float32)
    normalised = lambda image: torch.from_numpy(  # noqa: E731
        ((image - mean) / std).astype(np.float32).transpose(2, 0, 1)
    )
    rgb = np.random.default_rng(1).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    with torch.no_grad():  # centre every class's logits, so that all three classes appear
        model.outc.bias -= (
            predict_tiled(model, normalised(rgb / np.float32(255))).median(2)[0].median(1)[0]
        )
    path = save_model(tmp_path, model, data)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(rgb).save(inputs / "b.png")
    stack = np.random.default_rng(2).integers(0, 65536, (2, 30, 20), dtype=np.uint16)
    tifffile.imwrite(inputs / "a.tif", stack)  # grey pages: read as RGB, as training does
    (inputs / "notes.txt").write_text("not an image")
    Image.fromarray(rgb).save(inputs / ".hidden.png")

    written = predict_files(path, [inputs], tmp_path / "out", tile=32, overlap=8)
    assert [p.name for p in written] == [
        "a_p0_mask.png",
        "a_p0_overlay.png",
        "a_p1_mask.png",
        "a_p1_overlay.png",
        "b_mask.png",
        "b_overlay.png",
    ]
    for image, mask_path in [
        (np.repeat(stack[1, ..., None], 3, -1) / np.float32(65535), written[2]),
        (rgb / np.float32(255), written[4]),
    ]:
        logits = predict_tiled(model, normalised(image), tile=32, overlap=8)
        want = np.array([0, 7, 9])[logits.argmax(0).numpy()]
        mask = np.asarray(Image.open(mask_path))
        np.testing.assert_array_equal(mask, want)
        assert set(np.unique(mask)) <= {0, 7, 9} and len(np.unique(mask)) >= 2
    assert np.asarray(Image.open(written[5])).shape == (40, 36, 3)


@pytest.fixture
def good(tmp_path):
    """(checkpoint, a folder with one good image, the output folder with an unrelated file)."""
    pixels = grey((24, 24))
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(pixels).save(folder / "a.png")
    path, _ = binary_checkpoint(tmp_path, pixels.astype(np.float32) / 255)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return path, folder, out


def test_bad_input_is_refused_before_anything_is_written(good, tmp_path):
    path, folder, out = good
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 not really")
    tifffile.imwrite(
        tmp_path / "five.tif",
        np.zeros((8, 8, 5), np.uint8),
        photometric="minisblack",
        planarconfig="contig",
    )
    Image.fromarray(grey((8, 8))).save(tmp_path / "a.tif")
    cases = [
        ([folder, tmp_path / "missing.png"], FileNotFoundError, "missing.png does not exist"),
        ([tmp_path / "empty"], ValueError, "holds no PNG or TIFF images"),
        ([folder, tmp_path / "broken.png"], ValueError, "broken.png is not a readable image"),
        ([folder, tmp_path / "broken.tif"], ValueError, "broken.tif is not a readable image"),
        ([folder, tmp_path / "five.tif"], ValueError, "cannot convert a 5-channel image to 1"),
        ([folder, tmp_path / "a.tif"], ValueError, "would both write a_mask.png"),
    ]
    for inputs, error, message in cases:
        with pytest.raises(error, match=message):
            predict_files(path, inputs, out)
    Image.fromarray(grey((8, 8))).save(folder / "a_mask.png")  # an input, not an output
    with pytest.raises(ValueError, match="a_mask.png would replace an input image"):
        predict_files(path, [folder], folder)
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a_mask.png"]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


def test_output_folder_and_checkpoint_errors(good, tmp_path):
    path, folder, out = good
    with pytest.raises(ValueError, match="exists and is not a folder"):
        predict_files(path, [folder], out / "keep.txt")
    with pytest.raises(ValueError, match="is not writable"):
        predict_files(path, [folder], out / "keep.txt" / "sub")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        predict_files(path, [folder], out, device="cuda")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
        predict_files(broken, [folder], out)
    model = unet_fast.UNet(1, 1, base_features=4)
    with pytest.raises(CheckpointError, match="records no 'data' entry"):
        predict_files(save_model(tmp_path, model, None, "bare.pt"), [folder], out)
    multi = {
        "channels": 1,
        "mean": [0.5],
        "std": [0.2],
        "binary": False,
        "num_classes": 3,
        "threshold": 0.5,
        "class_values": [0, 1, 2],
    }
    with pytest.raises(CheckpointError, match="the model has 1 outputs"):
        predict_files(save_model(tmp_path, model, multi, "odd.pt"), [folder], out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_command_line_writes_outputs_and_reports_one_line_errors(good, capsys):
    path, folder, out = good
    parser = cli.Parser(prog="unet-fast predict")
    predict_command.add_arguments(parser)
    args = parser.parse_args(
        [
            str(path),
            str(folder),
            "--out",
            str(out),
            "--tile",
            "32",
            "--overlap",
            "8",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--tta",
            "--quiet",
        ]
    )
    assert predict_command.main(args) == [out / "a_mask.png", out / "a_overlay.png"]
    assert "wrote 1 masks and overlays" in capsys.readouterr().out
    args = parser.parse_args([str(path), str(folder / "nope.png"), "--out", str(out)])
    with pytest.raises(ValueError, match="nope.png does not exist"):
        predict_command.main(args)


def test_tta_averages_the_views_the_model_was_trained_under(tmp_path):
    pixels = grey((40, 40), seed=3)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    path, model = binary_checkpoint(tmp_path, pixels.astype(np.float32) / 255)
    state = torch.load(path, weights_only=True)
    image = (torch.from_numpy(pixels.astype(np.float32) / 255)[None] - MEAN) / STD
    masks = {}
    for symmetry in ("dihedral", "hflip"):
        trained = save_checkpoint(
            {**state, "config": {"symmetry": symmetry}}, tmp_path / f"{symmetry}.pt"
        )
        written = predict_files(trained, [tmp_path / "a.png"], tmp_path / symmetry, tta=True)
        masks[symmetry] = np.asarray(Image.open(written[0]))
        logits = predict.predict_averaged(model, image, True, symmetry)
        np.testing.assert_array_equal(masks[symmetry], np.where(logits[0] > 0, 0, 255))
    assert not np.array_equal(masks["dihedral"], masks["hflip"])


def test_a_learnt_label_offset_moves_the_predicted_mask(tmp_path):
    pixels = grey((40, 48), seed=4)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    path, _ = binary_checkpoint(tmp_path, pixels.astype(np.float32) / 255)
    state = torch.load(path, weights_only=True)
    down = torch.zeros(1, 1, 3, 3)
    down[0, 0, 0, 1] = 1  # out[y] = logits[y - 1]: the mask one row lower
    shifted = save_checkpoint({**state, "offset": {"weight": down}}, tmp_path / "offset.pt")
    plain = np.asarray(Image.open(predict_files(path, [tmp_path / "a.png"], tmp_path / "p")[0]))
    moved = np.asarray(Image.open(predict_files(shifted, [tmp_path / "a.png"], tmp_path / "o")[0]))
    np.testing.assert_array_equal(moved[1:], plain[:-1])
    np.testing.assert_array_equal(moved[0], plain[0])  # the edge row replicated
    broken = save_checkpoint(
        {**state, "offset": {"weight": torch.zeros(2, 1, 3, 3)}}, tmp_path / "broken.pt"
    )
    with pytest.raises(CheckpointError, match="label offset does not fit the model's 1 outputs"):
        predict_files(broken, [tmp_path / "a.png"], tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_test_time_augmentation_shares_batches_across_views():
    """The 8 dihedral views of a 40x56 image are one tile each, of two shapes (turned or not):
    two batches of four, not eight model calls, with the same mean as view by view."""
    model = unet_fast.UNet(1, 2, base_features=4).eval()
    image = torch.randn(1, 40, 56)
    calls = []
    handle = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        got = predict.predict_averaged(model, image, tta=True, tile=256, batch_size=4)
    finally:
        handle.remove()
    assert calls == [4, 4]
    views = [predict.predict_views(model, image, [view], tile=256) for view in VIEWS["dihedral"]]
    torch.testing.assert_close(got, torch.stack(views).mean(0))
