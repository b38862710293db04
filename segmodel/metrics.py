"""Confusion-matrix evaluation: mean IoU and pixel accuracy with void (class 0) ignored."""

import torch
from torch import Tensor

VOID = 0


class ConfusionMatrix:
    """Accumulates an int64 [C, C] matrix; rows = ground truth, columns = prediction.

    Void ground-truth pixels are counted too (row 0) so the matrix stays a
    faithful record; ``summarize`` is what leaves them out.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (void + one class), got {num_classes}")
        self.num_classes = num_classes
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch ([N, H, W]) or a single map ([H, W]) of integer class ids."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("pred and target must hold integer class ids, not scores")
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).long()
        c = self.num_classes
        for name, values in (("pred", pred), ("target", target)):
            if values.numel() and (values.min() < 0 or values.max() >= c):
                raise ValueError(
                    f"{name} holds ids outside 0..{c - 1} (min {int(values.min())}, max {int(values.max())})"
                )
        counts = torch.bincount(target * c + pred, minlength=c * c).reshape(c, c)
        self.matrix += counts.to(self.matrix.device)


def summarize(matrix: Tensor, class_names: list[str]) -> dict:
    """Mean IoU, pixel accuracy and per-class figures over non-void ground-truth pixels.

    A prediction of void on a non-void pixel is an error. Classes with no
    ground-truth and no predicted pixels (union 0) get iou None and are left
    out of the mean.
    """
    c = matrix.shape[0]
    if matrix.shape != (c, c):
        raise ValueError(f"confusion matrix must be square, got {tuple(matrix.shape)}")
    if len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names for a {c}-class confusion matrix")
    m = matrix.detach().to("cpu", torch.int64)
    labelled = m[VOID + 1 :]  # drop void ground-truth rows: those pixels are not scored
    total = int(labelled.sum())
    correct = int(torch.diagonal(m)[VOID + 1 :].sum())
    per_class = []
    ious = []
    for k in range(VOID + 1, c):
        tp = int(m[k, k])
        gt = int(m[k].sum())
        pred = int(labelled[:, k].sum())
        union = gt + pred - tp
        iou = tp / union if union else None
        if iou is not None:
            ious.append(iou)
        per_class.append({"id": k, "name": class_names[k], "iou": iou, "gt_pixels": gt, "pred_pixels": pred})
    return {
        "mean_iou": sum(ious) / len(ious) if ious else 0.0,
        "pixel_accuracy": correct / total if total else 0.0,
        "per_class": per_class,
        "classes_evaluated": len(ious),
    }
