"""Procedural street-like scenes: a segmentation dataset that needs no download.

Every sample is drawn from its own generator, ``numpy.random.default_rng([seed, split_id, index])``,
so a sample does not depend on the order or the worker that reads it, and train / val / test are
disjoint streams. The scenes are built so that no single cue separates the classes:

- class colours overlap (a green tree on grass, a grey building under an overcast sky, a grey pole
  on asphalt), and the ground carries distractor patches painted in object colours;
- each class has its own shape (ellipse, rectangle, triangle, thin bar) and texture (fine
  speckle, checker, stripes, flat; the ground has coarse blotches), with random scale, orientation and phase;
- objects occlude each other in painter's order, some are small, and every image gets its own
  lighting (per-channel gain, bias, a linear gradient) and gaussian noise.

Class ``0`` is the textured ground and class ``1`` the sky above a wavy horizon; both are "stuff"
and have no instances. Classes ``2 .. num_classes - 1`` are objects with instance ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from segprune.data.base import IGNORE_INDEX
from segprune.data.instances import CategoryList, InstanceTransform, make_target, mask_api

SPLITS = {"train": 0, "val": 1, "test": 2}
SHAPES = ("ellipse", "rectangle", "triangle", "bar")
TEXTURES = ("speckle", "checker", "stripes", "flat")


@dataclass(frozen=True)
class _Style:
    """How one object class looks: shape, texture, mean colour (RGB, 0-255) and colour spread."""

    name: str
    shape: str
    texture: str
    colour: tuple[float, float, float]
    spread: float


_OBJECT_STYLES = (
    _Style("tree", "ellipse", "speckle", (70, 115, 60), 30),
    _Style("building", "rectangle", "checker", (140, 125, 115), 30),
    _Style("roof", "triangle", "stripes", (150, 85, 65), 35),
    _Style("pole", "bar", "flat", (105, 105, 105), 30),
)
# Ground and sky colours overlap the object colours on purpose: grass vs tree, asphalt vs pole.
_GROUND_COLOURS = np.array([(115, 95, 65), (85, 115, 60), (120, 120, 115)], dtype=np.float32)
_SKY_COLOURS = np.array([(125, 165, 215), (165, 165, 170)], dtype=np.float32)


def _object_style(cls: int) -> _Style:
    """Style of object class ``cls`` (>= 2); classes past the named four get derived styles."""
    k = cls - 2
    if k < len(_OBJECT_STYLES):
        return _OBJECT_STYLES[k]
    colour = np.random.default_rng([cls, 7]).integers(50, 200, size=3)
    # Offset the texture cycle against the shape cycle so extra classes are new combinations.
    return _Style(f"object{cls}", SHAPES[k % 4], TEXTURES[(k + 1 + k // 4) % 4], tuple(map(float, colour)), 30)


def _smooth_noise(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cell: float) -> np.ndarray:
    """Value noise at pixels (yy, xx): a coarse gaussian grid sampled bilinearly (std ~0.6)."""
    rows, cols = int(yy.max(initial=0) / cell) + 2, int(xx.max(initial=0) / cell) + 2
    coarse = rng.standard_normal((rows, cols), dtype=np.float32)
    fy, fx = yy / cell, xx / cell
    y0, x0 = fy.astype(np.int64), fx.astype(np.int64)
    ty, tx = fy - y0, fx - x0
    top = coarse[y0, x0] * (1 - tx) + coarse[y0, x0 + 1] * tx
    bottom = coarse[y0 + 1, x0] * (1 - tx) + coarse[y0 + 1, x0 + 1] * tx
    return top * (1 - ty) + bottom * ty


def _rotated(yy, xx, cy, cx, theta):
    """Coordinates (u, v) of every pixel in a frame centred at (cy, cx) and rotated by theta."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(theta), np.sin(theta)
    return dx * c + dy * s, -dx * s + dy * c


