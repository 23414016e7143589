"""3-D data end to end: NIfTI and TIFF-stack volumes read, paired and augmented; overlap-tile
prediction of volumes; `unet-fast train --spatial-dims 3` and `unet-fast predict` of volumes."""

import nibabel
import numpy as np
import pytest
import tifffile
import torch

import unet_fast
from unet_fast import cli
from unet_fast.train import losses, metrics
from unet_fast.train.data import seed_transform
from unet_fast.train.distributed import Distributed
from unet_fast.train.images import read_volume, read_volume_mask, volume_shape, zscore
from unet_fast.train.offset import OffsetModel
from unet_fast.train.predict import predict_averaged, predict_tiled
from unet_fast.train.validate import validate
from unet_fast.train.volumes import SyntheticVolumes, VolumeFolder, VolumeTransform

AFFINE = np.diag([0.5, 0.7, 1.2, 1.0])


def save_nifti(path, array, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(array, affine), path)


def volume_folder(tmp_path, shape=(6, 10, 12)):
    """Two NIfTI cases and one TIFF stack; masks of 0/1 where the image is above its median."""
    rng = np.random.default_rng(0)
    for stem in ("case1", "case2", "stack"):
        image = rng.integers(0, 1000, shape).astype(np.int16)
        mask = (image > np.median(image)).astype(np.uint8)
        if stem == "stack":
            (tmp_path / "images").mkdir(parents=True, exist_ok=True)
            (tmp_path / "masks").mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(tmp_path / "images" / f"{stem}.tif", image)
            tifffile.imwrite(tmp_path / "masks" / f"{stem}.tif", mask)
        else:
            save_nifti(tmp_path / "images" / f"{stem}.nii.gz", image)
            save_nifti(tmp_path / "masks" / f"{stem}.nii.gz", mask)
    return tmp_path / "images", tmp_path / "masks"


def test_volumes_read_z_scored_with_their_channels(tmp_path):
    raw = np.random.default_rng(1).normal(300, 40, (5, 7, 9, 2)).astype(np.float32)
    save_nifti(tmp_path / "two.nii", raw)
    volume = read_volume(tmp_path / "two.nii")
    assert volume.shape == (5, 7, 9, 2) and volume.dtype == np.float32
    np.testing.assert_allclose(volume, (raw - raw.mean((0, 1, 2))) / raw.std((0, 1, 2)), atol=1e-5)
    assert volume_shape(tmp_path / "two.nii") == (5, 7, 9)
    tifffile.imwrite(tmp_path / "stack.tif", raw[..., 0].astype(np.uint16))
    assert read_volume(tmp_path / "stack.tif").shape == (5, 7, 9, 1)
    constant = np.full((2, 3, 4, 1), 7.0, np.float32)
    assert np.array_equal(zscore(constant), np.zeros_like(constant))  # no division by zero
    with pytest.raises(ValueError, match="has 2 channels, not 1"):
        read_volume(tmp_path / "two.nii", channels=1)
    save_nifti(tmp_path / "flat.nii.gz", np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"expected a 3-D volume, got an array of shape \(4, 5\)"):
        read_volume(tmp_path / "flat.nii.gz")
    raw[0, 0, 0, 0] = np.nan
    save_nifti(tmp_path / "nan.nii.gz", raw)
    with pytest.raises(ValueError, match="NaN or infinite"):
        read_volume(tmp_path / "nan.nii.gz")
    save_nifti(tmp_path / "half.nii.gz", np.full((2, 2, 2), 0.5, np.float32))
    with pytest.raises(ValueError, match="whole numbers"):
        read_volume_mask(tmp_path / "half.nii.gz")


def test_volume_folder_pairs_nifti_and_tiff_stacks(tmp_path):
    images, masks = volume_folder(tmp_path)
    data = VolumeFolder(images, masks)
    assert [s.name for s in data.samples] == ["case1", "case2", "stack"]
    assert data.binary and data.out_channels == 1
    for index in range(3):
        volume, mask = data[index]
        assert volume.shape == (1, 6, 10, 12) and mask.shape == (1, 6, 10, 12)
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        # the masks mark voxels above the median: the z-scored volume agrees
        assert torch.equal(mask[0] > 0, volume[0] > volume[0].median())
    save_nifti(masks / "case2.nii.gz", np.zeros((6, 10, 11), np.uint8))
    with pytest.raises(ValueError, match="mask size 6x10x11 does not match volume size 6x10x12"):
        VolumeFolder(images, masks)
    (masks / "case2.nii.gz").unlink()
    with pytest.raises(ValueError, match="volumes without a mask in .*: case2.nii.gz"):
        VolumeFolder(images, masks)
    save_nifti(masks / "case2.nii.gz", np.full((6, 10, 12), 3, np.uint8))
    with pytest.raises(ValueError, match="unexpected mask values 3"):
        VolumeFolder(images, masks).validate()


