"""Segmentation datasets, joint transforms and seeded loaders."""

from segprune.data.base import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, SegmentationDataset
from segprune.data.camvid import CamVid
from segprune.data.cityscapes import Cityscapes
from segprune.data.coco import COCOSemantic
from segprune.data.datasets import DATASETS, build_dataset
from segprune.data.folder import HumanFolder, MaskFolder
from segprune.data.instances import CocoInstances, instance_collate, make_instance_loader
from segprune.data.loader import make_loader
from segprune.data.synthetic import SyntheticInstances, SyntheticScenes
from segprune.data.transforms import eval_transforms, train_transforms
from segprune.data.voc import VOC
from segprune.data.weights import median_frequency_weights

__all__ = [
    "CamVid", "COCOSemantic", "Cityscapes", "CocoInstances", "DATASETS", "HumanFolder", "IGNORE_INDEX",
    "IMAGENET_MEAN", "IMAGENET_STD", "MaskFolder", "SegmentationDataset", "SyntheticInstances", "SyntheticScenes",
    "VOC", "build_dataset", "eval_transforms", "instance_collate", "make_instance_loader", "make_loader",
    "median_frequency_weights", "train_transforms",
]  # fmt: skip
