"""Cityscapes with fine annotations (Cordts et al., 2016), evaluated on the usual 19 train ids.

Layout under ``root``: ``leftImg8bit/<split>/<city>/<frame>_leftImg8bit.png`` and
``gtFine/<split>/<city>/<frame>_gtFine_labelIds.png``. Label ids are mapped to train ids with the table of
the official ``cityscapesscripts/helpers/labels.py``; every id without a train id becomes 255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segprune.data.base import (
    IGNORE_INDEX,
    INVALID_LABEL,
    MissingSplitError,
    SegmentationDataset,
    Transform,
    map_labels,
    read_label_png,
    require_dir,
    require_files,
)

SPLITS = ("train", "val", "test")
# label id -> train id, for the 19 evaluated classes (labels.py: road is id 7, ..., bicycle is id 33).
LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def _label_lut() -> np.ndarray:
    """Label ids 0..33 (and the ignore index) to train ids or ignored; any other value is invalid (raises)."""
    lut = np.full(256, INVALID_LABEL, dtype=np.int64)
    lut[: max(LABEL_TO_TRAIN_ID) + 1] = IGNORE_INDEX
    lut[IGNORE_INDEX] = IGNORE_INDEX
    for label_id, train_id in LABEL_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


class Cityscapes(SegmentationDataset):
    """Cityscapes fine annotations mapped to 19 classes.

    Args:
        root: Folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"``, ``"val"`` or ``"test"`` (the test labels are withheld and map to 255).
        transform: Joint transform, see :class:`~segprune.data.base.SegmentationDataset`.
        check_sizes: See :class:`~segprune.data.base.SegmentationDataset`.
    """

    num_classes = 19
    class_names = (
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
        "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
    )  # fmt: skip
    _lut = _label_lut()

    def __init__(self, root, split: str = "train", *, transform: Transform | None = None, check_sizes: bool = True):
        super().__init__(transform=transform, check_sizes=check_sizes)
        if split not in SPLITS:
            raise ValueError(f"Cityscapes split must be one of {SPLITS}, got {split!r}")
        self.root, self.split = require_dir(Path(root), "Cityscapes root"), split
        if not (self.root / "leftImg8bit" / split).is_dir():
            raise MissingSplitError(f"Cityscapes: no {split!r} split ({self.root / 'leftImg8bit' / split} not found)")
        images = require_dir(self.root / "leftImg8bit" / split, "Cityscapes images (leftImg8bit/<split>)")
        labels = require_dir(self.root / "gtFine" / split, "Cityscapes labels (gtFine/<split>)")
        for image in sorted(images.glob("*/*_leftImg8bit.png")):
            frame = image.name.removesuffix("_leftImg8bit.png")
            self.samples.append((image, labels / image.parent.name / f"{frame}_gtFine_labelIds.png"))
        if not self.samples:
            raise FileNotFoundError(f"Cityscapes: no <city>/*_leftImg8bit.png files under {images}")
        require_files([label for _, label in self.samples], f"Cityscapes gtFine/{split}")
        self._validate()

    def load_mask(self, index: int) -> np.ndarray:
        path = self.samples[index][1]
        return map_labels(read_label_png(path), self._lut, path)
