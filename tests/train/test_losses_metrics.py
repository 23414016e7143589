"""Losses and metrics against hand-computed values, torch's own losses, and the edge cases:
empty masks on both sides, every pixel ignored."""

import math

import pytest
import torch
import torch.nn.functional as F

from unet_fast.train import losses, metrics

LN2, LN3 = math.log(2), math.log(3)


def binary(values):
    """A 1×1×1×N tensor: one image, one channel, one row."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def test_bce_hand_computed_pos_weight_and_ignore():
    logits, target = binary([0.0, LN3]), binary([1.0, 0.0])  # p = 0.5, 0.75
    # -ln 0.5 = ln 2 and -ln(1 - 0.75) = ln 4, mean 1.5 ln 2
    torch.testing.assert_close(losses.bce_loss(logits, target), torch.tensor(1.5 * LN2))
    torch.testing.assert_close(
        losses.bce_loss(logits, target, pos_weight=2.0), torch.tensor((2 * LN2 + 2 * LN2) / 2)
    )
    with_ignored = losses.bce_loss(
        binary([0.0, LN3, 7.0]), binary([1.0, 0.0, 255.0]), ignore_index=255
    )
    torch.testing.assert_close(with_ignored, torch.tensor(1.5 * LN2))
    x, t = torch.randn(2, 1, 5, 6), torch.randint(0, 2, (2, 1, 5, 6)).float()
    torch.testing.assert_close(
        losses.bce_loss(x, t, 3.0),
        F.binary_cross_entropy_with_logits(x, t, pos_weight=torch.tensor(3.0)),
    )
    assert losses.BCEWithLogitsLoss(3.0)(x, t) == losses.bce_loss(x, t, 3.0)


def test_cross_entropy_hand_computed_weight_and_ignore():
    logits = torch.tensor([[0.0, 0.0, 0.0], [LN2, 0.0, 0.0], [5.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    target = torch.tensor([[[1, 0, 255]]])
    # pixel 0: softmax 1/3 each -> ln 3; pixel 1: p(class 0) = 2/4 -> ln 2; pixel 2 ignored
    got = losses.cross_entropy_loss(logits, target, ignore_index=255)
    torch.testing.assert_close(got, torch.tensor((LN3 + LN2) / 2))
    weight = torch.tensor([2.0, 1.0, 1.0])
    got = losses.cross_entropy_loss(logits, target, weight, ignore_index=255)
    torch.testing.assert_close(got, torch.tensor((LN3 + 2 * LN2) / 3))
    assert got == losses.CrossEntropyLoss(weight, ignore_index=255)(logits, target)
    torch.testing.assert_close(got, F.cross_entropy(logits, target, weight, ignore_index=255))


def test_dice_loss_hand_computed_binary_and_multiclass():
    logits, target = binary([0.0, LN3, -LN3, 4.0]), binary([1.0, 1.0, 0.0, 255.0])
    # p = 0.5, 0.75, 0.25 (4th ignored): intersection 1.25, Σp 1.5, Σt 2
    got = losses.dice_loss(logits, target, ignore_index=255, smooth=0.0)
    torch.testing.assert_close(got, torch.tensor(1 - 2.5 / 3.5))
    got = losses.dice_loss(logits, target, ignore_index=255, smooth=1.0)
    torch.testing.assert_close(got, torch.tensor(1 - 3.5 / 4.5))
    # two classes, softmax [0.5, 0.5] and [0.75, 0.25], targets 0 and 1:
    # class 0: 2·0.5 / (1.25 + 1) = 4/9; class 1: 2·0.25 / (0.75 + 1) = 2/7
    logits = torch.tensor([[0.0, 0.0], [LN3, 0.0]]).T.reshape(1, 2, 1, 2)
    got = losses.dice_loss(logits, torch.tensor([[[0, 1]]]), smooth=0.0)
    torch.testing.assert_close(got, torch.tensor(1 - (4 / 9 + 2 / 7) / 2))
    assert got == losses.DiceLoss(smooth=0.0)(logits, torch.tensor([[[0, 1]]]))


def test_bce_dice_is_the_weighted_sum():
    x, t = torch.randn(2, 1, 4, 4), torch.randint(0, 2, (2, 1, 4, 4)).float()
    want = losses.bce_loss(x, t, 2.0) + 0.5 * losses.dice_loss(x, t)
    torch.testing.assert_close(losses.bce_dice_loss(x, t, 2.0, dice_weight=0.5), want)
    torch.testing.assert_close(losses.BCEDiceLoss(2.0, dice_weight=0.5)(x, t), want)


def test_losses_with_empty_masks_on_both_sides():
    """Nothing there and (almost) nothing predicted: Dice 1, loss 0 — documented."""
    logits, target = torch.full((1, 1, 3, 3), -30.0), torch.zeros(1, 1, 3, 3)
    assert losses.dice_loss(logits, target) < 1e-12
    assert losses.bce_loss(logits, target) < 1e-12
    all_false_positive = losses.dice_loss(torch.full((1, 1, 3, 3), 30.0), target)
    torch.testing.assert_close(all_false_positive, torch.tensor(1 - 1 / (9 + 1)))  # smooth 1


@pytest.mark.parametrize(
    "loss, classes, options",
    [
        (losses.bce_loss, 1, {}),
        (losses.bce_dice_loss, 1, {}),
        (losses.cross_entropy_loss, 3, {}),
        (losses.dice_loss, 1, {}),
        (losses.dice_loss, 3, {}),
        (losses.dice_loss, 1, {"smooth": 0.0}),
        (losses.dice_loss, 3, {"smooth": 0.0}),
    ],
)
def test_all_ignored_pixels_give_zero_loss_and_zero_gradient(loss, classes, options):
    logits = torch.randn(2, classes, 4, 4, requires_grad=True)
    target = torch.full((2, 1, 4, 4), 255.0) if classes == 1 else torch.full((2, 4, 4), 255)
    value = loss(logits, target, ignore_index=255, **options)  # smooth 0: 0 / 0 kept out
    value.backward()
    assert value.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_losses_run_in_float32_under_bfloat16_logits():
    x, t = torch.randn(2, 1, 4, 4), torch.randint(0, 2, (2, 1, 4, 4)).float()
    got = losses.bce_dice_loss(x.bfloat16(), t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, losses.bce_dice_loss(x.bfloat16().float(), t))


def test_loss_shape_errors():
    with pytest.raises(ValueError, match="binary losses need logits B×1×H×W"):
        losses.bce_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="cross-entropy needs logits B×K×H×W and a target B×H×W"):
        losses.cross_entropy_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4).long())


PRED = torch.tensor([[[1, 0, 1], [0, 0, 0]]])
TARGET = torch.tensor([[[1, 1, 0], [0, 0, 0]]])


def test_binary_metrics_hand_computed():
    # class 1: TP 1, FP 1, FN 1; class 0: TP 3, FP 1, FN 1; 2 of 6 pixels wrong
    torch.testing.assert_close(
        metrics.dice(PRED, TARGET), torch.tensor([6 / 8, 2 / 4], dtype=torch.float64)
    )
    torch.testing.assert_close(
        metrics.iou(PRED, TARGET), torch.tensor([3 / 5, 1 / 3], dtype=torch.float64)
    )
    torch.testing.assert_close(
        metrics.pixel_error(PRED, TARGET), torch.tensor([2 / 6, 2 / 6], dtype=torch.float64)
    )
    assert metrics.pixel_error(PRED, TARGET, per_class=False).item() == pytest.approx(2 / 6)
    # the data sets' binary format: float B×1×H×W, here with the false negative ignored
    target = TARGET.float().unsqueeze(1)
    target[0, 0, 0, 2] = 255.0
    # class 1: TP 1, FP 0, FN 1; class 0: TP 3, FP 1, FN 0; 1 of 5 pixels wrong
    cm = metrics.confusion_matrix(PRED.unsqueeze(1), target, 2, ignore_index=255)
    assert cm.tolist() == [[3, 0], [1, 1]]
    assert metrics.dice_from_confusion(cm).tolist() == pytest.approx([6 / 7, 2 / 3])
    assert metrics.iou_from_confusion(cm).tolist() == pytest.approx([3 / 4, 1 / 2])
    assert metrics.pixel_error_from_confusion(cm).tolist() == pytest.approx([1 / 5, 1 / 5])


def test_multiclass_metrics_hand_computed():
    pred, target = torch.tensor([[[0, 2, 2, 1]]]), torch.tensor([[[0, 1, 2, 2]]])
    cm = metrics.confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    assert metrics.dice_from_confusion(cm).tolist() == pytest.approx([1, 0, 0.5])
    assert metrics.iou_from_confusion(cm).tolist() == pytest.approx([1, 0, 1 / 3])
    assert metrics.pixel_error_from_confusion(cm).tolist() == pytest.approx([0, 0.5, 0.5])
    assert metrics.pixel_error_from_confusion(cm, per_class=False).item() == pytest.approx(0.5)
    assert metrics.dice(pred, target, 4).tolist() == pytest.approx([1, 0, 0.5, 1])  # class 3
    # unseen by both sides: perfect by definition


def test_metrics_empty_masks_and_all_ignored():
    empty = torch.zeros(1, 4, 4, dtype=torch.long)
    assert metrics.dice(empty, empty).tolist() == [1.0, 1.0]  # empty vs empty: Dice 1
    assert metrics.iou(empty, empty).tolist() == [1.0, 1.0]
    assert metrics.pixel_error(empty, empty).tolist() == [0.0, 0.0]
    assert metrics.dice(empty + 1, empty).tolist() == [0.0, 0.0]  # all false positives
    ignored = torch.full((1, 4, 4), 255)
    cm = metrics.confusion_matrix(empty, ignored, 2, ignore_index=255)
    assert cm.sum() == 0 and metrics.dice_from_confusion(cm).tolist() == [1.0, 1.0]
    assert metrics.pixel_error_from_confusion(cm, per_class=False).item() == 0.0


def test_confusion_matrices_add_up_over_batches():
    pred, target = torch.randint(0, 3, (4, 5, 6)), torch.randint(0, 3, (4, 5, 6))
    whole = metrics.confusion_matrix(pred, target, 3)
    halves = sum(metrics.confusion_matrix(pred[i : i + 2], target[i : i + 2], 3) for i in (0, 2))
    assert torch.equal(whole, halves) and whole.sum() == 4 * 5 * 6
    accuracy = (pred == target).double().mean()
    assert metrics.pixel_error_from_confusion(whole, per_class=False) == pytest.approx(1 - accuracy)


def test_labels_from_logits():
    logits = torch.tensor([-1.0, 0.1, 1.0, 1.2]).view(1, 1, 1, 4)
    assert metrics.labels_from_logits(logits).tolist() == [[[0, 1, 1, 1]]]
    assert metrics.labels_from_logits(logits, threshold=0.75).tolist() == [[[0, 0, 0, 1]]]
    multi = torch.tensor([[0.0, 2.0], [1.0, 0.0], [3.0, -1.0]]).view(1, 3, 1, 2)
    assert metrics.labels_from_logits(multi).tolist() == [[[2, 0]]]


def test_metric_input_errors():
    with pytest.raises(ValueError, match=r"target holds labels outside 0..1: \[7\]"):
        metrics.confusion_matrix(PRED, TARGET + 6 * (TARGET == 1), 2)
    with pytest.raises(ValueError, match="fractional"):
        metrics.confusion_matrix(PRED, TARGET.float() / 2, 2)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.confusion_matrix(PRED, TARGET[:, :1], 2)
