"""Segmentation losses on logits, as functions and as nn.Modules.

Binary tasks: logits B×1×H×W against float 0/1 targets of the same shape. Multi-class tasks:
logits B×K×H×W against int64 class indices B×H×W. Volumes alike, D before H×W. Pixels whose
target equals `ignore_index` count for nothing; a batch with every pixel ignored has loss 0
(with zero gradient), not NaN. Losses are computed in float32 whatever the logits' dtype
(autocast gives bfloat16 logits).
"""

import torch
import torch.nn.functional as F
from torch import nn


def _valid(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    if ignore_index is None:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def _check_binary(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() not in (4, 5) or logits.shape[1] != 1 or target.shape != logits.shape:
        raise ValueError(
            f"binary losses need logits B×1×H×W and a target of the same shape, "
            f"got {tuple(logits.shape)} and {tuple(target.shape)}"
        )


def bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    pos_weight: float | None = None,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Binary cross-entropy on logits, the mean over non-ignored pixels. `pos_weight` scales
    the positive pixels' term (n_negative / n_positive balances the classes)."""
    _check_binary(logits, target)
    valid = _valid(target, ignore_index)
    target = torch.where(valid, target.float(), 0.0)
    weight = (
        None
        if pos_weight is None
        else torch.as_tensor(pos_weight, dtype=torch.float32, device=logits.device)
    )
    loss = F.binary_cross_entropy_with_logits(
        logits.float(), target, pos_weight=weight, reduction="none"
    )
    return (loss * valid).sum() / valid.sum().clamp_min(1)


def cross_entropy_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Cross-entropy over classes, the (class-weighted) mean over non-ignored pixels."""
    if logits.dim() not in (4, 5) or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"cross-entropy needs logits B×K×H×W and a target B×H×W, "
            f"got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    index = -100 if ignore_index is None else ignore_index
    total = F.cross_entropy(
        logits.float(), target, weight=weight, ignore_index=index, reduction="sum"
    )
    valid = target != index
    count = valid.sum() if weight is None else weight[target[valid]].sum()
    return total / count.clamp_min(torch.finfo(torch.float32).tiny)


def soft_dice(probs: torch.Tensor, onehot: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-class soft Dice (2·Σpt + s) / (Σp + Σt + s) of B×K×H×W probabilities and targets,
    summed over batch and pixels. With nothing predicted and nothing there (and s = 0) Dice is 1:
    the prediction is perfect."""
    over = (0, *range(2, probs.dim()))  # all but the classes
    intersection = (probs * onehot).sum(over)
    denominator = probs.sum(over) + onehot.sum(over) + smooth
    present = denominator > 0  # a safe divisor, or the NaN would reach the gradient
    ratio = (2 * intersection + smooth) / torch.where(present, denominator, 1.0)
    return torch.where(present, ratio, 1.0)


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None, smooth: float = 1.0
) -> torch.Tensor:
    """1 − soft Dice: of the foreground for binary logits (B×1×H×W), of the mean over classes
    for multi-class logits (B×K×H×W). Ignored pixels are left out of every sum. Dice is taken
    over the whole batch rather than averaged per image, which is unstable for images with
    little or no foreground."""
    valid = _valid(target, ignore_index)
    if logits.shape[1] == 1:
        _check_binary(logits, target)
        probs = torch.sigmoid(logits.float()) * valid
        return 1 - soft_dice(probs, torch.where(valid, target.float(), 0.0), smooth)[0]
    if target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"multi-class Dice needs logits B×K×H×W and a target B×H×W, "
            f"got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    classes = logits.shape[1]
    probs = torch.softmax(logits.float(), 1) * valid.unsqueeze(1)
    onehot = F.one_hot(torch.where(valid, target, 0), classes).movedim(-1, 1)
    onehot = onehot * valid.unsqueeze(1)
    return 1 - soft_dice(probs, onehot.float(), smooth).mean()


def bce_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    pos_weight: float | None = None,
    ignore_index: int | None = None,
    dice_weight: float = 1.0,
    smooth: float = 1.0,
) -> torch.Tensor:
    """BCE + dice_weight · Dice loss (binary): BCE gives every pixel a gradient, Dice keeps a
    thin foreground such as membranes from being swamped by the background."""
    return bce_loss(logits, target, pos_weight, ignore_index) + dice_weight * dice_loss(
        logits, target, ignore_index, smooth
    )


class BCEWithLogitsLoss(nn.Module):
    """`bce_loss` as a module."""

    def __init__(self, pos_weight: float | None = None, ignore_index: int | None = None):
        super().__init__()
        self.pos_weight, self.ignore_index = pos_weight, ignore_index

    def forward(self, logits, target):
        return bce_loss(logits, target, self.pos_weight, self.ignore_index)


class CrossEntropyLoss(nn.Module):
    """`cross_entropy_loss` as a module; the class weights move with `.to()`."""

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int | None = None):
        super().__init__()
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight))
        self.ignore_index = ignore_index

    def forward(self, logits, target):
        return cross_entropy_loss(logits, target, self.weight, self.ignore_index)


class DiceLoss(nn.Module):
    """`dice_loss` as a module."""

    def __init__(self, ignore_index: int | None = None, smooth: float = 1.0):
        super().__init__()
        self.ignore_index, self.smooth = ignore_index, smooth

    def forward(self, logits, target):
        return dice_loss(logits, target, self.ignore_index, self.smooth)


class BCEDiceLoss(nn.Module):
    """`bce_dice_loss` as a module."""

    def __init__(
        self,
        pos_weight: float | None = None,
        ignore_index: int | None = None,
        dice_weight: float = 1.0,
        smooth: float = 1.0,
    ):
        super().__init__()
        self.pos_weight, self.ignore_index = pos_weight, ignore_index
        self.dice_weight, self.smooth = dice_weight, smooth

    def forward(self, logits, target):
        return bce_dice_loss(
            logits, target, self.pos_weight, self.ignore_index, self.dice_weight, self.smooth
        )
