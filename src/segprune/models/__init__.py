"""Segmentation architectures built for channel pruning, and the registry that names them.

Every model maps an image batch (N, C, H, W) to ``{"out": logits (N, K, H, W)}``, plus ``"aux"`` in training mode
when it has auxiliary heads. Importing this package registers every entry point.

Capability flags, which tests branch on: ``use_aux`` (training mode returns ``"aux"``), ``exportable``, and
``needs_divisible_input``: H and W must be multiples of it, else ``forward`` raises ``ValueError`` naming the size
and the divisor (1 for models that take any size; U-Net needs 16, for its skip concatenations). Builders raise
``ValueError`` for ``num_classes < 1`` and for an unsupported ``output_stride``.
"""

from . import deeplabv3plus, icnet, pspnet, segformer, segnet, unet, yolact  # noqa: F401  (imported to register their entry points)
from .builders import library_model, rebuild_kwargs, register_builder
from .registry import create_model, list_models, register_model

__all__ = ["create_model", "library_model", "list_models", "rebuild_kwargs", "register_builder", "register_model"]
