"""Data sets and augmentation: pairing, class mapping and every bad-input message; geometric
augmentation moves image and mask together; ISBI 2012 when it is there."""

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from unet_fast.train.augment import (
    GREY_MEAN,
    GREY_STD,
    IMAGENET_MEAN,
    normalize,
    train_transforms,
    val_transforms,
)
from unet_fast.train.data import (
    SegmentationFolder,
    SyntheticCells,
    default_isbi_root,
    find_image_mask_folders,
    isbi2012,
    seed_transform,
)
from unet_fast.train.images import read_image


def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


def folder(tmp_path, stems=("a", "b", "c"), size=(6, 8), mask_values=(0, 255)):
    """PNG pairs: image k is k·10 + position, mask k cycles through mask_values."""
    arrays = {}
    for k, stem in enumerate(stems):
        image = (k * 10 + np.arange(size[0] * size[1]).reshape(size)).astype(np.uint8)
        mask = np.resize(np.array(mask_values, np.uint8), size)
        save(tmp_path / "img" / f"{stem}.png", image)
        save(tmp_path / "msk" / f"{stem}.png", mask)
        arrays[stem] = image, mask
    return tmp_path / "img", tmp_path / "msk", arrays


def test_pairs_by_stem_binary_default_and_foreground(tmp_path):
    images, masks, arrays = folder(tmp_path, stems=("b", "a", "c"))
    data = SegmentationFolder(images, masks)
    assert [s.name for s in data.samples] == ["a", "b", "c"] and len(data) == 3
    assert data.binary and data.num_classes == 2 and data.out_channels == 1
    image, mask = data[1]
    assert image.dtype == torch.float32 and image.shape == (1, 6, 8)
    torch.testing.assert_close(image[0], torch.from_numpy(arrays["b"][0]).float() / 255)
    assert mask.dtype == torch.float32 and mask.shape == (1, 6, 8)
    assert torch.equal(mask[0], torch.from_numpy(arrays["b"][1] == 255).float())
    _, flipped = SegmentationFolder(images, masks, foreground=0)[1]
    assert torch.equal(flipped, 1 - mask)  # ISBI: black (membrane) is the positive class
    _, mapped = SegmentationFolder(images, masks, classes={0: 1, 255: 0})[1]
    assert torch.equal(mapped, flipped)
    for path in sorted(masks.iterdir()):
        path.rename(masks / f"{path.stem}_mask.png")
    suffixed = SegmentationFolder(images, masks, mask_suffix="_mask")
    assert suffixed.samples[1].mask.name == "b_mask.png" and torch.equal(suffixed[1][1], mask)