def _shape_mask(shape: str, rng: np.random.Generator, yy, xx, size: float) -> np.ndarray:
    """Boolean mask of one random instance of ``shape`` with characteristic size ``size`` pixels."""
    h, w = yy.shape
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    if shape == "ellipse":
        u, v = _rotated(yy, xx, cy, cx, rng.uniform(0, np.pi))
        return (u / (size * rng.uniform(0.6, 1.2))) ** 2 + (v / (size * rng.uniform(0.5, 1.0))) ** 2 <= 1
    if shape == "triangle":
        return _triangle(rng, yy, xx, cy, cx, size)
    if shape == "bar":  # thin and long, close to vertical like a pole
        u, v = _rotated(yy, xx, cy, cx, rng.uniform(-0.15, 0.15))
        return (np.abs(u) <= rng.uniform(1.5, 3.5)) & (np.abs(v) <= size * rng.uniform(1.5, 3.0))
    u, v = _rotated(yy, xx, cy, cx, rng.uniform(-0.3, 0.3))
    return (np.abs(u) <= size * rng.uniform(0.5, 1.3)) & (np.abs(v) <= size * rng.uniform(0.5, 1.3))


def _triangle(rng: np.random.Generator, yy, xx, cy, cx, size) -> np.ndarray:
    """Mask of a triangle with jittered vertices around (cy, cx): inside all three half-planes."""
    angles = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.4, 0.4, 3)
    radii = size * rng.uniform(0.7, 1.4, 3)
    py, px = cy + radii * np.sin(angles), cx + radii * np.cos(angles)
    inside = np.ones(yy.shape, dtype=bool)
    for a, b in ((0, 1), (1, 2), (2, 0)):  # vertices run counter-clockwise in (x, y), so cross >= 0
        inside &= (px[b] - px[a]) * (yy - py[a]) - (py[b] - py[a]) * (xx - px[a]) >= 0
    return inside


