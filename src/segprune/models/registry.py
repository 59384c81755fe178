"""Model registry: entry points register under their function name, as in timm and torchvision."""

import difflib
import fnmatch
from collections.abc import Callable

from torch import nn

from . import builders

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
        name: an entry point name, e.g. "pspnet_resnet50" (see ``list_models``), or another library's model as
            ``"<builder>:<name>"``, e.g. "smp:Segformer" (see :mod:`segprune.models.builders`).
        num_classes: number of output classes.
        **kwargs: the builder's keyword arguments (``in_channels``, ``width``, ``output_stride``, ...).

    Raises:
        ValueError: for an unknown name, listing the registered names closest to it.
    """
    if builders.is_spec(name):
        return builders.build(name, num_classes=num_classes, **kwargs)
    if name not in _MODELS:
        close = _close_names(name)
        hint = f"did you mean one of {close}?" if close else f"the registered models are {sorted(_MODELS)}"
        raise ValueError(f"unknown model {name!r}; {hint}")
    return _MODELS[name](num_classes=num_classes, **kwargs)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching a shell-style ``pattern`` (e.g. "pspnet_*")."""
    return sorted(name for name in _MODELS if fnmatch.fnmatchcase(name, pattern))


def _close_names(name: str) -> list[str]:
    """Registered names spelled like ``name``, or containing it, or whose architecture it names ("psp_net")."""
    key = _squash(name)
    hits = [n for n in _MODELS if key and (key in _squash(n) or _squash(n.split("_")[0]) in key)]
    hits.sort(key=lambda n: difflib.SequenceMatcher(None, key, _squash(n)).ratio(), reverse=True)
    near = [n for n in difflib.get_close_matches(name, _MODELS, n=5, cutoff=0.5) if n not in hits]
    return (hits + near)[:8]


def _squash(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())