def test_synthetic_volumes_are_deterministic_and_labelled():
    data = SyntheticVolumes(3, (24, 32, 32), seed=5)
    volume, mask = data[1]
    again, same = SyntheticVolumes(3, (24, 32, 32), seed=5)[1]
    assert torch.equal(volume, again) and torch.equal(mask, same)
    assert volume.shape == (1, 24, 32, 32) and mask.shape == (1, 24, 32, 32)
    assert abs(volume.mean()) < 1e-4 and abs(volume.std() - 1) < 1e-3
    membrane = mask[0] > 0
    assert 0.1 < membrane.float().mean() < 0.4
    assert volume[0][membrane].mean() < volume[0][~membrane].mean() - 1  # dark walls
    classes = SyntheticVolumes(1, 24, multiclass=True).load(0)[1]
    assert set(np.unique(classes)) == {0, 1, 2}
    with pytest.raises(IndexError, match="sample 3 out of range"):
        data[3]


def test_volume_transform_crops_and_turns_volume_and_mask_together():
    depth, height, width = 10, 20, 24
    volume = np.arange(depth * height * width, dtype=np.float32).reshape(depth, height, width, 1)
    mask = volume[..., 0].astype(np.int32)
    transform = VolumeTransform((8, 16, 16), intensity_p=0.0)
    seen = set()
    for seed in range(8):
        seed_transform(transform, seed)
        out = transform(image=volume, mask=mask)
        assert out["image"].shape == (8, 16, 16, 1) and out["mask"].shape == (8, 16, 16)
        assert np.array_equal(out["image"][..., 0], out["mask"])
        seen.add(tuple(out["mask"][0, 0, :2]))
    assert len(seen) > 4  # crops and views differ between draws
    small = transform(image=volume[:4, :5], mask=mask[:4, :5])  # mirrored out to the crop
    assert small["image"].shape == (8, 16, 16, 1) and np.array_equal(
        small["image"][..., 0], small["mask"]
    )
    noisy = VolumeTransform((8, 16, 16), symmetry="none", intensity_p=1.0)
    seed_transform(noisy, 0)
    first = noisy(image=volume, mask=mask)
    seed_transform(noisy, 0)
    second = noisy(image=volume, mask=mask)
    assert np.array_equal(first["image"], second["image"])  # seeded: repeatable
    changed = first["image"][..., 0] != first["mask"]
    assert changed.mean() > 0.5  # intensity touched the volume, not the mask's values
    with pytest.raises(ValueError, match="symmetry must be one of"):
        VolumeTransform((8, 8, 8), symmetry="cubic")


def forward(model, volume):
    with torch.inference_mode():
        return model(volume[None])[0]


def unet3d(classes=2, norm="batch"):
    """Eval BatchNorm (running statistics) is the same map wherever a tile lies; InstanceNorm
    normalises each tile by its own statistics."""
    torch.manual_seed(0)
    return unet_fast.UNet(1, classes, base_features=4, spatial_dims=3, norm=norm).eval()


def test_one_tile_of_a_volume_is_the_padded_forward_pass():
    model = unet3d(norm="instance")
    volume = torch.randn(1, 13, 20, 18)
    got = predict_tiled(model, volume, tile=64)
    padded = torch.from_numpy(
        np.pad(volume.numpy(), [(0, 0), (0, 3), (0, 12), (0, 14)], mode="reflect")
    )
    assert got.shape == (2, 13, 20, 18)
    assert torch.equal(got, forward(model, padded)[:, :13, :20, :18])


def test_volume_tiles_agree_with_the_whole_volume_and_overlap_removes_seams():
    model = unet3d(1)
    volume = torch.randn(1, 32, 64, 80)
    whole = forward(model, volume)[0]
    spread = (whole - whole.median()).abs().max()
    error = {
        overlap: (predict_tiled(model, volume, tile=(32, 32, 48), overlap=overlap)[0] - whole).abs()
        for overlap in (0, 16)
    }
    interior = (slice(None), slice(0, -16), slice(0, -16))  # far tiles reach mirrored voxels
    assert error[16][interior].max() < 0.05 * spread
    assert error[0][interior].max() > 3 * error[16][interior].max()