def _texture(kind: str, rng: np.random.Generator, colour: np.ndarray, yy, xx) -> np.ndarray:
    """Colours (..., 3) at pixels (yy, xx) of ``colour`` carrying texture ``kind`` with random parameters.

    Only the painted pixels are passed in, which keeps small objects cheap.
    """
    if kind in ("noise", "speckle"):  # coarse blotches (ground) or fine, stronger grain (foliage)
        cell, amplitude = (rng.uniform(5, 10), 0.35) if kind == "noise" else (rng.uniform(1.5, 3), 0.5)
        return colour * (1 + amplitude * _smooth_noise(rng, yy, xx, cell))[..., None]
    if kind == "flat":
        return np.broadcast_to(colour, (*yy.shape, 3))
    if kind == "checker":
        cell = rng.uniform(3, 7)
        on = ((yy // cell + xx // cell) % 2).astype(bool)
    else:  # stripes
        u, _ = _rotated(yy, xx, 0, 0, rng.uniform(0, np.pi))
        on = np.sin(2 * np.pi * u / rng.uniform(4, 10)) > 0
    return np.where(on[..., None], colour, colour * rng.uniform(0.45, 0.75))


class SyntheticScenes(Dataset):
    """Deterministic procedural scenes for semantic and instance segmentation.

    Args:
        num_samples: Number of samples in the split.
        size: Image size as (height, width).
        num_classes: Number of classes, at least 2 (ground and sky); classes from 2 on are objects.
        seed: Base seed; together with the split and the index it fixes every sample.
        split: One of ``"train"``, ``"val"``, ``"test"``.
    """

    # Per-channel statistics of the images in [0, 1], measured on 1024 train samples of the default size.
    MEAN = (0.4311, 0.4527, 0.4020)
    STD = (0.1743, 0.1770, 0.2292)
    ignore_index = IGNORE_INDEX  # never produced; declared so every dataset names its ignore label

    def __init__(self, *, num_samples=256, size=(96, 128), num_classes=6, seed=0, split="train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (ground and sky), got {num_classes}")
        self.num_samples, self.size, self.num_classes = num_samples, tuple(size), num_classes
        self.seed, self.split = seed, split
        self.class_names = ["ground", "sky"] + [_object_style(c).name for c in range(2, num_classes)]
        self._yy, self._xx = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float32)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.sample(index)
        image = (sample["image"].astype(np.float32) / 255 - self.MEAN) / self.STD
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
        return image, torch.from_numpy(sample["mask"])

    def sample(self, index: int) -> dict:
        """Generate sample ``index`` with its instance annotations.

        Returns:
            A dict with ``image`` (H, W, 3) uint8, ``mask`` (H, W) int64 class ids, ``instances``
            (H, W) int32 instance ids (0 = none, 1..n in painting order), ``boxes`` (n, 4) float32
            as (x0, y0, x1, y1) with exclusive x1, y1, and ``labels`` (n,) int64 class ids.
        """
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        image = self._ground(rng)
        mask = self._paint_sky(rng, image)
        instances, labels = self._paint_objects(rng, image, mask)
        instances, labels = _visible_instances(instances, labels)
        image = self._light_and_noise(rng, image)
        return dict(image=image, mask=mask, instances=instances, boxes=_boxes(instances), labels=labels)

    def _ground(self, rng: np.random.Generator) -> np.ndarray:
        """Float image of blotchy ground, with 0-2 distractor patches in object colours (still class 0)."""
        yy, xx = self._yy, self._xx
        ground = _GROUND_COLOURS[rng.integers(len(_GROUND_COLOURS))] + rng.normal(0, 15, 3)
        image = _texture("noise", rng, ground, yy, xx).astype(np.float32)
        for _ in range(rng.integers(0, 3)):
            patch = _shape_mask("ellipse", rng, yy, xx, min(self.size) * rng.uniform(0.08, 0.2))
            colour = np.array(_object_style(int(rng.integers(2, max(self.num_classes, 3)))).colour)
            image[patch] = _texture("noise", rng, colour + rng.normal(0, 20, 3), yy[patch], xx[patch])
        return image

    def _paint_sky(self, rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
        """Paint a vertical-gradient sky above a wavy, tilted horizon; returns the class mask (0 / 1)."""
        (h, w), yy, x = self.size, self._yy, self._xx[0]
        phase, period = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.0) * w
        horizon = h * rng.uniform(0.2, 0.45) + h * rng.uniform(0, 0.06) * np.sin(2 * np.pi * x / period + phase)
        sky = yy < horizon + rng.uniform(-0.15, 0.15) * (x - w / 2)
        colour = _SKY_COLOURS[rng.integers(len(_SKY_COLOURS))] + rng.normal(0, 15, 3)
        image[sky] = colour * (0.8 + 0.4 * yy[sky] / h)[:, None]
        return sky.astype(np.int64)

    def _paint_objects(self, rng, image, mask) -> tuple[np.ndarray, list[int]]:
        """Paint 4-9 objects in order (later ones occlude earlier ones); returns ids and labels."""
        instances = np.zeros(self.size, dtype=np.int32)
        labels = []
        if self.num_classes <= 2:
            return instances, labels
        for k in range(1, rng.integers(4, 10) + 1):
            cls = int(rng.integers(2, self.num_classes))
            style = _object_style(cls)
            small = rng.random() < 0.3
            size = min(self.size) * (rng.uniform(0.03, 0.07) if small else rng.uniform(0.1, 0.25))
            region = _shape_mask(style.shape, rng, self._yy, self._xx, size)
            colour = np.array(style.colour) + rng.normal(0, style.spread, 3)
            image[region] = _texture(style.texture, rng, colour, self._yy[region], self._xx[region])
            mask[region], instances[region] = cls, k
            labels.append(cls)
        return instances, labels

    def _light_and_noise(self, rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
        """Per-image lighting (channel gains, bias, linear gradient) and gaussian noise, to uint8."""
        h, w = self.size
        gain = (rng.uniform(0.7, 1.3) * rng.uniform(0.9, 1.1, 3)).astype(np.float32)
        u, _ = _rotated(self._yy, self._xx, h / 2, w / 2, rng.uniform(0, 2 * np.pi))
        gradient = rng.uniform(0, 40) * u / (max(h, w) / 2)
        image = image * gain + rng.uniform(-25, 25) + gradient[..., None]
        image += rng.uniform(3, 10) * rng.standard_normal(image.shape, dtype=np.float32)
        return np.clip(image, 0, 255).astype(np.uint8)


def _visible_instances(instances: np.ndarray, labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Drop fully occluded instances and renumber the rest 1..n, keeping painting order."""
    visible = np.flatnonzero(np.bincount(instances.ravel(), minlength=len(labels) + 1)[1:]) + 1
    lut = np.zeros(len(labels) + 1, dtype=np.int32)
    lut[visible] = np.arange(1, len(visible) + 1, dtype=np.int32)
    return lut[instances], np.array(labels, dtype=np.int64)[visible - 1]


def _boxes(instances: np.ndarray) -> np.ndarray:
    """Tight (x0, y0, x1, y1) boxes, exclusive at x1 and y1, of instances 1..max."""
    boxes = np.zeros((int(instances.max()), 4), dtype=np.float32)
    for k in range(len(boxes)):
        ys, xs = np.nonzero(instances == k + 1)
        boxes[k] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes


class SyntheticInstances(CategoryList, Dataset):
    """The procedural scenes as instance segmentation: every object left visible is an instance of its class.

    Samples follow the instance contract of :mod:`segprune.data.instances`: ``(image, target)`` with boxes, labels
    0..K-1 (object class ``c`` of the scenes is label ``c - 2``; ground and sky are stuff, not instances), uint8
    masks, ``image_id`` (the sample index) and ``orig_size`` (the image size: nothing is resized). Like the scenes
    they are a function of (seed, split, index); in training the flips come from a generator seeded with ``seed``
    (see :class:`~segprune.data.instances.InstanceTransform`).

    Args:
        num_samples: Number of samples in the split.
        size: Image size as (height, width).
        num_classes: Number of object classes K (the scenes get K + 2 classes with ground and sky).
        seed: Base seed of the scenes and of the flips.
        split: One of ``"train"``, ``"val"``, ``"test"``.
        train: Mirror samples left-right with probability ``flip``.
        flip: Flip probability in training.
        cache: Keep every generated scene in memory (about 7 bytes a pixel), so that later epochs skip drawing it;
            flips are still drawn per epoch.
    """

    def __init__(self, *, num_samples=256, size=(96, 128), num_classes=4, seed=0, split="train", train=False,
                 flip=0.5, cache=False):
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1 object class, got {num_classes}")
        self.scenes = SyntheticScenes(num_samples=num_samples, size=size, num_classes=num_classes + 2, seed=seed,
                                      split=split)
        self.size, self.train = tuple(size), train
        self._cache: dict[int, dict] | None = {} if cache else None
        self.categories = [{"id": k + 1, "name": name} for k, name in enumerate(self.scenes.class_names[2:])]
        self.transform = InstanceTransform(None, flip=flip if train else 0.0, mean=SyntheticScenes.MEAN,
                                           std=SyntheticScenes.STD, seed=seed)

    @property
    def image_ids(self) -> list[int]:
        return list(range(len(self)))

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        sample = self._sample(index)
        image, masks = self.transform(sample["image"], _instance_masks(sample["instances"]))
        return image, make_target(masks, torch.from_numpy(sample["labels"] - 2), index, self.size)

    def _sample(self, index: int) -> dict:
        if self._cache is None:
            return self.scenes.sample(index)
        if index not in self._cache:
            self._cache[index] = self.scenes.sample(index)
        return self._cache[index]

    def coco_dict(self) -> dict:
        """Every sample's instances in COCO form (RLE masks, xywh boxes): the ground truth of evaluation."""
        encode, images, annotations = mask_api().encode, [], []
        for index in range(len(self)):
            sample = self._sample(index)
            images.append({"id": index, "file_name": f"{self.scenes.split}_{index}.png", "height": self.size[0],
                           "width": self.size[1]})
            for mask, box, cls in zip(_instance_masks(sample["instances"]), sample["boxes"], sample["labels"]):
                rle = encode(np.asfortranarray(mask))
                x0, y0, x1, y1 = map(float, box)
                annotations.append({"id": len(annotations) + 1, "image_id": index, "category_id": int(cls) - 1,
                                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                                    "area": float(mask.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
        return {"images": images, "categories": [dict(c) for c in self.categories], "annotations": annotations}


def _instance_masks(instances: np.ndarray) -> np.ndarray:
    """(n, H, W) uint8 masks of instance ids 1..n."""
    ids = np.arange(1, int(instances.max()) + 1, dtype=instances.dtype)
    return (instances[None] == ids[:, None, None]).astype(np.uint8)
