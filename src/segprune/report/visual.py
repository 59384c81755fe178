"""Masks and overlays as image files, for `segprune predict`: Pillow only (no matplotlib).

A mask is saved as a palette PNG: its pixel values are the class labels (readable back as labels by any dataset
loader) and its palette shows them in the report's class colours. Ignored pixels are index
:data:`~segprune.data.base.IGNORE_INDEX`, drawn black.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from segprune.data.base import IGNORE_INDEX
from segprune.report import plots


def class_colours(num_classes: int, palette=None) -> np.ndarray:
    """(num_classes, 3) uint8 colours: ``palette`` (a dataset's own, e.g. CamVid's) or the report's."""
    if palette is None:
        return plots.palette(num_classes)
    colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    if len(colours) < num_classes:
        raise ValueError(f"the palette has {len(colours)} colours for {num_classes} classes")
    return colours[:num_classes]


def colour_mask(labels: np.ndarray, num_classes: int, *, palette=None) -> np.ndarray:
    """(H, W) labels as an (H, W, 3) uint8 image; ignored and out-of-range labels black."""
    labels = np.asarray(labels)
    valid = (labels >= 0) & (labels < num_classes)
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[valid] = class_colours(num_classes, palette)[labels[valid]]
    return rgb


def save_mask_png(labels: np.ndarray, path: str | Path, *, num_classes: int, palette=None) -> Path:
    """Save (H, W) labels as a palette PNG whose values are the labels and whose colours are the classes'.

    Raises:
        ValueError: more classes than a palette PNG holds beside the ignore index.
    """
    if num_classes > IGNORE_INDEX:
        raise ValueError(f"{num_classes} classes do not fit a palette PNG beside the ignore index {IGNORE_INDEX}")
    labels = np.asarray(labels)
    indices = np.where((labels >= 0) & (labels < num_classes), labels, IGNORE_INDEX).astype(np.uint8)
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:num_classes] = class_colours(num_classes, palette)
    table[IGNORE_INDEX] = plots.IGNORE_COLOUR
    image = Image.fromarray(indices, mode="P")
    image.putpalette(table.ravel().tolist())
    return _save(image, path)


def blend(image: np.ndarray, labels: np.ndarray, num_classes: int, *, alpha: float = 0.5, palette=None) -> np.ndarray:
    """Class colours blended over an (H, W, 3) uint8 image with weight ``alpha``; ignored pixels left as they are
    (a prediction has none; a ground truth's void should not hide the image)."""
    if np.asarray(labels).shape != np.asarray(image).shape[:2]:
        raise ValueError(f"labels {np.asarray(labels).shape} and image {np.asarray(image).shape[:2]} differ in size")
    image = np.asarray(image, dtype=np.float32)
    mixed = alpha * colour_mask(labels, num_classes, palette=palette).astype(np.float32) + (1 - alpha) * image
    labels = np.asarray(labels)
    keep = (labels < 0) | (labels >= num_classes)
    mixed[keep] = image[keep]
    return mixed.round().clip(0, 255).astype(np.uint8)


def save_overlay(image: np.ndarray, labels: np.ndarray, path: str | Path, *, num_classes: int, alpha: float = 0.5,
                 palette=None) -> Path:
    """Save the image with its (H, W) labels blended over it (see :func:`blend`); JPEG or PNG by the suffix."""
    return _save(Image.fromarray(blend(image, labels, num_classes, alpha=alpha, palette=palette)), path)


def _save(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
