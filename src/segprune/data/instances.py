"""COCO-format instance segmentation (Lin et al., 2014): per-image instance targets for YOLACT and friends.

A sample is ``(image, target)``: the image a normalised float32 (3, H, W) tensor, the target a dict

- ``"boxes"``: float32 (M, 4), (x0, y0, x1, y1) in pixels of the transformed image, the tight box of the mask
  with x1, y1 exclusive (a one-pixel mask at column 5 spans 5..6), so a box always equals its mask's box;
- ``"labels"``: int64 (M,), contiguous labels 0..K-1, the index of the category in ``dataset.categories``
  (category ids in increasing order; there is no background label);
- ``"masks"``: uint8 (M, H, W) of 0 / 1;
- ``"image_id"``: the COCO image id; ``"orig_size"``: (h, w) of the annotation frame (the image's
  ``height`` and ``width`` entries), where evaluation maps predictions back to.

M may be 0. A batch (see :func:`instance_collate`) is a stacked image tensor and a list of targets.

Bad input is counted and reported, never a crash deep inside training. The annotation file is checked once at
construction; each finding goes to ``dataset.problems`` (kind -> list of messages naming the image or
annotation id) and one summary warning is issued:

- an image whose file is missing is dropped, with its id and file named (``missing_image_file``), and so is
  one whose file is no image PIL can open (``unreadable_image``; only the header is read, with ``check_images``);
- an annotation whose ``image_id`` is not among the images (``unknown_image``) or whose ``category_id`` is not
  among the categories (``unknown_category``) is skipped;
- an annotation whose box is degenerate (width or height at most 1 pixel, from its ``bbox`` or else from its
  segmentation; ``degenerate_box``), whose polygons are all degenerate (fewer than 3 points or zero area;
  ``degenerate_polygon``; a polygon part with fewer than 3 points is dropped from an otherwise good annotation),
  or whose segmentation is missing, malformed or an RLE of another size than its image (``bad_segmentation``)
  is skipped, and so is an entry that is not an annotation at all (not a mapping, ids that are no numbers,
  a non-numeric box or polygon: ``malformed_annotation``);
- an image left without instances is kept as a negative (``empty_image``), the usual COCO practice.

Crowd regions (``iscrowd: 1``) are not targets: they outline many objects at once, so they are neither an
instance nor background. They are counted (``crowd``, for information, not a problem) and kept for evaluation,
where ``COCOeval`` ignores the detections that fall on them (:meth:`CocoInstances.coco_dict`). In training the
anchors over a crowd region count as background (YOLACT instead leaves them out of the confidence loss; this is
the one deviation).

After resizing a small instance can vanish (no pixel left); it is dropped from that sample only.

pycocotools is an optional dependency (``pip install segprune[coco]``), imported when a dataset is built.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from segprune.data.base import IMAGENET_MEAN, IMAGENET_STD, read_rgb, require_dir
from segprune.data.loader import make_loader

# What happens to the image or annotation behind each kind of finding.
PROBLEM_ACTIONS = {
    "missing_image_file": "image dropped",
    "unreadable_image": "image dropped",
    "unknown_image": "annotation skipped",
    "unknown_category": "annotation skipped",
    "degenerate_box": "annotation skipped",
    "degenerate_polygon": "annotation skipped",
    "bad_segmentation": "annotation skipped",
    "malformed_annotation": "annotation skipped",
    "empty_image": "image kept as a negative",
    "crowd": "not a target; kept for evaluation",
}
INFORMATIONAL = ("crowd",)  # counted and listed, but not a problem


def mask_api():
    """``pycocotools.mask``, or an ImportError naming the extra that installs it."""
    try:
        from pycocotools import mask
    except ImportError as error:
        raise ImportError("COCO instances need pycocotools: pip install segprune[coco]") from error
    return mask


@dataclass
class Problems:
    """Findings about a dataset's annotations, by kind (see :data:`PROBLEM_ACTIONS`), each naming an id."""

    source: str
    entries: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, message: str) -> None:
        if kind not in PROBLEM_ACTIONS:
            raise ValueError(f"unknown problem kind {kind!r}")
        self.entries.setdefault(kind, []).append(message)

    def count(self, kind: str) -> int:
        return len(self.entries.get(kind, []))

    def counts(self) -> dict[str, int]:
        return {kind: len(messages) for kind, messages in self.entries.items()}

    def __len__(self) -> int:
        """Number of findings that are problems (crowd regions are not)."""
        return sum(n for kind, n in self.counts().items() if kind not in INFORMATIONAL)

    def summary(self) -> str:
        """One line: the count of every kind with what was done about it."""
        parts = [f"{n} {kind.replace('_', ' ')} ({PROBLEM_ACTIONS[kind]})" for kind, n in self.counts().items()]
        return f"{self.source}: " + (", ".join(parts) if parts else "no problems")

    def lines(self) -> list[str]:
        """Every finding, one line each, prefixed by its kind."""
        return [f"{kind}: {message}" for kind, messages in self.entries.items() for message in messages]


