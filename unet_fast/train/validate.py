"""Validation during training: the whole validation set scored once per epoch, sharded over the
ranks and summed, as a confusion matrix (so Dice is the set's, not a mean of batches')."""

import torch
from torch.utils.data import DataLoader, Subset

from . import metrics
from .distributed import Distributed
from .offset import OffsetModel


def validation_loader(val_set, env: Distributed, batch_size: int, workers: int) -> DataLoader:
    """This rank's share of the validation set, in order."""
    return DataLoader(
        Subset(val_set, range(env.rank, len(val_set), env.world)),
        batch_size=batch_size,
        num_workers=workers,
    )


def channels_last_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def to_device(images, masks, device, channels_last):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=channels_last_format(images.dim() - 2))
    return images, masks.to(device, non_blocking=True)


def validate(
    model: OffsetModel,
    loader,
    loss_fn,
    num_classes,
    ignore_index,
    autocast_dtype,
    env: Distributed,
    channels_last: bool,
    tta: bool = False,
    symmetry: str = "dihedral",
    tiling: dict | None = None,
):
    """(loss, per-class Dice, IoU, pixel error) over the whole validation set (all ranks); with
    `tta` of the logits averaged over the images' views under `symmetry` (all 8 flips and
    90-degree rotations for "dihedral"); with `tiling` (predict_tiled's tile and batch_size)
    each image predicted tile by tile, overlapping by a quarter tile."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=env.device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=env.device)
    with torch.inference_mode():
        for images, masks in loader:
            images, masks = to_device(images, masks, env.device, channels_last)
            with torch.autocast(
                env.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                if tiling:
                    logits = torch.stack(
                        [model.predict_tiled(image, tta, symmetry, **tiling) for image in images]
                    )
                else:
                    logits = model.predict(images, tta, symmetry)
            logits = logits.float()
            loss_sum += torch.stack(
                [
                    loss_fn(logits, masks).double() * len(images),
                    torch.tensor(float(len(images)), device=env.device),
                ]
            )
            confusion += metrics.confusion_matrix(
                metrics.labels_from_logits(logits), masks, num_classes, ignore_index
            ).double()
    env.sum(confusion)
    env.sum(loss_sum)
    return (
        (loss_sum[0] / loss_sum[1].clamp_min(1)).item(),
        metrics.dice_from_confusion(confusion),
        metrics.iou_from_confusion(confusion),
        metrics.pixel_error_from_confusion(confusion, per_class=False),
    )


def foreground_mean(per_class: torch.Tensor, binary: bool) -> float:
    """The score that drives scheduling: the positive class's (binary), else the mean over the
    classes other than 0."""
    return per_class[1].item() if binary else per_class[1:].mean().item()
