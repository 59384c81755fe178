"""Joint image-and-mask transforms for training and evaluation, on PIL, numpy and torch (no torchvision).

A transform is a callable ``(image, mask) -> (image, mask)``. Before :class:`ToTensor` the image is a PIL image
or an (H, W, 3) uint8 array and the mask an (H, W) integer array (or a PIL image or tensor); :class:`ToTensor`
makes them a float32 (3, H, W) tensor in [0, 1] and an int64 (H, W) tensor, and :class:`Normalize` works on
those. Geometric transforms move image and mask together: the image is resampled bilinearly, the mask with
nearest neighbour, and padding writes 255 (ignored) into the mask.

Randomness and determinism
--------------------------
Random transforms draw only from torch: from their ``generator`` when they have one, else from torch's global
generator. ``train_transforms(crop, seed=s)`` shares one generator seeded with ``s`` across the pipeline, so in
one process its sequence of augmentations is fixed by ``s``; ``Compose.reseed(s)`` restarts it.

DataLoader workers each get a copy of the dataset with its transform and generator, so identical copies would
repeat the same augmentations in every worker. :func:`segprune.data.loader.make_loader` reseeds the pipeline in
each worker with ``get_worker_info().seed``, the loader's base seed plus the worker id; the base seed is drawn
from the loader's seeded generator when the workers start (each epoch, unless workers persist). Augmentations
are then a function of the loader seed, ``num_workers`` and the batch size. Transforms without a generator use the
worker's global torch generator, which PyTorch seeds with the same value. With ``num_workers=0`` a seeded pipeline
continues its own stream across epochs, and an unseeded one draws from the main process's global generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from segprune.data.base import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, resize_mask


def _as_arrays(image, mask) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and (H, W) int64 mask from PIL images, arrays or (for the mask) a tensor."""
    if isinstance(image, torch.Tensor):
        raise TypeError("this transform takes a PIL image or uint8 array; put it before ToTensor")
    image = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    mask = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    return image, mask.astype(np.int64, copy=False)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _resize(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Image bilinearly and mask with nearest neighbour to ``size`` = (W, H)."""
    resized = Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized), resize_mask(mask, size)


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class Compose:
    """Apply transforms in order; ``reseed`` restarts the random ones."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image, mask):
        for transform in self.transforms:
            image, mask = transform(image, mask)
        return image, mask

    def generators(self) -> list[torch.Generator]:
        """The distinct generators of the random transforms, nested ones included, in order."""
        found: dict[int, torch.Generator] = {}
        for transform in self.transforms:
            nested = isinstance(transform, Compose)
            inner = transform.generators() if nested else [getattr(transform, "generator", None)]
            found.update((id(g), g) for g in inner if g is not None)
        return list(found.values())

    def reseed(self, seed: int) -> None:
        """Seed the k-th distinct generator with ``seed + k`` (a shared generator is seeded once)."""
        for k, generator in enumerate(self.generators()):
            generator.manual_seed(seed + k)

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomScale:
    """Rescale image and mask by a factor drawn uniformly from ``scale``."""

    def __init__(self, scale: tuple[float, float] = (0.5, 2.0), *, generator: torch.Generator | None = None):
        self.scale, self.generator = tuple(scale), generator

    def __call__(self, image, mask):
        image, mask = _as_arrays(image, mask)
        factor = _uniform(*self.scale, self.generator)
        height, width = mask.shape
        return _resize(image, mask, (max(1, round(width * factor)), max(1, round(height * factor))))


class Resize:
    """Resize image and mask to ``size`` = (H, W) or a square side."""

    def __init__(self, size):
        self.size = _pair(size)

    def __call__(self, image, mask):
        image, mask = _as_arrays(image, mask)
        return _resize(image, mask, (self.size[1], self.size[0]))


class RandomCrop:
    """Crop a random ``size`` = (H, W) window, first padding at the bottom and right where the input is smaller.

    Args:
        size: Crop size (H, W) or a square side.
        fill: Image padding, one value or an RGB triple in 0..255; pass the mean pixel (see
            :func:`mean_pixel`) so that padding normalises to zero.
        mask_fill: Mask padding, the ignore index by default so padding is left out of losses and metrics.
        generator: Source of the crop position; torch's global generator when None.
    """

    def __init__(self, size, *, fill=0, mask_fill: int = IGNORE_INDEX, generator: torch.Generator | None = None):
        self.size, self.fill, self.mask_fill, self.generator = _pair(size), fill, mask_fill, generator

    def __call__(self, image, mask):
        image, mask = _as_arrays(image, mask)
        (crop_h, crop_w), (height, width) = self.size, mask.shape
        if height < crop_h or width < crop_w:
            image, mask = self._pad(image, mask, max(height, crop_h), max(width, crop_w))
        top = int(torch.randint(mask.shape[0] - crop_h + 1, (), generator=self.generator))
        left = int(torch.randint(mask.shape[1] - crop_w + 1, (), generator=self.generator))
        return image[top : top + crop_h, left : left + crop_w], mask[top : top + crop_h, left : left + crop_w]

    def _pad(self, image, mask, height, width):
        padded_image = np.empty((height, width, 3), dtype=np.uint8)
        padded_image[...] = np.asarray(self.fill, dtype=np.uint8)
        padded_mask = np.full((height, width), self.mask_fill, dtype=np.int64)
        padded_image[: image.shape[0], : image.shape[1]], padded_mask[: mask.shape[0], : mask.shape[1]] = image, mask
        return padded_image, padded_mask


class RandomHorizontalFlip:
    """Mirror image and mask left-right with probability ``p`` (one draw per call, whatever ``p``)."""

    def __init__(self, p: float = 0.5, *, generator: torch.Generator | None = None):
        self.p, self.generator = p, generator

    def __call__(self, image, mask):
        image, mask = _as_arrays(image, mask)
        if float(torch.rand((), generator=self.generator)) < self.p:
            return image[:, ::-1], mask[:, ::-1]
        return image, mask


class ColorJitter:
    """Random brightness, contrast, saturation and hue, applied to the image only, in that order.

    Brightness, contrast and saturation factors are drawn from ``[max(0, 1 - x), 1 + x]``; the hue shift from
    ``[-hue, hue]`` of a full turn (``hue`` at most 0.5). A zero parameter draws nothing.
    """

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, *, generator=None):
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.generator = generator

    def __call__(self, image, mask):
        image, mask = _as_arrays(image, mask)
        pixels = image.astype(np.float32)
        if self.brightness:
            pixels = np.clip(pixels * self._factor(self.brightness), 0, 255)
        if self.contrast:
            grey = _luminance(pixels).mean()
            pixels = np.clip(grey + (pixels - grey) * self._factor(self.contrast), 0, 255)
        if self.saturation:
            grey = _luminance(pixels)[..., None]
            pixels = np.clip(grey + (pixels - grey) * self._factor(self.saturation), 0, 255)
        image = np.rint(pixels).astype(np.uint8)
        if self.hue:
            image = _shift_hue(image, _uniform(-self.hue, self.hue, self.generator))
        return image, mask

    def _factor(self, amount: float) -> float:
        return _uniform(max(0.0, 1 - amount), 1 + amount, self.generator)


