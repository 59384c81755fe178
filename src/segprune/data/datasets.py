"""Build a dataset by name: ``build_dataset("camvid", root=..., split="train")``."""

from __future__ import annotations

import functools

from torch.utils.data import Dataset

from segprune.data.camvid import CamVid
from segprune.data.cityscapes import Cityscapes
from segprune.data.coco import COCOSemantic
from segprune.data.folder import HumanFolder, MaskFolder
from segprune.data.synthetic import SyntheticScenes
from segprune.data.voc import VOC

DATASETS = {
    "camvid": CamVid,
    "cityscapes": Cityscapes,
    "voc": VOC,
    "coco": COCOSemantic,
    "folder": MaskFolder,
    "human": functools.partial(HumanFolder, strict=True),  # binary masks, 0 and 255 only
    "human_matte": HumanFolder,  # person where the mask's grey level is above 127
    "synthetic": SyntheticScenes,
}


def build_dataset(name: str, **kwargs) -> Dataset:
    """The dataset called ``name`` (a key of ``DATASETS``), built with ``kwargs``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](**kwargs)
