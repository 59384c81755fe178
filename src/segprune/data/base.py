"""What every file-backed segmentation dataset shares: reading pairs, fixing sizes, the default normalisation.

A dataset is a list of samples, each an image path and a mask reference. Subclasses fill ``self.samples``
and say how a mask is read (:meth:`SegmentationDataset.load_mask`); the base class turns a sample into
``(image, mask)`` tensors. Masks whose size differs from their image are resized with nearest neighbour;
their count is found once at construction (a header read per file) and reported in one warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from segprune._utils import IGNORE_INDEX

INVALID_LABEL = -1  # lookup-table entry of a raw value that is neither a class nor void: reading it raises
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

Transform = Callable[[Image.Image, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


class UnreadableFileError(OSError, ValueError):
    """An image or mask file that cannot be opened or decoded (truncated, not an image); the message names it.

    Also a ValueError (bad input data, as the CLI reports it in one line), and an OSError (what PIL raised)."""


class LabelValueError(ValueError):
    """A mask holds a value that is neither one of the dataset's classes nor its void value."""


class MissingSplitError(FileNotFoundError, ValueError):
    """A dataset has no such split here; `check` skips it, building it for training is still an error."""


@contextmanager
def reading(path: str | Path, what: str = "image") -> Iterator[None]:
    """Re-raise any failure to open or decode ``path`` as :class:`UnreadableFileError` naming the file.

    PIL reports a truncated JPEG as a bare ``OSError: image file is truncated`` (and some broken PNGs as
    ``SyntaxError``) without the path; met mid-epoch in a loader worker, that names nothing the user can fix.
    """
    try:
        yield
    except UnreadableFileError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the decoder raises, the file is what the user must see
        raise UnreadableFileError(f"{path}: cannot read {what} ({type(err).__name__}: {err})") from err


def read_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB; grayscale, palette and RGBA files are converted (alpha is dropped)."""
    with reading(path), Image.open(path) as image:
        return image.convert("RGB")


def read_grey(path: str | Path) -> np.ndarray:
    """An image file as an (H, W) uint8 grey-level array (a binary mask or matte in any image mode)."""
    with reading(path, "mask"), Image.open(path) as image:
        return np.asarray(image.convert("L"))


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a mask of label values as an (H, W) integer array.

    Palette PNGs give their indices (the VOC convention). Colour masks are accepted only when their colour
    channels are equal (a grey mask saved as RGB); a real colour-coded mask raises, since its colours would
    need a palette to become labels.
    """
    with reading(path, "mask"), Image.open(path) as image:
        array = np.array(image)
    if array.ndim == 3:
        colour = array[..., :3]
        if not (np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])):
            raise ValueError(f"{path}: mask has distinct colour channels; expected a single-channel label image")
        array = colour[..., 0]
    return array


def map_labels(raw: np.ndarray, lut: np.ndarray, path: str | Path) -> np.ndarray:
    """Map raw label values through a lookup table to int64 labels.

    Raises:
        LabelValueError: naming ``path`` and the values, for a value past the table or one the table marks
            :data:`INVALID_LABEL` (neither a class nor void): such a mask belongs to another label set, and
            turning it into "ignore" would hide that.
    """
    if raw.size and int(raw.max()) >= len(lut):
        raise LabelValueError(f"{path}: label value {int(raw.max())} is outside the expected range 0..{len(lut) - 1}")
    labels = lut[raw]
    invalid = labels == INVALID_LABEL
    if invalid.any():
        raise LabelValueError(f"{path}: label value(s) {_listed(np.unique(raw[invalid]))} are neither a class "
                              f"({_value_ranges(np.flatnonzero((lut >= 0) & (lut != IGNORE_INDEX)))}) nor void "
                              f"({_value_ranges(np.flatnonzero(lut == IGNORE_INDEX))}): is it the dataset's mask?")
    return labels


def identity_lut(num_classes: int, void: Sequence[int] = (IGNORE_INDEX,)) -> np.ndarray:
    """Lookup table keeping 0..num_classes-1, sending the ``void`` values to the ignore index and marking every
    other 8-bit value :data:`INVALID_LABEL` (an error when read, see :func:`map_labels`)."""
    lut = np.full(256, INVALID_LABEL, dtype=np.int64)
    lut[:num_classes] = np.arange(num_classes)
    lut[list(void)] = IGNORE_INDEX
    return lut