def _luminance(pixels: np.ndarray) -> np.ndarray:
    return pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _shift_hue(image: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue of a uint8 RGB image by ``shift`` of a full turn, through PIL's 8-bit HSV."""
    hsv = np.array(Image.fromarray(image).convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + round(shift * 256)) % 256
    height, width = hsv.shape[:2]
    return np.asarray(Image.frombytes("HSV", (width, height), hsv.tobytes()).convert("RGB"))


class ToTensor:
    """Image to float32 (3, H, W) in [0, 1], mask to int64 (H, W)."""

    def __call__(self, image, mask):
        image, mask = _as_arrays(image, mask)
        image = torch.from_numpy(np.array(image.transpose(2, 0, 1), dtype=np.float32)).div_(255)
        return image, torch.from_numpy(np.array(mask, dtype=np.int64))


class Normalize:
    """Subtract ``mean`` and divide by ``std`` per channel of a (3, H, W) float tensor; the mask passes through."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image, mask):
        if not isinstance(image, torch.Tensor):
            raise TypeError("Normalize takes a tensor image; put it after ToTensor")
        return (image - self.mean) / self.std, mask


def mean_pixel(mean: Sequence[float] = IMAGENET_MEAN) -> tuple[int, ...]:
    """The 0..255 pixel that normalises to (about) zero: padding with it adds no signal."""
    return tuple(round(255 * m) for m in mean)


def train_transforms(
    crop,
    *,
    scale: tuple[float, float] | None = (0.5, 2.0),
    flip: float = 0.5,
    jitter: float | tuple[float, float, float, float] = 0.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    seed: int | None = None,
) -> Compose:
    """The usual training pipeline: random scale, crop (padded with the mean pixel / 255), flip, jitter, tensors.

    Args:
        crop: Crop size (H, W) or a square side.
        scale: Range of the random scale factor; None skips scaling.
        flip: Probability of a horizontal flip.
        jitter: Colour jitter, one amount for brightness, contrast and saturation, or a
            (brightness, contrast, saturation, hue) tuple; 0 skips it.
        mean: Normalisation mean (also sets the padding colour).
        std: Normalisation std.
        seed: Seed of one generator shared by the random steps; None uses torch's global generator.
    """
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    steps = [] if scale is None else [RandomScale(scale, generator=generator)]
    steps += [RandomCrop(crop, fill=mean_pixel(mean), generator=generator)]
    steps += [RandomHorizontalFlip(flip, generator=generator)]
    if jitter:
        amounts = (jitter, jitter, jitter, 0.0) if isinstance(jitter, (int, float)) else tuple(jitter)
        steps.append(ColorJitter(*amounts, generator=generator))
    return Compose([*steps, ToTensor(), Normalize(mean, std)])


def eval_transforms(
    *, size=None, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Compose:
    """Tensors and normalisation, after an optional resize to ``size`` (H, W) (the mask with nearest neighbour)."""
    steps = [] if size is None else [Resize(size)]
    return Compose([*steps, ToTensor(), Normalize(mean, std)])
