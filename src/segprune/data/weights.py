"""Class weights from label statistics."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from segprune.data.base import IGNORE_INDEX


def median_frequency_weights(dataset_or_masks, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Median-frequency class weights (Eigen and Fergus, 2015), as SegNet uses them.

    ``freq(c)`` is the number of pixels of class ``c`` divided by the number of labelled pixels in the images
    where ``c`` appears, and ``weight(c) = median(freq) / freq(c)``. Ignored pixels count nowhere. A class that
    never appears gets weight 0 and is left out of the median.

    Args:
        dataset_or_masks: A dataset with ``load_mask(i)`` (masks are read without the images), any dataset of
            ``(image, mask)`` pairs, or an iterable of (H, W) label arrays or tensors.
        num_classes: Number of classes.
        ignore_index: Label value to skip.

    Returns:
        float64 tensor of ``num_classes`` weights.
    """
    pixels = np.zeros(num_classes, dtype=np.float64)
    image_pixels = np.zeros(num_classes, dtype=np.float64)
    for mask in _masks(dataset_or_masks):
        labels = np.asarray(mask).ravel()
        labels = labels[labels != ignore_index]
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"mask has labels outside 0..{num_classes - 1} other than {ignore_index}")
        counts = np.bincount(labels, minlength=num_classes)
        pixels += counts
        image_pixels[counts > 0] += labels.size
    present = pixels > 0
    freq = np.divide(pixels, image_pixels, out=np.zeros(num_classes), where=present)
    weights = np.divide(np.median(freq[present]), freq, out=np.zeros(num_classes), where=present)
    return torch.from_numpy(weights)


def _masks(source) -> Iterable:
    if hasattr(source, "load_mask"):
        return (source.load_mask(i) for i in range(len(source)))
    if isinstance(source, Dataset):
        return (source[i][1] for i in range(len(source)))
    return source