def test_volume_test_time_augmentation_and_shape_errors():
    model = unet3d()
    volume = torch.randn(1, 16, 24, 24)
    views = []
    for turns in range(4):
        for flip in (False, True):
            view = torch.rot90(volume, turns, (2, 3))
            view = view.flip(3) if flip else view
            out = predict_tiled(model, view.contiguous())
            views.append(torch.rot90(out.flip(3) if flip else out, -turns, (2, 3)))
    got = predict_averaged(model, volume, tta=True)
    torch.testing.assert_close(got, torch.stack(views).mean(0))
    with pytest.raises(
        ValueError, match=r"a 3-D model predicts a C×D×H×W tensor, got \(1, 24, 24\)"
    ):
        predict_tiled(model, torch.randn(1, 24, 24))
    with pytest.raises(ValueError, match="2 tile sizes for an image of 3 axes"):
        predict_tiled(model, volume, tile=(32, 32))


def test_validation_predicts_volumes_tile_by_tile():
    """With tiling, validation runs each volume as overlapping tiles of the crop's size in
    batches (never the whole volume at once); a volume one tile covers scores as its plain
    forward pass."""
    model = OffsetModel(unet3d())
    shapes = []
    model.model.register_forward_pre_hook(lambda module, args: shapes.append(args[0].shape))
    volume, mask = torch.randn(1, 1, 20, 40, 22), (torch.rand(1, 20, 40, 22) > 0.5).long()
    env = Distributed("cpu")

    def score(tiling, images=volume, masks=mask):
        return validate(
            model,
            [(images, masks)],
            losses.cross_entropy_loss,
            2,
            None,
            None,
            env,
            True,
            tiling=tiling,
        )

    loss, dice, *_ = score({"tile": (16, 16, 16), "batch_size": 2})
    assert shapes and {s[0] for s in shapes} <= {1, 2} and {s[2:] for s in shapes} == {(16,) * 3}
    assert 0 <= dice[1] <= 1 and loss > 0
    small = volume[..., :16, :16, :16], mask[..., :16, :16, :16]
    tiled, whole = score({"tile": (16, 16, 16), "batch_size": 2}, *small), score(None, *small)
    for a, b in zip(tiled, whole, strict=True):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_volumes_of_different_shapes_train_and_validate(tmp_path, capsys):
    rng = np.random.default_rng(0)
    shapes = ((20, 24, 28), (16, 20, 20), (18, 40, 22), (24, 20, 36))
    for stem, shape in zip("abcd", shapes, strict=True):
        image = rng.normal(0, 1, shape).astype(np.float32)
        save_nifti(tmp_path / "images" / f"{stem}.nii.gz", image)
        save_nifti(tmp_path / "masks" / f"{stem}.nii.gz", (image > 0).astype(np.uint8))
    options = ["--spatial-dims", "3", "--crop", "16", "--base-features", "4", "--batch-size", "2"]
    code = cli.main(
        ["train", "--data", str(tmp_path), *options, "--val-count", "2", "--epochs", "1",
         "--quiet", "--out", str(tmp_path / "run")]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "best.pt").exists()


def test_losses_and_metrics_of_volumes_are_those_of_the_flattened_planes():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 3, 5, 6)
    target = (torch.rand(2, 1, 3, 5, 6) > 0.5).float()
    flat = logits.flatten(3), target.flatten(3)  # B×1×D×(H·W): the same voxels, 4-D
    for loss in (losses.bce_loss, losses.dice_loss, losses.bce_dice_loss):
        torch.testing.assert_close(loss(logits, target), loss(*flat))
    classes = torch.randn(2, 3, 3, 5, 6)
    labels = torch.randint(0, 3, (2, 3, 5, 6))
    for loss in (losses.cross_entropy_loss, losses.dice_loss):
        torch.testing.assert_close(
            loss(classes, labels), loss(classes.flatten(3), labels.flatten(2))
        )
    predicted = metrics.labels_from_logits(logits)
    assert predicted.shape == (2, 3, 5, 6)
    assert torch.equal(
        metrics.confusion_matrix(predicted, target, 2),
        metrics.confusion_matrix(predicted.flatten(2), target.flatten(3), 2),
    )


