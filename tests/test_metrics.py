"""Confusion matrix and mIoU / pixel accuracy, against hand-computed numbers."""

import math

import pytest
import torch

from segmodel.metrics import ConfusionMatrix, summarize

NAMES = ["void", "a", "b", "c"]

# 4 classes (0 = void). Class 3 appears in neither map.
TARGET = torch.tensor([[0, 1, 1, 2], [1, 2, 2, 2]])
PRED = torch.tensor([[2, 1, 0, 2], [1, 2, 1, 1]])
# Rows = ground truth, columns = prediction:
#   gt 0: the (0,0) pixel predicted 2               -> [0, 0, 1, 0]  (ignored when scoring)
#   gt 1: predicted 1, 0 (void = wrong), 1          -> [1, 2, 0, 0]
#   gt 2: predicted 2, 2, 1, 1                      -> [0, 2, 2, 0]
EXPECTED_MATRIX = torch.tensor([[0, 0, 1, 0], [1, 2, 0, 0], [0, 2, 2, 0], [0, 0, 0, 0]])
# Class 1: tp 2, gt 3, pred 4 (the two on gt-2 pixels), union 3 + 4 - 2 = 5 -> IoU 0.4
# Class 2: tp 2, gt 4, pred 2 (its prediction on the void pixel doesn't count), union 4 -> IoU 0.5
# Class 3: union 0 -> None, left out of the mean.
# mean IoU = (0.4 + 0.5) / 2 = 0.45; accuracy = 4 correct of 7 non-void pixels.


def test_hand_computed_example() -> None:
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    assert cm.matrix.dtype == torch.int64
    assert torch.equal(cm.matrix, EXPECTED_MATRIX)
    s = summarize(cm.matrix, NAMES)
    assert s["mean_iou"] == pytest.approx(0.45)
    assert s["pixel_accuracy"] == pytest.approx(4 / 7)
    assert s["classes_evaluated"] == 2
    assert s["per_class"] == [
        {"id": 1, "name": "a", "iou": pytest.approx(0.4), "gt_pixels": 3, "pred_pixels": 4},
        {"id": 2, "name": "b", "iou": pytest.approx(0.5), "gt_pixels": 4, "pred_pixels": 2},
        {"id": 3, "name": "c", "iou": None, "gt_pixels": 0, "pred_pixels": 0},
    ]


def test_batches_accumulate() -> None:
    cm = ConfusionMatrix(4)
    cm.update(PRED[None], TARGET[None])
    cm.update(PRED.to(torch.uint8), TARGET.to(torch.uint8))
    assert torch.equal(cm.matrix, 2 * EXPECTED_MATRIX)
    assert summarize(cm.matrix, NAMES)["mean_iou"] == pytest.approx(0.45)


def test_void_ground_truth_is_ignored_whatever_the_prediction() -> None:
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([[1, 3]]), torch.tensor([[1, 0]]))
    s = summarize(cm.matrix, NAMES)
    assert s["pixel_accuracy"] == 1.0 and s["mean_iou"] == 1.0
    assert s["classes_evaluated"] == 1  # the 3 predicted on void is not a false positive
    assert s["per_class"][2]["pred_pixels"] == 0


def test_class_only_predicted_scores_zero() -> None:
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([[1, 3]]), torch.tensor([[1, 1]]))
    s = summarize(cm.matrix, NAMES)
    assert s["per_class"][2]["iou"] == 0.0
    # class 1: tp 1, union 2 -> 0.5; class 3: 0.0; class 2 absent.
    assert s["mean_iou"] == pytest.approx(0.25)
    assert s["pixel_accuracy"] == pytest.approx(0.5)


def test_all_void_gives_zeros_not_nan() -> None:
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([[2, 1]]), torch.zeros(1, 2, dtype=torch.long))
    s = summarize(cm.matrix, NAMES)
    assert s["mean_iou"] == 0.0 and s["pixel_accuracy"] == 0.0 and s["classes_evaluated"] == 0
    assert not any(isinstance(v, float) and math.isnan(v) for v in (s["mean_iou"], s["pixel_accuracy"]))


def test_bad_inputs_are_rejected() -> None:
    cm = ConfusionMatrix(4)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([4]), torch.tensor([1]))
    with pytest.raises(TypeError):
        cm.update(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="class names"):
        summarize(cm.matrix, NAMES[:3])
