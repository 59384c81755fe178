"""Backbones: feature extractors publishing ``out_channels`` and returning a list of stage features.

Each backbone also publishes ``torchvision_keys()``, the map from its layers to torchvision's ImageNet checkpoint of
the same network, which ``load_backbone_weights`` uses to read such a checkpoint from a local file.
"""

from .mobilenetv2 import MobileNetV2, mobilenetv2
from .resnet import RESNET_CONFIGS, ResNet, resnet
from .vgg import VGG, vgg16_bn
from .weights import KeyMap, LoadReport, load_backbone_weights, translate_state_dict

__all__ = [
    "VGG",
    "KeyMap",
    "LoadReport",
    "MobileNetV2",
    "RESNET_CONFIGS",
    "ResNet",
    "load_backbone_weights",
    "mobilenetv2",
    "resnet",
    "translate_state_dict",
    "vgg16_bn",
]
