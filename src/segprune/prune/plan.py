"""The plan: the record of what was cut, replayable onto a freshly built model.

For every pruned module (qualified name) it keeps the layer type, the original widths and the kept
output- and input-channel indices in the original numbering. Replaying it calls the same surgery
that pruning used, so `build -> plan.apply -> load weights` rebuilds a pruned model without pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segprune.prune.graph import ChannelGroup
from segprune.prune.surgery import surgery_for

FORMAT = "segprune.plan/1"
_WIDTH_ATTRS = {"out": ("out_channels", "out_features", "num_features", "num_channels", "num_parameters"),
                "in": ("in_channels", "in_features")}


def width(module: nn.Module, role: str) -> int | None:
    """A module's current width on one side, read from the module (never cached)."""
    for attr in _WIDTH_ATTRS[role]:
        if hasattr(module, attr):
            return int(getattr(module, attr))
    return None


@dataclass
class Plan:
    """`modules[name] = {"type", "out", "out_size", "in", "in_size"}` (kept indices, original widths)."""

    modules: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_removal(cls, model: nn.Module, groups: list[ChannelGroup], removed: dict[int, np.ndarray]) -> Plan:
        """The plan that removes channels `removed[group.id]` of each group."""
        plan = cls()
        for group in groups:
            drop = removed.get(group.id)
            if drop is None or len(drop) == 0:
                continue
            for m in group.members:
                module = model.get_submodule(m.module)
                entry = plan.modules.setdefault(m.module, {"type": type(module).__name__})
                entry[m.role] = np.flatnonzero(~np.isin(m.index, drop)).tolist()
                entry[f"{m.role}_size"] = len(m.index)
        return plan

    def apply(self, model: nn.Module) -> nn.Module:
        """Cut `model` in place as recorded; raises ValueError naming the layer if the model does not fit."""
        for name, entry in self.modules.items():
            module = _checked_module(model, name, entry)
            keep = {role: torch.as_tensor(entry[role], dtype=torch.long) for role in ("out", "in") if role in entry}
            surgery_for(module)(module, out=keep.get("out"), in_=keep.get("in"))
        return model

    def then(self, later: Plan) -> Plan:
        """One plan doing `self`, then `later` (whose indices number the channels `self` kept)."""
        merged = {name: dict(entry) for name, entry in self.modules.items()}
        for name, entry in later.modules.items():
            first = merged.setdefault(name, {"type": entry["type"]})
            for role in ("out", "in"):
                if role not in entry:
                    continue
                if role in first:
                    first[role] = [first[role][i] for i in entry[role]]
                else:
                    first[role], first[f"{role}_size"] = list(entry[role]), entry[f"{role}_size"]
        return Plan(merged)

    def to_json(self) -> str:
        # one layer per line: readable in a diff, and still plain JSON
        lines = [f"  {json.dumps(name)}: {json.dumps(entry)}" for name, entry in self.modules.items()]
        body = ",\n".join(lines)
        return f'{{"format": "{FORMAT}", "modules": {{\n{body}\n}}}}\n'


    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a segprune plan (expected format {FORMAT!r})")
        return cls(modules=data["modules"])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)  # atomic: a crash never leaves half a plan

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            return cls.from_json(Path(path).read_text())
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{path}: corrupt plan ({err})") from err


def _checked_module(model: nn.Module, name: str, entry: dict) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"plan names layer {name!r}, which this model does not have") from err
    if type(module).__name__ != entry["type"] or surgery_for(module) is None:
        raise ValueError(f"plan expects {name!r} to be a {entry['type']}, the model has {type(module).__name__}")
    for role in ("out", "in"):
        if role in entry and width(module, role) != entry[f"{role}_size"]:
            raise ValueError(f"plan expects {name!r} to have {entry[f'{role}_size']} {role}put channels, "
                             f"the model has {width(module, role)}")
    return module
