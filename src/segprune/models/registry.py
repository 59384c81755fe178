"""Model registry: entry points register under their function name, as in timm and torchvision."""

import difflib
import fnmatch
from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a keyword-only model builder under ``fn.__name__``.

    Raises:
        ValueError: if the name is taken; a silent override would make ``create_model`` depend on import order.
    """
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered by {_MODELS[name].__module__}")
    _MODELS[name] = fn
    return fn


def create_model(name: str, *, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: an entry point name, e.g. "pspnet_resnet50" (see ``list_models``).
        num_classes: number of output classes.
        **kwargs: the builder's keyword arguments (``in_channels``, ``width``, ``output_stride``, ...).

    Raises:
        ValueError: for an unknown name, listing the registered names closest to it.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; did you mean one of {_close_names(name)}?")
    return _MODELS[name](num_classes=num_classes, **kwargs)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching a shell-style ``pattern`` (e.g. "pspnet_*")."""
    return sorted(name for name in _MODELS if fnmatch.fnmatchcase(name, pattern))


def _close_names(name: str) -> list[str]:
    close = difflib.get_close_matches(name, _MODELS, n=5, cutoff=0.5)
    close += [n for n in sorted(_MODELS) if name.lower() in n and n not in close]
    return close or sorted(_MODELS)
