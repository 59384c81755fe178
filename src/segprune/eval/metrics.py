"""Semantic segmentation metrics from a confusion matrix (mIoU, pixel and mean class accuracy)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ConfusionMatrix:
    """Accumulates a (target, prediction) confusion matrix over batches.

    Rows are target classes and columns predicted classes. Pixels whose target is
    ``ignore_index`` are left out.

    Args:
        num_classes: Number of classes K.
        ignore_index: Target value of pixels to leave out.
    """

    def __init__(self, num_classes: int, *, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.mat.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred: Logits (N, K, H, W) or predicted labels (N, H, W).
            target: Target labels (N, H, W), values in [0, K) or ``ignore_index``.
        """
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(1)
        pred, target = pred.reshape(-1), target.reshape(-1).to(pred.device)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        k = self.num_classes
        # A stray label would land in another cell of the matrix and bias every IoU silently.
        if target.numel() and (target.min() < 0 or target.max() >= k or pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"labels must lie in [0, {k}) or equal ignore_index={self.ignore_index}")
        counts = torch.bincount(target.long() * k + pred.long(), minlength=k * k)
        self.mat += counts.reshape(k, k).cpu()

    def compute(self) -> dict:
        """Metrics of everything accumulated.

        Returns:
            A dict with ``miou`` (mean over classes present in target or prediction), ``iou`` (list,
            NaN for a class absent from both), ``pixel_acc`` and ``mean_acc`` (mean recall over classes
            present in the target). Values are Python floats.
        """
        mat = self.mat.double()
        tp, support, predicted = mat.diag(), mat.sum(1), mat.sum(0)
        iou = tp / (support + predicted - tp)  # 0/0 = NaN exactly for classes absent from both
        recall = tp / support
        return dict(
            miou=_nanmean(iou),
            iou=iou.tolist(),
            pixel_acc=(tp.sum() / mat.sum()).item() if mat.sum() > 0 else math.nan,
            mean_acc=_nanmean(recall),
        )


def _nanmean(values: torch.Tensor) -> float:
    """Mean over the non-NaN entries; NaN when there are none."""
    values = values[~values.isnan()]
    return values.mean().item() if values.numel() else math.nan


def _logits(output) -> torch.Tensor:
    """The main logits of a model output: the tensor itself or its ``"out"`` entry."""
    return output["out"] if isinstance(output, dict) else output


def evaluate(model: nn.Module, loader, *, num_classes: int, ignore_index: int = 255, device="cpu") -> dict:
    """Segmentation metrics of ``model`` on every batch of ``loader``.

    Logits whose size differs from the target's are resized bilinearly first. The model's
    train/eval mode is restored afterwards.

    Args:
        model: Returns logits (N, K, H, W), or a dict holding them under ``"out"``.
        loader: Iterable of (images, targets) batches.
        num_classes: Number of classes K.
        ignore_index: Target value of pixels to leave out.
        device: Device to run on; the model must already be there.

    Returns:
        The dict of :meth:`ConfusionMatrix.compute`.
    """
    matrix, was_training = ConfusionMatrix(num_classes, ignore_index=ignore_index), model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, targets in loader:
                logits = _logits(model(images.to(device)))
                if logits.shape[-2:] != targets.shape[-2:]:
                    logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
                matrix.update(logits, targets.to(device))
    finally:
        model.train(was_training)
    return matrix.compute()