def test_train_and_predict_volumes_from_the_command_line(tmp_path, capsys):
    images, masks = volume_folder(tmp_path / "data", shape=(16, 20, 24))
    run = tmp_path / "run"
    arguments = ["train", "--spatial-dims", "3", "--base-features", "4", "--epochs", "1"]
    code = cli.main(
        [
            *arguments,
            "--crop",
            "16",
            "--data",
            str(tmp_path / "data"),
            "--quiet",
            "--val-count",
            "1",
            "--batch-size",
            "2",
            "--out",
            str(run),
        ]
    )
    assert code == 0, capsys.readouterr().err
    state = torch.load(run / "best.pt", weights_only=True)
    assert state["model"]["kwargs"]["spatial_dims"] == 3
    assert state["data"]["normalisation"] == "zscore"
    out = tmp_path / "out"
    code = cli.main(
        [
            "predict",
            str(run / "best.pt"),
            str(images),
            "--out",
            str(out),
            "--quiet",
            "--tile",
            "32",
            "--overlap",
            "8",
            "--blend",
            "constant",
        ]
    )
    assert code == 0 and "wrote 3 masks to" in capsys.readouterr().out
    mask = nibabel.load(out / "case1_mask.nii.gz")
    source = nibabel.load(images / "case1.nii.gz")  # the header stores float32
    assert mask.shape == (16, 20, 24) and np.array_equal(mask.affine, source.affine)
    assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 255}
    assert tifffile.imread(out / "stack_mask.tif").shape == (16, 20, 24)
    code = cli.main([*arguments, "--learn-offset", "--out", str(tmp_path / "r3"), "--quiet"])
    assert code == 2 and "not with --spatial-dims 3" in capsys.readouterr().err


def test_train_on_generated_volumes(tmp_path, capsys):
    code = cli.main(
        [
            "train",
            "--spatial-dims",
            "3",
            "--base-features",
            "4",
            "--crop",
            "16",
            "32",
            "32",
            "--epochs",
            "1",
            "--model",
            "resunet",
            "--norm",
            "instance",
            "--act",
            "leaky_relu:0.02",
            "--quiet",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    model = unet_fast.train.checkpoint.load_model(tmp_path / "run" / "best.pt")[0]
    assert type(model) is unet_fast.ResUNet and model.spatial_dims == 3
    assert {type(m) for m in model.modules()} >= {torch.nn.InstanceNorm3d, torch.nn.LeakyReLU}
    assert {m.negative_slope for m in model.modules() if isinstance(m, torch.nn.LeakyReLU)} == {
        0.02
    }
    with pytest.raises(SystemExit) as exit_status:  # argparse rejects it
        cli.main(["train", "--norm", "group:x", "--out", str(tmp_path / "bad")])
    error = capsys.readouterr().err
    assert (
        exit_status.value.code == 2
        and "expected batch, instance or group:G, got 'group:x'" in error
    )
    code = cli.main(
        [
            "train",
            "--spatial-dims",
            "3",
            "--crop",
            "16",
            "16",
            "--quiet",
            "--out",
            str(tmp_path / "bad"),
        ]
    )
    assert (
        code == 2 and "--crop takes 1 or 3 positive sizes, got [16, 16]" in capsys.readouterr().err
    )


@pytest.mark.parametrize("dims", [2, 3])
def test_constant_blend_equals_monai_sliding_window_inference(dims):
    """Where the tiles fit the image exactly, both place them alike: with MONAI's constant
    blending ours averages the same tile outputs."""
    inferers = pytest.importorskip("monai.inferers")
    torch.manual_seed(0)
    model = unet_fast.UNet(1, 2, base_features=4, spatial_dims=dims).eval()
    shape, tile, overlap = ((64, 80), (32, 48), (0.5, 1 / 3))
    if dims == 3:
        shape, tile, overlap = (32, *shape), (32, *tile), (0.5, *overlap)
    image = torch.randn(1, *shape)
    ours = predict_tiled(model, image, tile=tile, overlap=16, batch_size=3, blend="constant")
    with torch.inference_mode():
        theirs = inferers.sliding_window_inference(
            image[None], tile, 3, model, overlap=overlap, mode="constant"
        )[0]
    torch.testing.assert_close(ours, theirs)
    cosine = predict_tiled(model, image, tile=tile, overlap=16, batch_size=3)
    assert not torch.allclose(cosine, theirs)  # the default ramps the overlaps instead
    with pytest.raises(ValueError, match="blend must be one of"):
        predict_tiled(model, image, tile=tile, overlap=16, blend="gaussian")
