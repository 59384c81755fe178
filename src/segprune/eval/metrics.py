"""Semantic segmentation metrics from a confusion matrix (mIoU, pixel and mean class accuracy, foreground IoU),
with optional sliding-window and flip inference."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from segprune._utils import eval_mode, logits
from segprune.data.base import IGNORE_INDEX
from segprune.data.loader import size_groups, size_tolerant


class ConfusionMatrix:
    """Accumulates a (target, prediction) confusion matrix over batches.

    Rows are target classes and columns predicted classes. Pixels whose target is
    ``ignore_index`` are left out.

    Args:
        num_classes: Number of classes K.
        ignore_index: Target value of pixels to leave out.
    """

    def __init__(self, num_classes: int, *, ignore_index: int = IGNORE_INDEX):
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
            present in the target). Values are Python floats. With two classes also ``fg_iou``, the IoU of
            class 1 (the foreground of a binary task).
        """
        mat = self.mat.double()
        tp, support, predicted = mat.diag(), mat.sum(1), mat.sum(0)
        iou = tp / (support + predicted - tp)  # 0/0 = NaN exactly for classes absent from both
        recall = tp / support
        result = dict(
            miou=_nanmean(iou),
            iou=iou.tolist(),
            pixel_acc=(tp.sum() / mat.sum()).item() if mat.sum() > 0 else math.nan,
            mean_acc=_nanmean(recall),
        )
        if self.num_classes == 2:
            result["fg_iou"] = result["iou"][1]
        return result

    def all_reduce(self) -> None:
        """Sum the matrices of all processes into every one (nothing to do outside a process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        mat = self.mat.to(device)
        dist.all_reduce(mat)
        self.mat.copy_(mat.cpu())


def _nanmean(values: torch.Tensor) -> float:
    """Mean over the non-NaN entries; NaN when there are none."""
    values = values[~values.isnan()]
    return values.mean().item() if values.numel() else math.nan


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window offsets ``stride`` apart, the last one flush with the far border so every pixel is covered."""
    last = max(size - crop, 0)
    starts = list(range(0, last + 1, stride))
    return starts if starts[-1] == last else [*starts, last]


def sliding_window(model: nn.Module, image: torch.Tensor, crop, stride) -> torch.Tensor:
    """Logits of ``image`` from ``crop``-sized windows ``stride`` apart, averaged where windows overlap.

    An image smaller than ``crop`` is padded with zeros at the bottom and right (the mean pixel after
    normalisation) and the padding cut off the logits again. Window logits of another size than the window are
    resized bilinearly first.

    Args:
        model: Returns logits (N, K, h, w), or a dict holding them under ``"out"``.
        image: Batch (N, C, H, W).
        crop: Window size (h, w) or a square side.
        stride: Step between windows (h, w) or one value; at most the crop size to leave no gaps.

    Returns:
        Logits (N, K, H, W).
    """
    (crop_h, crop_w), (stride_h, stride_w) = _pair(crop), _pair(stride)
    if min(crop_h, crop_w, stride_h, stride_w) < 1:
        raise ValueError(f"crop and stride must be positive, got {crop}, {stride}")
    height, width = image.shape[-2:]
    image = F.pad(image, (0, max(crop_w - width, 0), 0, max(crop_h - height, 0)))
    total = count = None
    for top in _window_starts(image.shape[-2], crop_h, stride_h):
        for left in _window_starts(image.shape[-1], crop_w, stride_w):
            window = logits(model(image[..., top : top + crop_h, left : left + crop_w]))
            if window.shape[-2:] != (crop_h, crop_w):
                window = F.interpolate(window, size=(crop_h, crop_w), mode="bilinear", align_corners=False)
            if total is None:
                total = window.new_zeros(*window.shape[:2], *image.shape[-2:])
                count = window.new_zeros(1, 1, *image.shape[-2:])
            total[..., top : top + crop_h, left : left + crop_w] += window
            count[..., top : top + crop_h, left : left + crop_w] += 1
    return (total / count)[..., :height, :width]


def predict(model: nn.Module, images: torch.Tensor, *, crop=None, stride=None, flip: bool = False,
            scales=(1.0,)) -> torch.Tensor:
    """Logits of ``images``: one forward pass, or sliding windows when ``crop`` is given, and with ``flip`` the
    mean of those of the image and of its left-right mirror (mirrored back).

    Args:
        model: Returns logits, or a dict holding them under ``"out"``.
        images: Batch (N, C, H, W).
        crop: Window size for :func:`sliding_window`; None runs the whole image at once.
        stride: Window step; by default two thirds of ``crop``.
        flip: Average with the prediction of the mirrored image.
        scales: Multi-scale testing: the mean of the logits at each scale of the image, resized back.
    """
    if tuple(scales) != (1.0,):
        size = images.shape[-2:]
        scaled = [F.interpolate(predict(model, _rescale(images, s), crop=crop, stride=stride, flip=flip), size=size,
                                mode="bilinear", align_corners=False) for s in scales]
        return torch.stack(scaled).mean(0)
    if crop is not None:
        stride = stride if stride is not None else tuple(max(1, 2 * c // 3) for c in _pair(crop))
        run = lambda x: sliding_window(model, x, crop, stride)
    else:
        run = lambda x: logits(model(x))
    out = run(images)
    return (out + run(images.flip(-1)).flip(-1)) / 2 if flip else out


def _rescale(images: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return images
    size = [max(1, round(d * scale)) for d in images.shape[-2:]]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def evaluate(model: nn.Module, loader, *, num_classes: int, ignore_index: int = IGNORE_INDEX, device="cpu", crop=None,
             stride=None, flip: bool = False, scales=(1.0,), all_reduce: bool = False) -> dict:
    """Segmentation metrics of ``model`` on every batch of ``loader``.

    Logits whose size differs from the target's are resized bilinearly first. The model's train/eval mode, and
    each submodule's own, is restored afterwards. Images of different sizes are fine: a DataLoader that stacks with
    the default collate is rebuilt to group each batch by image size (:func:`segprune.data.loader.size_tolerant`),
    and each group runs as one batch, so same-size data is evaluated exactly as before.

    Args:
        model: Returns logits (N, K, H, W), or a dict holding them under ``"out"``.
        loader: Iterable of (images, targets) batches, or of
            :class:`~segprune.data.loader.SizeGroups` of them.
        num_classes: Number of classes K.
        ignore_index: Target value of pixels to leave out.
        device: Device to run on; the model must already be there.
        crop: Sliding-window inference with windows of this size (see :func:`predict`); None: whole images.
        stride: Step of the sliding windows; by default two thirds of ``crop``.
        flip: Flip testing: average the logits of each image and of its mirror.
        scales: Multi-scale testing, e.g. (0.75, 1.0, 1.25): average the logits over rescaled copies.
        all_reduce: Sum the confusion matrix over the processes of the process group before computing metrics
            (each process evaluating its own shard of the data, see ``segprune.train.distributed.ShardSampler``).

    Returns:
        The dict of :meth:`ConfusionMatrix.compute`.
    """
    matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    with eval_mode(model), torch.inference_mode():
        for batch in size_tolerant(loader):
            for images, targets in size_groups(batch):
                logits = predict(model, images.to(device), crop=crop, stride=stride, flip=flip, scales=scales)
                if logits.shape[-2:] != targets.shape[-2:]:
                    logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
                matrix.update(logits, targets.to(device))
    if all_reduce:
        matrix.all_reduce()
    return matrix.compute()
