"""One op recorder for every trace of a forward pass: the engine's channel trace, block finding, Conv+BN fusion.

Each runs the model under a ``TorchFunctionMode`` and wants, for every torch function called, the function, its
arguments and its output; some also want to know which module call each op ran in. :class:`OpRecorder` is that
mode (an op is seen once: the calls it makes inside run with the mode off) and :func:`module_calls` the module
hooks; a trace subclasses the first and says what it keeps in :meth:`OpRecorder.record`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from torch import nn
from torch.overrides import TorchFunctionMode


class OpRecorder(TorchFunctionMode):
    """Runs each torch function (:meth:`call`), then hands it to :meth:`record`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs = self.prepare(func, args, kwargs or {})
        out = self.call(func, args, kwargs)
        self.record(func, args, kwargs, out)
        return out

    def prepare(self, func, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The arguments the op runs with (a trace may change them, e.g. to update no statistics)."""
        return args, kwargs

    def call(self, func, args: tuple, kwargs: dict):
        """Compute the op (a trace may compute less: shapes only, or without side effects)."""
        return func(*args, **kwargs)

    def record(self, func, args: tuple, kwargs: dict, out) -> None:
        """Keep what the trace needs of one op."""
        raise NotImplementedError


@contextlib.contextmanager
def module_calls(model: nn.Module, enter: Callable, leave: Callable, *, kinds: tuple[type, ...] = (nn.Module,)):
    """Call ``enter(name, module, args)`` before and ``leave(name, module, args, output)`` after every call of a
    submodule of ``model`` that is one of ``kinds``, for the duration of the block. A module registered under
    several names is reported under the last."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    handles = []
    try:
        for module in model.modules():
            if isinstance(module, kinds):
                name = names[id(module)]
                handles.append(module.register_forward_pre_hook(lambda m, a, name=name: enter(name, m, a)))
                handles.append(module.register_forward_hook(lambda m, a, o, name=name: leave(name, m, a, o)))
        yield
    finally:
        for handle in handles:
            handle.remove()
