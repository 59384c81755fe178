"""Semantic masks from COCO-format instance annotations (Lin et al., 2014), read with pycocotools.

Category ids, in increasing order, become the contiguous labels 1..K; 0 is background. Instances are painted
largest first, so where two overlap the smaller one, usually the one in front, keeps its pixels. Crowd
regions (``iscrowd: 1``) are painted last as 255 (ignored): they hold objects of a class that no instance
outlines, so neither background nor any one label is right there.

pycocotools is an optional dependency (``pip install segprune[coco]``), imported when a dataset is built.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np

from segprune.data.base import IGNORE_INDEX, SegmentationDataset, Transform, require_dir, require_files


def _coco_api():
    try:
        from pycocotools.coco import COCO
    except ImportError as error:
        raise ImportError("COCOSemantic needs pycocotools: pip install segprune[coco]") from error
    return COCO


class COCOSemantic(SegmentationDataset):
    """COCO instance annotations rendered as semantic masks, background plus one label per category.

    Args:
        root: Folder the images' ``file_name`` entries are relative to.
        ann_file: COCO instances JSON file.
        transform: Joint transform, see :class:`~segprune.data.base.SegmentationDataset`.
        check_sizes: Compare each image file's size with the ``width`` and ``height`` its annotation records;
            see :class:`~segprune.data.base.SegmentationDataset`.
    """

    def __init__(self, root, ann_file, *, transform: Transform | None = None, check_sizes: bool = True):
        super().__init__(transform=transform, check_sizes=check_sizes)
        coco_api = _coco_api()
        self.root, ann_file = require_dir(Path(root), "COCO image folder"), Path(ann_file)
        if not ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file {ann_file} not found")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its loading progress
            self.coco = coco_api(str(ann_file))
        category_ids = sorted(self.coco.getCatIds())
        if len(category_ids) >= IGNORE_INDEX:
            raise ValueError(f"{ann_file}: {len(category_ids)} categories, at most {IGNORE_INDEX - 1} fit beside 255")
        self.category_to_label = {c: label for label, c in enumerate(category_ids, start=1)}
        self.class_names = ("background", *(self.coco.cats[c]["name"] for c in category_ids))
        self.num_classes = len(self.class_names)
        self.samples = [(self.root / self.coco.imgs[i]["file_name"], i) for i in sorted(self.coco.getImgIds())]
        require_files([image for image, _ in self.samples], f"COCO images of {ann_file}")
        self._validate()

    def mask_size(self, index: int) -> tuple[int, int]:
        info = self.coco.imgs[self.samples[index][1]]
        return info["width"], info["height"]

    def load_mask(self, index: int) -> np.ndarray:
        image_id = self.samples[index][1]
        width, height = self.mask_size(index)
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
        things = [(self._region(a), a) for a in annotations if not a.get("iscrowd", 0)]
        crowds = [self._region(a) for a in annotations if a.get("iscrowd", 0)]
        mask = np.zeros((height, width), dtype=np.int64)
        for region, annotation in sorted(things, key=lambda pair: -int(pair[0].sum())):
            mask[region] = self.category_to_label[annotation["category_id"]]
        for region in crowds:
            mask[region] = IGNORE_INDEX
        return mask

    def _region(self, annotation: dict) -> np.ndarray:
        """Boolean mask of one annotation (polygons or RLE)."""
        with warnings.catch_warnings():  # pycocotools' RLE decoding trips a numpy 2 copy-keyword deprecation
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="pycocotools")
            return self.coco.annToMask(annotation).astype(bool)