def test_cache_keeps_decoded_samples_and_hands_out_copies(tmp_path):
    images, masks, _ = folder(tmp_path)
    plain, cached = SegmentationFolder(images, masks), SegmentationFolder(images, masks, cache=True)
    cached.validate()
    expected = plain[1]
    for path in [*images.iterdir(), *masks.iterdir()]:
        path.write_bytes(b"")  # the cache, not the files, is read from now on
    with pytest.raises(Exception):  # noqa: B017 (whichever decoder reads the file says so)
        plain.load(0)
    first = cached.load(1)
    first[0][:] = 7  # a transform writing in place changes nothing cached
    for got, want in zip(cached[1], expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("symmetry, count", [("dihedral", 8), ("hflip", 2), ("none", 1)])
def test_augmentation_draws_only_the_symmetry_views(symmetry, count):
    mask = np.arange(25, dtype=np.int32).reshape(5, 5)  # every pixel tells where it went
    transform = train_transforms(5, 1, scale=None, elastic_p=0, intensity_p=0, symmetry=symmetry)
    seed_transform(transform, 0)
    allowed = {
        "dihedral": [np.rot90(m, k) for m in (mask, mask[:, ::-1]) for k in range(4)],
        "hflip": [mask, mask[:, ::-1]],
        "none": [mask],
    }[symmetry]
    seen = set()
    for _ in range(80):
        got = transform(image=np.zeros((5, 5, 1), np.float32), mask=mask)["mask"].numpy()
        matches = [k for k, view in enumerate(allowed) if np.array_equal(got, view)]
        assert matches, f"{symmetry} drew a view it should not:\n{got}"
        seen.add(matches[0])
    assert len(seen) == count
    with pytest.raises(ValueError, match="symmetry must be one of"):
        train_transforms(4, 1, symmetry="all")


def test_seeded_transforms_draw_independently_and_repeatably():
    import albumentations as A

    pipeline = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    mask = np.arange(9, dtype=np.int32).reshape(3, 3)

    def draws(seed):
        seed_transform(pipeline, seed)
        return [
            pipeline(image=np.zeros((3, 3, 1), np.float32), mask=mask)["mask"].tobytes()
            for _ in range(40)
        ]

    assert len(set(draws(0))) == 4  # none, either flip alone, both: the flips do not agree
    assert draws(5) == draws(5) and draws(5) != draws(6)


def test_multiclass_mapping_ignore_index_and_subset(tmp_path):
    images, masks, arrays = folder(tmp_path, mask_values=(10, 20, 30, 99))
    data = SegmentationFolder(
        images, masks, classes={10: 0, 20: 1, 30: 2}, ignore_index=99, indices=[2, 0]
    )
    assert [s.name for s in data.samples] == ["c", "a"]
    assert not data.binary and data.num_classes == 3 and data.out_channels == 3
    _, mask = data[0]
    lookup = {10: 0, 20: 1, 30: 2, 99: 99}
    assert mask.dtype == torch.int64 and mask.shape == (6, 8)
    assert torch.equal(mask, torch.from_numpy(np.vectorize(lookup.get)(arrays["c"][1])).long())
    two = SegmentationFolder(images, masks, classes={10: 0, 20: 1, 30: 1, 99: 0}, binary=False)
    assert not two.binary and two[0][1].dtype == torch.int64 and two.out_channels == 2
    with pytest.raises(ValueError, match=r"indices \[3\] out of range.*3 samples"):
        SegmentationFolder(images, masks, indices=[0, 3])


def test_rgb_grey_conversion_and_palette_masks(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    save(tmp_path / "img" / "x.png", rgb)
    palette = Image.fromarray(np.array([[0, 1, 2, 1, 0, 2, 1]] * 5, np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    (tmp_path / "msk").mkdir()
    palette.save(tmp_path / "msk" / "x.png")
    data = SegmentationFolder(tmp_path / "img", tmp_path / "msk", classes={0: 0, 1: 1, 2: 2})
    image, mask = data[0]
    assert image.shape == (3, 5, 7) and mask.tolist()[0] == [0, 1, 2, 1, 0, 2, 1]
    torch.testing.assert_close(image, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    grey = read_image(tmp_path / "img" / "x.png", channels=1)
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255
    np.testing.assert_allclose(grey[..., 0], luma, rtol=1e-6)
    save(tmp_path / "g.png", rgb[..., 0])
    three = read_image(tmp_path / "g.png", channels=3)
    assert three.shape == (5, 7, 3) and (three == rgb[..., :1] / np.float32(255)).all()


def test_multipage_tiff_stacks(tmp_path):
    (tmp_path / "img").mkdir(), (tmp_path / "msk").mkdir()
    stack = (np.arange(3 * 4 * 5).reshape(3, 4, 5) * 1000).astype(np.uint16)
    labels = (np.arange(3 * 4 * 5).reshape(3, 4, 5) % 2).astype(np.uint8)
    tifffile.imwrite(tmp_path / "img" / "vol.tif", stack, photometric="minisblack")
    tifffile.imwrite(tmp_path / "msk" / "vol.tiff", labels, photometric="minisblack")
    data = SegmentationFolder(tmp_path / "img", tmp_path / "msk")
    assert [s.name for s in data.samples] == ["vol#0", "vol#1", "vol#2"]
    image, mask = data[2]
    torch.testing.assert_close(image[0], torch.from_numpy(stack[2] / 65535).float())
    assert torch.equal(mask[0], torch.from_numpy(labels[2]).float())
    tifffile.imwrite(tmp_path / "msk" / "vol.tiff", labels[:2], photometric="minisblack")
    with pytest.raises(ValueError, match="vol.tif: 3 pages but its mask vol.tiff has 2"):
        SegmentationFolder(tmp_path / "img", tmp_path / "msk")


def test_unmatched_files_are_listed(tmp_path):
    images, masks, _ = folder(tmp_path)
    save(images / "only_image.png", np.zeros((6, 8), np.uint8))
    save(masks / "only_mask.tif", np.zeros((6, 8), np.uint8))
    with pytest.raises(
        ValueError,
        match="images without a mask.*only_image.png; masks without an image.*only_mask.tif",
    ):
        SegmentationFolder(images, masks)


def test_missing_and_empty_folders_are_named(tmp_path):
    images, masks, _ = folder(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"mask folder {tmp_path / 'nope'} does not"):
        SegmentationFolder(images, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=f"image folder {tmp_path / 'empty'} holds no PNG"):
        SegmentationFolder(tmp_path / "empty", masks)


def test_size_mismatch_names_file_and_both_sizes(tmp_path):
    images, masks, _ = folder(tmp_path)
    save(masks / "b.png", np.zeros((6, 9), np.uint8))
    with pytest.raises(ValueError, match=r"b: mask size 6x9 does not match image size 6x8.*b.png"):
        SegmentationFolder(images, masks)


def test_unexpected_mask_values_name_file_and_values(tmp_path):
    images, masks, _ = folder(tmp_path, mask_values=(0, 128, 255))
    data = SegmentationFolder(images, masks)  # values are checked when read
    with pytest.raises(ValueError, match=r"a.png: unexpected mask values 128; .*\[0, 1, 255\]"):
        data.validate()
    with pytest.raises(ValueError, match="unexpected mask values 0, 128"):
        SegmentationFolder(images, masks, classes={255: 1})[0]


def test_find_image_mask_folders(tmp_path):
    for sub in ("train/image", "train/label", "other/images", "other/masks"):
        (tmp_path / sub).mkdir(parents=True)
    assert find_image_mask_folders(tmp_path) == (tmp_path / "train/image", tmp_path / "train/label")
    assert find_image_mask_folders(tmp_path / "other") == (
        tmp_path / "other/images",
        tmp_path / "other/masks",
    )
    with pytest.raises(FileNotFoundError, match="no image/mask folders in"):
        find_image_mask_folders(tmp_path / "train" / "image")


ISBI = default_isbi_root()


@pytest.mark.skipif(
    ISBI is None, reason="ISBI 2012 data not found (../shared/data/isbi2012 or $UNET_FAST_ISBI)"
)
def test_isbi2012_split_and_membrane_foreground():
    train, val = isbi2012(ISBI, "train"), isbi2012(ISBI, "val")
    assert [s.name for s in train.samples] == [f"{i:02d}" for i in range(20)]
    assert [s.name for s in val.samples] == ["20", "21", "22", "23"]
    image, mask = val[0]
    assert image.shape == (1, 512, 512) and mask.shape == (1, 512, 512)
    assert 0.15 < mask.mean() < 0.30  # membrane is ~22% of pixels
    assert image[mask == 1].mean() < image[mask == 0].mean() - 0.2  # membranes are dark


def test_default_isbi_root_from_environment(tmp_path, monkeypatch):
    (tmp_path / "train" / "image").mkdir(parents=True)
    monkeypatch.setenv("UNET_FAST_ISBI", str(tmp_path))
    assert default_isbi_root() == tmp_path.resolve()


def test_synthetic_cells_are_deterministic_and_labelled():
    data = SyntheticCells(4, (40, 56), seed=3)
    image, mask = data[2]
    assert image.shape == (1, 40, 56) and mask.shape == (1, 40, 56) and mask.dtype == torch.float32
    again_image, again_mask = SyntheticCells(4, (40, 56), seed=3)[2]
    assert torch.equal(image, again_image) and torch.equal(mask, again_mask)
    assert not torch.equal(mask, SyntheticCells(4, (40, 56), seed=4)[2][1])
    assert 0.1 < mask.mean() < 0.45 and set(mask.unique().tolist()) == {0.0, 1.0}
    assert image[mask == 1].mean() < image[mask == 0].mean() - 0.2
    multi = SyntheticCells(4, 64, seed=3, multiclass=True, channels=3)
    image, mask = multi[0]
    assert image.shape == (3, 64, 64) and torch.equal(image[0], image[2])
    assert mask.dtype == torch.int64 and set(mask.unique().tolist()) == {0, 1, 2}
    with pytest.raises(IndexError):
        data[4]


def blocks(seed, size=(48, 40), side=8, levels=3):
    """A mask of random side×side blocks and the image 0 / 0.5 / 1 it determines."""
    rng = np.random.default_rng(seed)
    mask = np.kron(
        rng.integers(0, levels, (size[0] // side, size[1] // side)), np.ones((side, side), np.int64)
    ).astype(np.int32)
    return (mask / (levels - 1)).astype(np.float32)[..., None], mask


def as_normalised_image(mask):
    """The normalised image that `blocks` derives from a mask."""
    return (mask.float() / 2 - GREY_MEAN[0]) / GREY_STD[0]


@pytest.mark.parametrize("seed", range(6))
def test_geometric_transforms_move_image_and_mask_together(seed):
    image, mask = blocks(seed, size=(96, 80), side=16)
    transform = train_transforms((64, 48), 1, elastic_p=1.0, intensity_p=0.0)
    seed_transform(transform, seed)
    out = transform(image=image, mask=mask)
    assert out["image"].shape == (1, 64, 48) and out["mask"].shape == (64, 48)  # rot90 too
    assert set(out["mask"].unique().tolist()) <= {0, 1, 2}  # nearest: no new values
    level = torch.round((out["image"][0] * GREY_STD[0] + GREY_MEAN[0]) * 2)
    # Linear (image) and nearest (mask) interpolation differ only along block edges; a mask
    # moved independently of its image agrees on 17-51% of the pixels (seeds 0-7, measured).
    assert (level == out["mask"]).float().mean() > 0.85


def test_flips_and_rotations_are_exact_and_keep_ignore_values():
    image, mask = blocks(7, size=(32, 32))
    mask[:8, :8], image[:8, :8] = 255, 255 / 2  # an ignored corner
    # scale 1 on a square image: the crop is the whole image, whatever the drawn aspect ratio
    transform = train_transforms(32, 1, scale=(1.0, 1.0), elastic_p=0.0, intensity_p=0.0)
    seen = set()
    for seed in range(8):
        seed_transform(transform, seed)
        out = transform(image=image, mask=mask)
        torch.testing.assert_close(out["image"][0], as_normalised_image(out["mask"]))
        assert set(out["mask"].unique().tolist()) == {0, 1, 2, 255}
        seen.add(tuple(torch.nonzero(out["mask"] == 255)[0].tolist()))
    assert len(seen) > 1  # the ignored corner went to other corners


def test_native_crops_keep_the_images_resolution():
    image, mask = blocks(3, size=(64, 56))
    transform = train_transforms(32, 1, scale=None, elastic_p=0.0, intensity_p=0.0)
    for seed in range(4):
        seed_transform(transform, seed)
        out = transform(image=image, mask=mask)
        # not resampled: every pixel is still exactly one block's level (a resized crop blends
        # levels along block edges)
        torch.testing.assert_close(out["image"][0], as_normalised_image(out["mask"]))
        assert out["image"].shape == (1, 32, 32)
    small = transform(image=image[:20, :24], mask=mask[:20, :24])  # mirrored out to the crop
    assert small["image"].shape == (1, 32, 32) and small["mask"].shape == (32, 32)
    torch.testing.assert_close(small["image"][0], as_normalised_image(small["mask"]))


def test_intensity_transforms_touch_the_image_only():
    image, mask = blocks(1, size=(32, 32))
    transform = train_transforms(32, 1, scale=(1.0, 1.0), elastic_p=0.0, intensity_p=1.0)
    square = torch.from_numpy(mask).long()
    dihedral = [torch.rot90(m, k) for m in (square, square.flip(0)) for k in range(4)]
    for seed in range(6):
        seed_transform(transform, seed)
        out = transform(image=image, mask=mask)
        assert any(torch.equal(out["mask"], m) for m in dihedral)  # only rotated or flipped
        assert not torch.allclose(out["image"][0], as_normalised_image(out["mask"]), atol=1e-4)


def test_val_transforms_normalise_only():
    image = np.broadcast_to(np.array(IMAGENET_MEAN, np.float32), (5, 6, 3)).copy()
    image[0, 0] = 1.0
    mask = np.zeros((5, 6), np.int32)
    out = val_transforms(3)(image=image, mask=mask)
    assert out["image"].shape == (3, 5, 6) and out["mask"].shape == (5, 6)
    assert out["image"][:, 1:].abs().max() < 1e-6
    torch.testing.assert_close(
        out["image"][:, 0, 0],
        (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor([0.229, 0.224, 0.225]),
    )
    grey = val_transforms(1)(image=np.full((4, 4, 1), GREY_MEAN[0], np.float32), mask=mask[:4, :4])
    assert grey["image"].abs().max() < 1e-6
    with pytest.raises(ValueError, match="no default statistics for 2 channels"):
        normalize(2)


def test_dataset_with_train_transforms():
    transform = train_transforms(48, 1)
    seed_transform(transform, 0)  # albumentations draws from its own generators: one fixed draw
    data = SyntheticCells(2, 64, transform=transform)
    image, mask = data[0]
    assert image.shape == (1, 48, 48) and mask.shape == (1, 48, 48)
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) <= {0.0, 1.0}
    raw, _ = SyntheticCells(2, 64).load(0)
    assert image.min() < -1.0 < 0 <= raw.min()  # normalised: dark membrane well below 0
    assert abs(image[mask == 1].mean() - image[mask == 0].mean()) > 1.0  # still aligned


def test_dataloader_workers_draw_different_reproducible_augmentations():
    data = Subset(SyntheticCells(1, 48, transform=train_transforms(32, 1)), [0] * 4)

    def epoch():
        loader = DataLoader(data, batch_size=1, num_workers=2)
        return [image.sum().item() for image, _ in loader]

    torch.manual_seed(0)
    first, second = epoch(), epoch()
    assert len(set(first)) == 4 and len(set(first + second)) == 8  # per worker and per epoch
    torch.manual_seed(0)
    assert epoch() == first  # torch.manual_seed decides the augmentations
