"""Pascal VOC 2012 semantic segmentation (Everingham et al., 2010): 20 object classes and background.

Layout under ``root`` (the ``VOC2012`` folder, or a folder holding ``VOCdevkit/VOC2012``): ``JPEGImages/<id>.jpg``,
``SegmentationClass/<id>.png`` (palette PNGs whose indices are the labels; 255 marks object borders and
"difficult" regions) and ``ImageSets/Segmentation/<split>.txt`` (one id a line).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segprune.data.base import (
    MissingSplitError,
    SegmentationDataset,
    Transform,
    identity_lut,
    map_labels,
    read_label_png,
    require_files,
)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class VOC(SegmentationDataset):
    """Pascal VOC 2012 segmentation, 21 classes.

    Args:
        root: The ``VOC2012`` folder, or a folder holding ``VOCdevkit/VOC2012``.
        split: Name of a list in ``ImageSets/Segmentation`` (``"train"``, ``"val"``, ``"trainval"``, ...).
        transform: Joint transform, see :class:`~segprune.data.base.SegmentationDataset`.
        check_sizes: See :class:`~segprune.data.base.SegmentationDataset`.
    """

    num_classes = 21
    class_names = VOC_CLASSES
    _lut = identity_lut(21)

    def __init__(self, root, split: str = "train", *, transform: Transform | None = None, check_sizes: bool = True):
        super().__init__(transform=transform, check_sizes=check_sizes)
        root = Path(root)
        self.root = root / "VOCdevkit" / "VOC2012" if (root / "VOCdevkit" / "VOC2012").is_dir() else root
        self.split = split
        list_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise MissingSplitError(
                f"VOC split list {list_file} not found; expected the VOC2012 layout "
                "(JPEGImages/, SegmentationClass/, ImageSets/Segmentation/<split>.txt)"
            )
        ids = list_file.read_text().split()
        self.samples = [
            (self.root / "JPEGImages" / f"{i}.jpg", self.root / "SegmentationClass" / f"{i}.png") for i in ids
        ]
        require_files([p for pair in self.samples for p in pair], f"VOC split {list_file}")
        self._validate()

    def load_mask(self, index: int) -> np.ndarray:
        path = self.samples[index][1]
        return map_labels(read_label_png(path), self._lut, path)
