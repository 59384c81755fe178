"""Datasets from a plain folder: ``images/`` and ``masks/`` paired by stem (``images/a.jpg`` with ``masks/a.png``)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from segprune.data.base import (
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    LabelValueError,
    MissingSplitError,
    SegmentationDataset,
    Transform,
    read_grey,
    read_label_png,
    require_dir,
)
from segprune.data.weights import median_frequency_weights

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
    in label order), or number ``num_classes`` (``class0``, ...), or, with neither, are inferred from the largest
    label over all masks (``inferred_classes`` is then True). The last two read every mask once at construction:
    a mask holding a label of no class is an error naming the file and the label, before any training.

    Args:
        root: Folder holding ``images/`` and ``masks/``.
        classes_file: Optional text file of class names.
        transform: Joint transform, see :class:`~segprune.data.base.SegmentationDataset`.
        check_sizes: See :class:`~segprune.data.base.SegmentationDataset`.
        num_classes: The number of classes (e.g. a recipe's), checked against the masks; None: as above.
    """

    def __init__(self, root, classes_file=None, *, transform: Transform | None = None, check_sizes: bool = True,
                 num_classes: int | None = None):
        super().__init__(transform=transform, check_sizes=check_sizes)
        self.root = require_dir(Path(root), "MaskFolder root")
        self.samples = pair_by_stem(self.root, "MaskFolder")
        self.inferred_classes = classes_file is None and num_classes is None
        if classes_file is not None:
            self.class_names = read_class_names(Path(classes_file))
            if num_classes is not None and num_classes != len(self.class_names):
                raise ValueError(f"num_classes={num_classes}, but {classes_file} names {len(self.class_names)}")
        elif num_classes is not None:
            _check_labels(self.samples, num_classes)
            self.class_names = tuple(f"class{i}" for i in range(num_classes))
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
            raise LabelValueError(f"{path}: label {mask[outside].max()} is not below num_classes={self.num_classes}")
        return mask


def _largest_label(mask: np.ndarray) -> int:
    labels = mask[mask != IGNORE_INDEX]
    return int(labels.max()) if labels.size else -1


def _check_labels(samples: list[tuple[Path, Path]], num_classes: int) -> None:
    """Refuse a class count the masks contradict, naming the first mask with a label of no class: training such
    a model would fail at that mask mid-epoch (or, if the count were inferred instead, build another model)."""
    for _, mask in samples:
        top = _largest_label(read_label_png(mask))
        if top >= num_classes:
            raise LabelValueError(f"{mask}: label {top}, but num_classes={num_classes} (labels 0..{num_classes - 1}, "
                                  f"{IGNORE_INDEX} ignored): raise num_classes or fix the mask")


class HumanFolder(SegmentationDataset):
    """Binary person segmentation: ``root/images/*`` and ``root/masks/*`` paired by stem.

    Masks may be grey, RGB or palette images (a JPEG matte is fine): a pixel whose grey level is above 127
    is person (1), the rest background (0). Nothing is ignored. With ``strict`` (the ``human`` dataset of
    ``build_dataset``; ``human_matte`` is the lenient one) every mask must hold only 0 and 255: all masks are
    read at construction and the offending files are named.

    Splits: ``root/<split>/images`` and ``root/<split>/masks`` when that folder exists; otherwise one flat
    folder is split by sorted stem, every ``val_every``-th sample to ``val`` and the rest to ``train``
    (``all`` is every sample).

    Args:
        root: Folder holding ``images/`` and ``masks/`` (or one such folder per split).
        split: ``all``, ``train``, ``val``, or the name of a split folder under ``root``.
        strict: Refuse masks with values other than 0 and 255.
        val_every: Flat folder: every this-many-th sample (by sorted stem) is validation.
        transform: Joint transform, see :class:`~segprune.data.base.SegmentationDataset`.
        check_sizes: See :class:`~segprune.data.base.SegmentationDataset`.
    """

    num_classes = 2
    class_names = ("background", "person")

    def __init__(self, root, split: str = "all", *, strict: bool = False, val_every: int = 5,
                 transform: Transform | None = None, check_sizes: bool = True):
        super().__init__(transform=transform, check_sizes=check_sizes)
        self.root, self.split, self.strict = require_dir(Path(root), "HumanFolder root"), split, strict
        folder = self.root / split if (self.root / split / "images").is_dir() else self.root
        if not (folder / "images").is_dir():
            raise MissingSplitError(f"HumanFolder {self.root}: no {split!r} split ({self.root / split}/images) and no "
                                    f"flat folder ({self.root}/images)")
        pairs = pair_by_stem(folder, "HumanFolder")
        if strict:
            check_binary_masks([mask for _, mask in pairs])
        self.samples = pairs if folder != self.root or split == "all" else _flat_split(pairs, split, val_every, folder)
        self._validate()

    @cached_property
    def class_weights(self) -> tuple[float, float]:
        """Median-frequency weights (background, person) of this split's masks (read once, on first use), for
        `class_weights: true` in a recipe: people are often a few percent of the pixels."""
        return tuple(median_frequency_weights(self, self.num_classes).tolist())

    def load_mask(self, index: int) -> np.ndarray:
        path = self.samples[index][1]
        grey = read_grey(path)
        if self.strict and not np.isin(grey, (0, 255)).all():
            raise ValueError(f"{path}: mask values {_odd_values(grey)} are not 0 or 255")
        return (grey > 127).astype(np.int64)


def _flat_split(pairs: list, split: str, every: int, folder: Path) -> list:
    if split not in ("train", "val"):
        raise MissingSplitError(f"HumanFolder {folder}: no {split!r} split; a flat folder (images/, masks/) has "
                                f"'train', 'val' (every {every}th sample) and 'all'; put a split in "
                                f"{folder / split}/images and masks")
    return [pair for i, pair in enumerate(pairs) if (i % every == every - 1) == (split == "val")]


def check_binary_masks(paths: list[Path]) -> None:
    """Raise ValueError naming every mask (the first 20, and a count) with a value other than 0 and 255."""
    bad = []
    for path in paths:
        grey = read_grey(path)
        if not np.isin(grey, (0, 255)).all():
            bad.append(f"{path.name} (values {_odd_values(grey)})")
    if bad:
        more = f" and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
        raise ValueError(f"{len(bad)} of {len(paths)} binary masks in {paths[0].parent} hold values other than 0 and "
                         f"255 (0 = background, 255 = person): {', '.join(bad[:_LISTED])}{more}; soft mattes can be "
                         "read with human_matte:PATH (person where the grey level is above 127)")


def _odd_values(grey: np.ndarray, shown: int = 5) -> str:
    odd = np.setdiff1d(np.unique(grey), (0, 255))
    return ", ".join(str(v) for v in odd[:shown]) + (", ..." if len(odd) > shown else "")
