"""Segmentation metrics per class: Dice, IoU and pixel error, from hard labels.

Everything derives from a confusion matrix (rows: target class, columns: predicted class), so a
validation pass sums the matrices of its batches and scores the whole set at once rather than
averaging per-batch scores. Binary tasks are two classes, 0 background and 1 foreground.

Edge cases, by definition: a class absent from both target and prediction has Dice 1 and IoU 1
(nothing to find, nothing falsely found); with no pixel to score (all ignored) the pixel error
is 0.
"""

import math

import torch


def labels_from_logits(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Class labels B×H×W (int64) from logits: sigmoid > threshold for one channel, else argmax."""
    if logits.shape[1] == 1:
        return (logits[:, 0].float() > math.log(threshold / (1 - threshold))).long()
    return logits.argmax(1)


def _labels(t: torch.Tensor, what: str, other: torch.Tensor) -> torch.Tensor:
    """B×(D×)H×W int64 from itself or B×1×(D×)H×W (one axis more than `other`), integer or
    integer-valued float."""
    if t.dim() == other.dim() + 1 and t.shape[1] == 1:
        t = t[:, 0]
    if t.is_floating_point():
        if (t != t.round()).any():
            raise ValueError(f"{what} must hold class indices, got fractional values")
        t = t.long()
    return t.long()


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """num_classes × num_classes int64 counts of (target, predicted) pairs over non-ignored
    pixels. `pred` and `target` are labels, B×(D×)H×W or B×1×(D×)H×W (binary float masks work)."""
    pred, target = _labels(pred, "pred", target), _labels(target, "target", pred)
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if ignore_index is not None:
        pred, target = pred[target != ignore_index], target[target != ignore_index]
    pred, target = pred.flatten(), target.flatten()
    for name, labels in (("pred", pred), ("target", target)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{name} holds labels outside 0..{num_classes - 1}: "
                f"{sorted(set(labels.unique().tolist()) - set(range(num_classes)))}"
            )
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes**2)
    return counts.view(num_classes, num_classes)


def _tp_fp_fn(cm: torch.Tensor):
    cm = cm.double()
    tp = cm.diagonal()
    return tp, cm.sum(0) - tp, cm.sum(1) - tp


def dice_from_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Per-class Dice 2TP / (2TP + FP + FN); 1 for a class absent from target and prediction."""
    tp, fp, fn = _tp_fp_fn(cm)
    denominator = 2 * tp + fp + fn
    return torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1), 1.0)


def iou_from_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Per-class IoU TP / (TP + FP + FN); 1 for a class absent from target and prediction."""
    tp, fp, fn = _tp_fp_fn(cm)
    denominator = tp + fp + fn
    return torch.where(denominator > 0, tp / denominator.clamp_min(1), 1.0)


def pixel_error_from_confusion(cm: torch.Tensor, per_class: bool = True) -> torch.Tensor:
    """Fraction of scored pixels labelled wrongly. Per class: (FP + FN) / N, the pixels where
    "is this class" is wrong (for a binary task both classes equal the overall error, which is
    the ISBI 2012 pixel error of a binary labelling). `per_class=False`: the overall fraction
    of wrong labels, a scalar."""
    tp, fp, fn = _tp_fp_fn(cm)
    n = cm.sum().double()
    wrong = fp + fn if per_class else n - tp.sum()
    return wrong / n.clamp_min(1)


def dice(pred, target, num_classes: int = 2, ignore_index: int | None = None) -> torch.Tensor:
    """Per-class Dice (float64, length num_classes) of labels `pred` against `target`."""
    return dice_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


def iou(pred, target, num_classes: int = 2, ignore_index: int | None = None) -> torch.Tensor:
    """Per-class IoU (float64, length num_classes) of labels `pred` against `target`."""
    return iou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


def pixel_error(
    pred, target, num_classes: int = 2, ignore_index: int | None = None, per_class: bool = True
) -> torch.Tensor:
    """Per-class (or overall) pixel error of labels `pred` against `target`."""
    return pixel_error_from_confusion(
        confusion_matrix(pred, target, num_classes, ignore_index), per_class
    )
