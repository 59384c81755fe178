"""What a deployed model computes: the eval-mode outputs a runtime must reproduce (exported, compiled, compared)."""

from __future__ import annotations

import torch
from torch import nn


class Outputs(nn.Module):
    """What is exported: ``model(x)[name]`` for each of ``model.export_outputs`` (default ``("out",)``), a tensor
    for one name, a tuple for several (or the output itself when the model returns a tensor)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.names = tuple(getattr(model, "export_outputs", ("out",)))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.model(x)
        if isinstance(out, dict):
            picked = tuple(out[name] for name in self.names)
            return picked[0] if len(picked) == 1 else picked
        if isinstance(out, (tuple, list)):
            return out[0]
        return out


def output_tensors(out) -> list[torch.Tensor]:
    """An output of :class:`Outputs` as a list of tensors."""
    return list(out) if isinstance(out, (tuple, list)) else [out]