# Geometry of one annotation


def _polygon_area(coords: Sequence[float]) -> float:
    """Absolute shoelace area of a flat [x0, y0, x1, y1, ...] polygon."""
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _good_polygons(segmentation: list) -> list[list[float]]:
    """Polygon parts with at least 3 points, an even number of coordinates and non-zero area."""
    good = []
    for part in segmentation:
        if isinstance(part, list) and len(part) >= 6 and len(part) % 2 == 0 and _polygon_area(part) > 0:
            good.append([float(v) for v in part])
    return good


def to_rle(segmentation, height: int, width: int) -> dict:
    """A compressed RLE of polygons, an uncompressed RLE or a compressed one, at (height, width)."""
    api = mask_api()
    if isinstance(segmentation, list):  # parts with < 3 points must be gone: pycocotools reads 4 numbers as a box
        return api.merge(api.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return api.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {"size": list(segmentation["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}


def decode(segmentation, height: int, width: int) -> np.ndarray:
    """(height, width) uint8 mask of a segmentation (polygons or RLE)."""
    with warnings.catch_warnings():  # pycocotools' RLE decoding trips a numpy 2 copy-keyword deprecation
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="pycocotools")
        return np.ascontiguousarray(mask_api().decode(to_rle(segmentation, height, width)), dtype=np.uint8)


def _check_segmentation(ann: dict, height: int, width: int) -> tuple[str | None, object]:
    """(problem kind or None, the cleaned segmentation) of a non-crowd annotation."""
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        polygons = _good_polygons(seg)
        return ("degenerate_polygon", None) if not polygons else (None, polygons)
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        return "bad_segmentation", None
    if [int(v) for v in seg["size"]] != [height, width]:
        return "bad_segmentation", None
    try:
        area = float(mask_api().area(to_rle(seg, height, width)))
    except Exception:  # noqa: BLE001 - pycocotools raises assorted types on malformed counts
        return "bad_segmentation", None
    return ("degenerate_polygon", None) if area <= 0 else (None, seg)


def _annotation_box(ann: dict, segmentation) -> tuple[float, float]:
    """(width, height) of an annotation's box: its ``bbox`` entry, else the extent of its segmentation."""
    bbox = ann.get("bbox")
    if isinstance(bbox, (list, tuple)) and len(bbox) == 4:
        _, _, w, h = (float(v) for v in bbox)  # a ValueError or TypeError on a non-number: malformed
        return w, h
    if isinstance(segmentation, list):
        xy = np.concatenate([np.asarray(p).reshape(-1, 2) for p in segmentation])
        return float(np.ptp(xy[:, 0])), float(np.ptp(xy[:, 1]))
    h, w = segmentation["size"]
    box = mask_api().toBbox(to_rle(segmentation, int(h), int(w)))
    return float(box[2]), float(box[3])


# Targets and transforms


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight (x0, y0, x1, y1) float32 boxes, exclusive at x1 and y1, of non-empty (M, H, W) masks."""
    if len(masks) == 0:
        return torch.zeros(0, 4, dtype=torch.float32)
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # (M, W), (M, H)
    first = lambda a: a.to(torch.uint8).argmax(dim=1)
    last = lambda a: a.shape[1] - a.flip(1).to(torch.uint8).argmax(dim=1)
    return torch.stack([first(cols), first(rows), last(cols), last(rows)], dim=1).to(torch.float32)


def make_target(masks: torch.Tensor, labels: torch.Tensor, image_id: int, orig_size: tuple[int, int]) -> dict:
    """The target dict of one image; instances whose mask is empty are dropped."""
    keep = masks.flatten(1).any(dim=1).bool() if len(masks) else torch.zeros(0, dtype=torch.bool)
    masks, labels = masks[keep].to(torch.uint8), labels[keep].to(torch.int64)
    return {"boxes": mask_boxes(masks), "labels": labels, "masks": masks, "image_id": int(image_id),
            "orig_size": (int(orig_size[0]), int(orig_size[1]))}


class InstanceTransform:
    """Resize image and masks to ``size`` (H, W), mirror both with probability ``flip``, normalise the image.

    The image is resampled bilinearly (PIL) and the masks with nearest neighbour at pixel centres, which is
    what PIL's nearest does too. Called as ``transform(image, masks)`` with an (h, w, 3) uint8 array and
    (M, h, w) uint8 masks; returns a float32 (3, H, W) tensor and (M, H, W) uint8 masks. ``size`` None keeps
    the input size.

    Randomness follows :mod:`segprune.data.transforms`: the flip draws from ``generator`` (seeded with ``seed``)
    or torch's global generator, and :meth:`reseed` restarts it (the seeded loader's workers call it).
    """

    def __init__(self, size=None, *, flip: float = 0.0, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=None):
        self.size = None if size is None else ((size, size) if isinstance(size, int) else tuple(map(int, size)))
        self.flip = flip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator = (self.generator or torch.Generator()).manual_seed(seed)

    def generators(self) -> list[torch.Generator]:
        """The flip's generator, if seeded (training checkpoints save and restore its state)."""
        return [] if self.generator is None else [self.generator]

    def __call__(self, image: np.ndarray, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        masks = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8))
        if self.size is not None and tuple(image.shape[:2]) != self.size:
            image = np.asarray(Image.fromarray(image).resize(self.size[::-1], Image.Resampling.BILINEAR))
            masks = F.interpolate(masks[None], size=self.size, mode="nearest-exact")[0] if len(masks) else \
                masks.new_zeros(0, *self.size)
        tensor = torch.from_numpy(np.array(image, dtype=np.float32).transpose(2, 0, 1)).div_(255)
        if self.flip and float(torch.rand((), generator=self.generator)) < self.flip:
            tensor, masks = tensor.flip(-1), masks.flip(-1)
        return (tensor - self.mean) / self.std, masks


# The dataset


class CategoryList:
    """`num_classes` and `class_names` of an instance dataset with a COCO-style `categories` list."""

    categories: list[dict]

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]


