"""CamVid in the SegNet release layout (Brostow et al., 2008; Badrinarayanan et al., SegNet, 2017).

Layout under ``root``: ``train/ trainannot/ val/ valannot/ test/ testannot/`` and ``train.txt val.txt test.txt``,
each line ``/SegNet/CamVid/<split>/<name>.png /SegNet/CamVid/<split>annot/<name>.png``. Labels are 8-bit class
indices 0..11 where 11 is "Unlabelled"; it becomes the ignore index, leaving 11 classes. Any other value (a mask
of another label set, e.g. the 32-class CamVid) raises naming the file and the value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segprune.data.base import (
    IGNORE_INDEX,
    MissingSplitError,
    SegmentationDataset,
    Transform,
    identity_lut,
    map_labels,
    read_label_png,
    require_dir,
    require_files,
)

SPLITS = ("train", "val", "test")
_PREFIX = "/SegNet/CamVid/"


class CamVid(SegmentationDataset):
    """CamVid, 11 classes at 480x360, 367 / 101 / 233 images in train / val / test.

    Args:
        root: Folder holding the split lists and image folders.
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: Joint transform, see :class:`~segprune.data.base.SegmentationDataset`.
        check_sizes: See :class:`~segprune.data.base.SegmentationDataset`.
    """

    num_classes = 11
    class_names = (
        "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
    )  # fmt: skip
    palette = (
        (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
        (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
    )  # fmt: skip
    # SegNet's published median-frequency weights. Recomputing them on this release's train split with
    # median_frequency_weights gives the same classes above 1 but different values (SignSymbol 3.85, not 9.64),
    # so SegNet's were presumably computed on another label version; these are kept for comparability.
    class_weights = (0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418, 0.6823, 6.2478, 7.3614)
    _lut = identity_lut(11, void=(11, IGNORE_INDEX))  # 11 Unlabelled (and the ignore index) -> ignored

    def __init__(self, root, split: str = "train", *, transform: Transform | None = None, check_sizes: bool = True):
        super().__init__(transform=transform, check_sizes=check_sizes)
        if split not in SPLITS:
            raise ValueError(f"CamVid split must be one of {SPLITS}, got {split!r}")
        self.root, self.split = require_dir(Path(root), "CamVid root"), split
        self.samples = _read_split_list(self.root, self.root / f"{split}.txt")
        require_files([p for pair in self.samples for p in pair], f"CamVid {split} list {self.root / split}.txt")
        self._validate()

    def load_mask(self, index: int) -> np.ndarray:
        path = self.samples[index][1]
        return map_labels(read_label_png(path), self._lut, path)


def _read_split_list(root: Path, list_file: Path) -> list[tuple[Path, Path]]:
    """Pairs of (image, label) paths from a SegNet split list, with the ``/SegNet/CamVid`` prefix stripped."""
    if not list_file.is_file():
        raise MissingSplitError(
            f"CamVid split list {list_file} not found; expected the SegNet layout "
            "(train.txt val.txt test.txt beside train/ trainannot/ ...)"
        )
    pairs = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{list_file}:{number}: expected '<image> <label>', got {line!r}")
        pairs.append(tuple(root / f.removeprefix(_PREFIX).lstrip("/") for f in fields))
    return pairs