def _listed(values: np.ndarray, shown: int = 5) -> str:
    return ", ".join(str(int(v)) for v in values[:shown]) + (", ..." if len(values) > shown else "")


def _value_ranges(values: np.ndarray) -> str:
    """Sorted integers as compact ranges: [0 1 2 3 7] -> "0..3, 7"."""
    if not len(values):
        return "none"
    runs, start = [], values[0]
    for prev, cur in zip(values, [*values[1:], None]):
        if cur is None or cur != prev + 1:
            runs.append(f"{start}..{prev}" if prev > start else f"{start}")
            start = cur
    return ", ".join(runs)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W) label array to ``size`` = (W, H) with nearest neighbour."""
    image = Image.fromarray(mask.astype(np.int32))
    return np.array(image.resize(size, Image.Resampling.NEAREST), dtype=np.int64)


def image_size(path: str | Path) -> tuple[int, int]:
    """(W, H) of an image file, from its header only."""
    with reading(path), Image.open(path) as image:
        return image.size


def normalise(image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The default transform: image to float32 (3, H, W) normalised with ImageNet mean and std; mask to int64."""
    array = np.asarray(image, dtype=np.float32) / 255
    array = (array - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), torch.from_numpy(mask.astype(np.int64))


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory, else a FileNotFoundError naming it and what it should hold."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: directory {path} not found")
    return path


def require_files(paths: Sequence[Path], what: str) -> None:
    """Raise FileNotFoundError naming the first missing path and how many are missing."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} listed file(s) missing, the first is {missing[0]}")


class SegmentationDataset(Dataset):
    """Base for datasets of (image file, mask) pairs returning ``(image, mask)`` tensors.

    Args:
        transform: Joint transform ``transform(image, mask) -> (image_tensor, mask_tensor)`` called with a PIL RGB
            image and an (H, W) int64 label array; by default the image is normalised with ImageNet statistics.
        check_sizes: Read every image and mask header at construction and warn once with the number of masks
            whose size differs from their image. Mismatched masks are resized with nearest neighbour either
            way; with ``False`` the first one met is reported instead.

    Subclasses set ``num_classes``, ``class_names`` and ``self.samples`` (a list of (image path, mask reference))
    before calling :meth:`_validate`, and implement :meth:`load_mask`.
    """

    ignore_index = IGNORE_INDEX
    num_classes: int
    class_names: tuple[str, ...]

    def __init__(self, *, transform: Transform | None = None, check_sizes: bool = True):
        self.transform = transform
        self.check_sizes = check_sizes
        self.samples: list[tuple[Path, object]] = []
        self._warned = False

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.load_image(index)
        mask = self.load_mask(index)
        if mask.shape != (image.height, image.width):
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"{type(self).__name__}: the mask of {self.samples[index][0]} differs in size from its image and "
                    "is resized with nearest neighbour (check_sizes=False, so further ones are not reported)",
                    stacklevel=2,
                )
            mask = resize_mask(mask, image.size)
        return (normalise if self.transform is None else self.transform)(image, mask)

    def load_image(self, index: int) -> Image.Image:
        """Image ``index`` as a PIL RGB image."""
        return read_rgb(self.samples[index][0])

    def load_mask(self, index: int) -> np.ndarray:
        """Mask ``index`` as (H, W) int64 labels in 0..num_classes-1 or ``ignore_index``, at its stored size."""
        raise NotImplementedError

    def mask_size(self, index: int) -> tuple[int, int]:
        """(W, H) of mask ``index`` without decoding it; by default the header of the mask file."""
        return image_size(self.samples[index][1])

    def _validate(self) -> None:
        """Refuse an empty split (naming where it was looked for), then check mask sizes."""
        if not self.samples:
            raise ValueError(f"{type(self).__name__}: no samples found (root {getattr(self, 'root', '?')}, "
                             f"split {getattr(self, 'split', '?')!r})")
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Count masks whose size differs from their image and warn once with the count."""
        if not self.check_sizes:
            return
        self._warned = True
        mismatched = [i for i in range(len(self)) if image_size(self.samples[i][0]) != self.mask_size(i)]
        if mismatched:
            warnings.warn(
                f"{type(self).__name__}: {len(mismatched)} of {len(self)} masks differ in size from their image and "
                f"are resized with nearest neighbour (the first: {self.samples[mismatched[0]][0]})",
                stacklevel=3,
            )