class CocoInstances(CategoryList, Dataset):
    """COCO-format instance annotations as ``(image, target)`` samples (see the module docstring).

    Args:
        root: Folder the images' ``file_name`` entries are relative to.
        annotation_json: COCO instances JSON file.
        size: Output size (H, W) or a square side; None keeps each image's annotated size (batches then need
            equal sizes).
        train: Mirror samples left-right with probability ``flip``.
        flip: Flip probability in training.
        seed: Seed of the flips (see :class:`InstanceTransform`).
        mean: Normalisation mean (ImageNet's, like the semantic datasets).
        std: Normalisation std.
        transform: Replaces the default transform: ``transform(image, masks)`` as :class:`InstanceTransform`.
        check_images: Open every image's header at construction and drop those that are no image (a header read
            each, no decoding), rather than fail when training reaches them.

    Attributes:
        categories: The category dicts (``id``, ``name``) in label order (category ids ascending).
        images: The image dicts (``id``, ``file_name``, ``height``, ``width``) kept, in sample order.
        problems: :class:`Problems` found in the annotation file.
    """

    def __init__(self, root, annotation_json, *, size=(550, 550), train: bool = False, flip: float = 0.5,
                 seed: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD, transform=None,
                 check_images: bool = True):
        mask_api()  # fail at construction, naming the extra, when pycocotools is absent
        self.root = require_dir(Path(root), "COCO image folder")
        self.annotation_json, self.train, self.check_images = Path(annotation_json), train, check_images
        self.transform = transform or InstanceTransform(size, flip=flip if train else 0.0, mean=mean, std=std,
                                                        seed=seed)
        data = self._read_json()
        self.categories = sorted(({"id": int(c["id"]), "name": str(c.get("name", c["id"]))}
                                  for c in data["categories"]), key=lambda c: c["id"])
        self.category_to_label = {c["id"]: label for label, c in enumerate(self.categories)}
        self.problems = Problems(str(self.annotation_json))
        self.images, self.annotations, self.crowds = self._index(data)
        if len(self.problems):
            warnings.warn(f"CocoInstances {self.problems.summary()}; details in dataset.problems", stacklevel=2)

    @property
    def image_ids(self) -> list[int]:
        return [info["id"] for info in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        info = self.images[index]
        height, width = info["height"], info["width"]
        image = read_rgb(self.root / info["file_name"])
        if image.size != (width, height):  # annotations live in the recorded frame; bring the image into it
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        anns = self.annotations[info["id"]]
        masks = np.stack([decode(a["segmentation"], height, width) for a in anns]) if anns else \
            np.zeros((0, height, width), dtype=np.uint8)
        tensor, masks = self.transform(np.asarray(image), masks)
        labels = torch.tensor([self.category_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        return tensor, make_target(masks, labels, info["id"], (height, width))

    def coco_dict(self) -> dict:
        """The kept images and annotations (crowd regions included) in COCO form, the ground truth of evaluation.

        Annotations are renumbered 1..N (COCOeval takes an id of 0 for "unmatched") and get the ``bbox``,
        ``area`` and ``iscrowd`` entries COCOeval reads where the file left them out.
        """
        anns = []
        for info in self.images:
            for ann in self.annotations[info["id"]] + self.crowds[info["id"]]:
                anns.append(_complete(ann, info, len(anns) + 1))
        return {"images": [dict(info) for info in self.images], "categories": [dict(c) for c in self.categories],
                "annotations": anns}

    def _read_json(self) -> dict:
        if not self.annotation_json.is_file():
            raise FileNotFoundError(f"COCO annotation file {self.annotation_json} not found")
        try:
            data = json.loads(self.annotation_json.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{self.annotation_json}: not a JSON file ({error})") from error
        missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)] \
            if isinstance(data, dict) else ["images", "annotations", "categories"]
        if missing:
            raise ValueError(f"{self.annotation_json}: not a COCO instances file (no list {', '.join(missing)})")
        if not data["categories"]:
            raise ValueError(f"{self.annotation_json}: the category list is empty")
        return data

    def _index(self, data: dict) -> tuple[list[dict], dict[int, list[dict]], dict[int, list[dict]]]:
        """Kept images (sorted by id), their valid annotations and their crowd regions, reporting the rest."""
        images = {}
        for info in data["images"]:
            image = self._image_entry(info)
            if not (self.root / image["file_name"]).is_file():
                self.problems.add("missing_image_file", f"image {image['id']}: {self.root / image['file_name']}")
                continue
            if self.check_images and not _readable(self.root / image["file_name"]):
                self.problems.add("unreadable_image", f"image {image['id']}: {self.root / image['file_name']}")
                continue
            images[image["id"]] = image
        listed = {int(info["id"]) for info in data["images"]}  # every entry passed _image_entry
        annotations = {i: [] for i in images}
        crowds = {i: [] for i in images}
        for ann in data["annotations"]:
            try:
                kept = self._check_annotation(ann, images, listed)
            except (TypeError, ValueError, KeyError, AttributeError) as error:
                where = f"annotation {ann.get('id')}" if isinstance(ann, dict) else f"entry {str(ann)[:40]!r}"
                self.problems.add("malformed_annotation", f"{where}: {type(error).__name__}: {error}")
                continue
            if kept is not None:
                (crowds if kept.get("iscrowd", 0) else annotations)[kept["image_id"]].append(kept)
        for i in sorted(images):
            if not annotations[i]:
                self.problems.add("empty_image", f"image {i}: {images[i]['file_name']}")
        return [images[i] for i in sorted(images)], annotations, crowds

    def _image_entry(self, info) -> dict:
        """The fields of an image entry the dataset uses; a ValueError naming the entry when they are not there."""
        try:
            return {"id": int(info["id"]), "file_name": str(info["file_name"]), "height": int(info["height"]),
                    "width": int(info["width"])}
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"{self.annotation_json}: image entry {str(info)[:80]} needs an integer id, height and "
                             f"width and a file_name ({type(error).__name__}: {error})") from error

    def _check_annotation(self, ann: dict, images: dict, listed: set) -> dict | None:
        """The cleaned annotation, or None after reporting why it is skipped."""
        ann_id, image_id = ann.get("id"), ann.get("image_id")
        if image_id not in images:
            if image_id not in listed:  # annotations of a dropped image are covered by its own report line
                self.problems.add("unknown_image", f"annotation {ann_id}: image_id {image_id} is not listed")
            return None
        if ann.get("category_id") not in self.category_to_label:
            self.problems.add("unknown_category", f"annotation {ann_id} (image {image_id}): category_id "
                                                  f"{ann.get('category_id')} is not in the category list")
            return None
        info = images[image_id]
        kind, segmentation = _check_segmentation(ann, info["height"], info["width"])
        if ann.get("iscrowd", 0):
            self.problems.add(kind or "crowd", f"annotation {ann_id} (image {image_id})" + (" (crowd)" if kind else ""))
            return None if kind else {**ann, "segmentation": segmentation}
        if kind is None:
            w, h = _annotation_box(ann, segmentation)
            kind = None if w > 1 and h > 1 else "degenerate_box"  # NaN sides are degenerate too
        if kind is not None:
            self.problems.add(kind, f"annotation {ann_id} (image {image_id})")
            return None
        return {**ann, "segmentation": segmentation}


def _complete(ann: dict, info: dict, new_id: int) -> dict:
    """A copy of ``ann`` with id ``new_id`` and its ``bbox``, ``area`` and ``iscrowd`` filled in when absent."""
    out = {**ann, "id": new_id, "iscrowd": int(ann.get("iscrowd", 0))}
    if not isinstance(out.get("bbox"), (list, tuple)) or len(out["bbox"]) != 4 or "area" not in out:
        rle = to_rle(ann["segmentation"], info["height"], info["width"])
        out.setdefault("area", float(mask_api().area(rle)))
        if not isinstance(out.get("bbox"), (list, tuple)) or len(out["bbox"]) != 4:
            out["bbox"] = mask_api().toBbox(rle).tolist()
    return out


def _readable(path: Path) -> bool:
    """Whether PIL recognises ``path`` as an image (its header only)."""
    try:
        with Image.open(path):
            return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


# Batching


def instance_collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """Stack the images of a batch and keep the targets as a list; images must share one size."""
    images, targets = zip(*batch)
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) > 1:
        raise ValueError(f"images of one batch differ in size {sorted(sizes)}: give the dataset a fixed size")
    return torch.stack(images), list(targets)


def make_instance_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, **kwargs) -> DataLoader:
    """A seeded loader (:func:`segprune.data.loader.make_loader`) of (images, list of targets) batches."""
    return make_loader(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed, collate_fn=instance_collate,
                       **kwargs)


# Building from a --data spec, and checking


# Findings that lose data: `segprune check` fails on them (empty images and crowd regions are normal).
DATA_LOSS = tuple(kind for kind in PROBLEM_ACTIONS if kind not in ("empty_image", "crowd"))


def check_instances(dataset: Dataset) -> list[str]:
    """Read every sample; one message per image that fails, naming its id and file where known."""
    bad = []
    images = getattr(dataset, "images", None)
    for index in range(len(dataset)):
        try:
            image, target = dataset[index]
            if image.shape[-2:] != target["masks"].shape[-2:]:
                raise ValueError(f"image {tuple(image.shape[-2:])} and masks {tuple(target['masks'].shape)} differ")
        except Exception as error:  # noqa: BLE001 - every failure is a finding to report, whatever its type
            where = f"image {images[index]['id']} ({images[index]['file_name']})" if images else f"sample {index}"
            bad.append(f"{where}: {error}")
    return bad
