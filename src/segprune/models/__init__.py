"""Segmentation architectures built for channel pruning, and the registry that names them.

Every model maps an image batch (N, C, H, W) to ``{"out": logits (N, K, H, W)}``, plus ``"aux"`` in training mode
when it has auxiliary heads. Importing this package registers every entry point.
"""

from . import deeplabv3plus, icnet, pspnet, segnet, unet  # noqa: F401  (imported to register their entry points)
from .registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
