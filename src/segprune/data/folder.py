"""Datasets from a plain folder: ``images/`` and ``masks/`` paired by stem (``images/a.jpg`` with ``masks/a.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from segprune.data.base import IGNORE_INDEX, IMAGE_SUFFIXES, SegmentationDataset, Transform, read_label_png, require_dir

_LISTED = 20  # stems named in an unpaired-files error before "and N more"


def pair_by_stem(root: Path, what: str) -> list[tuple[Path, Path]]:
    """(image, mask) pairs from ``root/images`` and ``root/masks``, sorted by stem.

    Raises:
        ValueError: Some stems have an image but no mask or the reverse (both lists are named), or one folder
            holds two files with the same stem.
        FileNotFoundError: A folder is missing or holds no image files.
    """
    images = _files_by_stem(require_dir(root / "images", f"{what} images"), what)
    masks = _files_by_stem(require_dir(root / "masks", f"{what} masks"), what)
    no_mask, no_image = sorted(images.keys() - masks.keys()), sorted(masks.keys() - images.keys())
    if no_mask or no_image:
        raise ValueError(
            f"{what} {root}: {len(no_mask) + len(no_image)} unpaired file stem(s); "
            f"images without a mask: {_listing(no_mask)}; masks without an image: {_listing(no_image)}"
        )
    return [(images[stem], masks[stem]) for stem in sorted(images)]


def _files_by_stem(folder: Path, what: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in files:
            raise ValueError(f"{what}: {files[path.stem].name} and {path.name} in {folder} share a stem")
        files[path.stem] = path
    if not files:
        raise FileNotFoundError(f"{what}: no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def _listing(stems: list[str]) -> str:
    more = f" and {len(stems) - _LISTED} more" if len(stems) > _LISTED else ""
    return f"[{', '.join(stems[:_LISTED])}]{more}" if stems else "none"


def read_class_names(path: Path) -> tuple[str, ...]:
    """Class names from a text file, one a line; blank lines are skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"classes file {path} not found")
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names:
        raise ValueError(f"classes file {path} lists no class names")
    return names


class MaskFolder(SegmentationDataset):
    """Images with single-channel label masks: ``root/images/*`` and ``root/masks/*`` paired by stem.

    Mask values are class indices; 255 is ignored. The classes come from ``classes_file`` (one name a line,
    in label order) or, without one, are inferred from the largest label over all masks (``class0``, ...),
    which reads every mask once at construction.

    Args:
        root: Folder holding ``images/`` and ``masks/``.
        classes_file: Optional text file of class names.
        transform: Joint transform, see :class:`~segprune.data.base.SegmentationDataset`.
        check_sizes: See :class:`~segprune.data.base.SegmentationDataset`.
    """

    def __init__(self, root, classes_file=None, *, transform: Transform | None = None, check_sizes: bool = True):
        super().__init__(transform=transform, check_sizes=check_sizes)
        self.root = require_dir(Path(root), "MaskFolder root")
        self.samples = pair_by_stem(self.root, "MaskFolder")
        if classes_file is not None:
            self.class_names = read_class_names(Path(classes_file))
        else:
            top = max(_largest_label(read_label_png(mask)) for _, mask in self.samples)
            if top < 0:
                raise ValueError(f"MaskFolder {self.root}: every mask is entirely {IGNORE_INDEX} (ignored)")
            self.class_names = tuple(f"class{i}" for i in range(top + 1))
        self.num_classes = len(self.class_names)
        if self.num_classes > IGNORE_INDEX:
            raise ValueError(f"MaskFolder: {self.num_classes} classes, at most {IGNORE_INDEX} (255 means ignore)")
        self._validate()

    def load_mask(self, index: int) -> np.ndarray:
        path = self.samples[index][1]
        mask = read_label_png(path).astype(np.int64)
        outside = (mask >= self.num_classes) & (mask != IGNORE_INDEX)
        if outside.any():
            raise ValueError(f"{path}: label {mask[outside].max()} is not below num_classes={self.num_classes}")
        return mask


def _largest_label(mask: np.ndarray) -> int:
    labels = mask[mask != IGNORE_INDEX]
    return int(labels.max()) if labels.size else -1


class HumanFolder(SegmentationDataset):
    """Binary person segmentation: ``root/images/*`` and ``root/masks/*`` paired by stem.

    Masks may be grey, RGB or palette images (a JPEG matte is fine): a pixel whose grey level is above 127
    is person (1), the rest background (0). Nothing is ignored.

    Args:
        root: Folder holding ``images/`` and ``masks/``.
        transform: Joint transform, see :class:`~segprune.data.base.SegmentationDataset`.
        check_sizes: See :class:`~segprune.data.base.SegmentationDataset`.
    """

    num_classes = 2
    class_names = ("background", "person")

    def __init__(self, root, *, transform: Transform | None = None, check_sizes: bool = True):
        super().__init__(transform=transform, check_sizes=check_sizes)
        self.root = require_dir(Path(root), "HumanFolder root")
        self.samples = pair_by_stem(self.root, "HumanFolder")
        self._validate()

    def load_mask(self, index: int) -> np.ndarray:
        with Image.open(self.samples[index][1]) as mask:
            return (np.asarray(mask.convert("L")) > 127).astype(np.int64)
