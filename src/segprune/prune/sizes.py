"""Sizes that know where they came from: the trace follows widths a forward pass computes from tensors' shapes.

Attention is often written `B, N, C = x.shape; q.reshape(B, N, self.num_heads, C // self.num_heads)`: the head size
comes from x's width, and the head count from an attribute of any name. A trace that sees only the literal ints
(16, 2, 32) cannot know that the pruned model will compute `C' // h'` from the pruned width; `verify` then catches
the crash and freezes the heads. So during a trace:

* `x.shape` / `x.size()` of a traced tensor return its channel dim as a :class:`Size` holding the channel
  elements it counts (`ids`, by position);
* every int attribute of every module is, for the trace's duration, a :class:`Size` naming it (`attrs`);
* `*` and exact `//` keep the record (`C // self.num_heads` is `len(ids) * 1 * num_heads ** -1`); every other
  arithmetic gives a plain int, so a size whose origin is not understood is a literal, as before.

The reshape rule (rules/shapes.py) reads the record: a head count held in an attribute is rewritten under that
attribute's name, and a dim sized from another tensor's width ties the two widths' counts (pruned together,
position by position), so the pruned model computes the size it needs. Why this and not replacing modules: it
covers code nobody registered, including the user's own, and needs no per-library knowledge.
"""

from __future__ import annotations

import contextlib
from fractions import Fraction

import numpy as np
from torch import nn


class Size(int):
    """An int equal to `len(ids) * scale * prod(attribute ** power)` (`ids` None: no tensor's width in it)."""

    def __new__(cls, value: int, ids: np.ndarray | None = None, scale: Fraction = Fraction(1),
                attrs: dict[tuple[str, str], int] | None = None):
        self = super().__new__(cls, value)
        self.ids, self.scale, self.attrs = ids, Fraction(scale), dict(attrs or {})
        self.derived = False  # computed by arithmetic (`h * w * self.num_anchors` is not the attribute, even at 1x1)
        return self

    def __reduce__(self):  # copies and pickles made during a trace are plain ints
        return int, (int(self),)

    def _times(self, other, power: int):
        """The record of `self * other ** power`, or None when it cannot be kept."""
        if isinstance(other, bool) or not isinstance(other, int):
            return None
        if not isinstance(other, Size):
            return Size(0, self.ids, self.scale * Fraction(int(other)) ** power, self.attrs)
        if other.ids is not None and (self.ids is not None or power < 0):
            return None
        attrs = dict(self.attrs)
        for key, p in other.attrs.items():
            attrs[key] = attrs.get(key, 0) + p * power
        ids = self.ids if self.ids is not None else other.ids
        return Size(0, ids, self.scale * other.scale ** power, {k: p for k, p in attrs.items() if p})

    def _with(self, value, record):
        if record is None or not isinstance(value, int):
            return value
        size = Size(value, record.ids, record.scale, record.attrs)
        size.derived = True
        return size

    def __mul__(self, other):
        return self._with(int(self) * _plain(other), self._times(other, 1))

    __rmul__ = __mul__

    def __floordiv__(self, other):
        value = int(self) // _plain(other)
        exact = isinstance(other, int) and other != 0 and int(self) % int(other) == 0
        return self._with(value, self._times(other, -1) if exact else None)

    @property
    def attribute(self) -> tuple[str, str] | None:
        """(module, attribute) when this is one module attribute's value, read as it is."""
        if not self.derived and self.ids is None and list(self.attrs.values()) == [1]:
            return next(iter(self.attrs))
        return None


def _plain(value):
    return int(value) if isinstance(value, Size) else value


def channel_size(value: int, ids: np.ndarray) -> Size:
    """The size of a traced tensor's channel dim, counting `ids` by position."""
    return Size(value, ids=ids)


@contextlib.contextmanager
def attribute_sizes(model: nn.Module):
    """For the block's duration every int attribute of every module of `model` is a Size naming it; afterwards
    each is put back, and a Size the forward stored in a module becomes a plain int."""
    saved = []
    for name, module in model.named_modules():
        for attr, value in list(vars(module).items()):
            if type(value) is int:
                tagged = Size(value, attrs={(name, attr): 1})
                module.__dict__[attr] = tagged
                saved.append((module, attr, value, tagged))
    try:
        yield
    finally:
        for module, attr, value, tagged in saved:
            if module.__dict__.get(attr) is tagged:
                module.__dict__[attr] = value
        for module in model.modules():
            for attr, value in list(vars(module).items()):
                if isinstance(value, Size):
                    module.__dict__[attr] = int(value)
