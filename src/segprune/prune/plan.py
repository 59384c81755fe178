"""The plan: the record of what was cut, replayable onto a freshly built model.

For every pruned module (qualified name) it keeps the layer type, the original widths and the kept
output- and input-channel indices in the original numbering. Replaying it calls the same surgery
that pruning used, so `build -> plan.apply -> load weights` rebuilds a pruned model without pickle.

A second kind of step, `bypass`, records whole residual blocks replaced by what remains of them when their
branch is gone (`segprune.prune.blocks`): the identity, the block's final activation, or zeros in place of a
branch module. Bypasses replay before channel cuts (a later plan's channel cuts number a bypassed model's
layers; an earlier plan's cuts inside a block that is later bypassed are dropped, since the block is gone). A plan
without bypasses is written exactly as before (format `segprune.plan/1`); one with bypasses is written as
`segprune.plan/2`, so that an older reader refuses it instead of silently skipping them. Both are read.

A third, `replace`, records modules swapped for an equivalent prunable one before pruning (replace.py:
`nn.MultiheadAttention`); they replay first of all. A plan with replacements is `segprune.plan/3`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segprune.prune.graph import ChannelGroup
from segprune.prune.replace import replace_module
from segprune.prune.surgery import surgery_for

FORMAT = "segprune.plan/1"
FORMAT_BYPASS = "segprune.plan/2"
FORMAT_REPLACE = "segprune.plan/3"
_WIDTH_ATTRS = {"out": ("out_channels", "out_features", "num_features", "num_channels", "num_parameters",
                        "normalized_shape"),
                "in": ("in_channels", "in_features")}


def width(module: nn.Module, role: str) -> int | None:
    """A module's current width on one side, read from the module (never cached)."""
    for attr in _WIDTH_ATTRS[role]:
        if hasattr(module, attr):
            value = getattr(module, attr)
            return int(value[-1] if isinstance(value, (tuple, list)) else value)
    return None


@dataclass
class Plan:
    """`modules[name] = {"type", "out", "out_size", "in", "in_size"}` (kept indices, original widths);
    `bypass[name] = {"type", "with"}`: block `name` (of that type) is replaced, before any channel cut, by
    "identity", "zero" (a module returning zeros like its input) or an activation `{"act", "kwargs"}`;
    `replace[name] = key`: module `name` is swapped for registered replacement `key` (replace.py) before both."""

    modules: dict[str, dict] = field(default_factory=dict)
    bypass: dict[str, dict] = field(default_factory=dict)
    replace: dict[str, str] = field(default_factory=dict)

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
        for name, key in self.replace.items():
            replace_module(model, name, key)
        for name, entry in self.bypass.items():
            _bypass(model, name, entry)
        for name, entry in self.modules.items():
            module = _checked_module(model, name, entry)
            if entry.get("bias") and module.bias is None:  # a constant was folded into it (fold.py)
                module.bias = nn.Parameter(torch.zeros(width(module, "out"), dtype=module.weight.dtype,
                                                       device=module.weight.device))
            keep = {role: torch.as_tensor(entry[role], dtype=torch.long) for role in _roles(entry)}
            if "out" in keep or "in" in keep:
                surgery_for(module)(module, out=keep.get("out"), in_=keep.get("in"))
            for role in keep.keys() - {"out", "in"}:  # a raw per-channel parameter (layer scale), split sizes
                kind, _, attr = role.partition(":")
                cut = _keep_parameter if kind == "param" else _keep_sizes
                cut(module, attr, keep[role], entry[f"{role}_size"])
        return model

    def then(self, later: Plan) -> Plan:
        """One plan doing `self`, then `later` (whose indices number the channels `self` kept)."""
        bypass = {**self.bypass, **later.bypass}
        merged = {name: dict(entry) for name, entry in self.modules.items() if not _inside(name, later.bypass)}
        for name, entry in later.modules.items():
            first = merged.setdefault(name, {"type": entry["type"]})
            if entry.get("bias"):
                first["bias"] = True
            for role in _roles(entry):
                if role in first:
                    first[role] = [first[role][i] for i in entry[role]]
                else:
                    first[role], first[f"{role}_size"] = list(entry[role]), entry[f"{role}_size"]
        return Plan(merged, bypass, {**self.replace, **later.replace})

    def to_json(self) -> str:
        # one layer per line: readable in a diff, and still plain JSON
        body = _lines(self.modules)
        if self.replace:
            return (f'{{"format": "{FORMAT_REPLACE}", "replace": {json.dumps(self.replace)}, "bypass": {{\n'
                    f'{_lines(self.bypass)}\n}}, "modules": {{\n{body}\n}}}}\n')
        if not self.bypass:
            return f'{{"format": "{FORMAT}", "modules": {{\n{body}\n}}}}\n'
        return f'{{"format": "{FORMAT_BYPASS}", "bypass": {{\n{_lines(self.bypass)}\n}}, "modules": {{\n{body}\n}}}}\n'

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") not in (FORMAT, FORMAT_BYPASS, FORMAT_REPLACE):
            raise ValueError(f"not a segprune plan (expected format {FORMAT!r}, {FORMAT_BYPASS!r} or "
                             f"{FORMAT_REPLACE!r})")
        return cls(modules=data["modules"], bypass=data.get("bypass", {}), replace=data.get("replace", {}))

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


def _roles(entry: dict) -> list[str]:
    """The dims an entry cuts: "out", "in", "param:NAME" (a raw per-channel parameter), "attr:NAME" (split sizes)."""
    return [k for k in entry if k not in ("type", "bias") and not (k.endswith("_size") and k[:-5] in entry)]


def _keep_parameter(module: nn.Module, name: str, keep: torch.Tensor, size: int) -> None:
    """Slice a per-channel parameter along its one dim of `size` values."""
    param = getattr(module, name)
    dim = next(d for d, n in enumerate(param.shape) if n == size)
    new = param.detach().index_select(dim, keep.to(param.device))
    setattr(module, name, nn.Parameter(new, requires_grad=param.requires_grad))


def _keep_sizes(module: nn.Module, name: str, keep: torch.Tensor, size: int) -> None:
    """Rewrite the split sizes an attribute holds (an int: equal pieces; a list: one size per piece) to count the
    channels kept in each piece."""
    value = getattr(module, name)
    sizes = [value] * (size // value) if isinstance(value, int) else list(value)
    bounds = np.cumsum([0, *sizes])
    kept = [int(((keep >= lo) & (keep < hi)).sum()) for lo, hi in zip(bounds[:-1], bounds[1:])]
    setattr(module, name, kept[0] if isinstance(value, int) else type(value)(kept))


def _checked_module(model: nn.Module, name: str, entry: dict) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"plan names layer {name!r}, which this model does not have") from err
    layers = "out" in entry or "in" in entry
    if type(module).__name__ != entry["type"] or (layers and surgery_for(module) is None):
        raise ValueError(f"plan expects {name!r} to be a {entry['type']}, the model has {type(module).__name__}")
    for role in ("out", "in"):
        if role in entry and width(module, role) != entry[f"{role}_size"]:
            raise ValueError(f"plan expects {name!r} to have {entry[f'{role}_size']} {role}put channels, "
                             f"the model has {width(module, role)}")
    return module


def _lines(entries: dict[str, dict]) -> str:
    return ",\n".join(f"  {json.dumps(name)}: {json.dumps(entry)}" for name, entry in entries.items())


def _inside(name: str, blocks: dict[str, dict]) -> bool:
    """Whether module `name` is one of `blocks` or lies inside one."""
    return any(name == b or name.startswith(b + ".") for b in blocks)


class ZeroBranch(nn.Module):
    """What a bypassed residual branch computes: zeros shaped like its input (the add around it stays)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


# activations a bypassed block may end with (its post-add op), rebuilt by name with these keyword attributes
ACTIVATIONS = {"ReLU": (), "ReLU6": (), "SiLU": (), "GELU": ("approximate",), "Hardswish": (), "Sigmoid": (),
               "Tanh": (), "Mish": (), "LeakyReLU": ("negative_slope",), "ELU": ("alpha",),
               "Hardtanh": ("min_val", "max_val")}


def replacement(entry: dict) -> nn.Module:
    """The module a bypass entry puts in place of its block."""
    kind = entry["with"]
    if kind == "identity":
        return nn.Identity()
    if kind == "zero":
        return ZeroBranch()
    if kind == "act" and entry.get("act") in ACTIVATIONS:
        return getattr(nn, entry["act"])(**entry.get("kwargs", {}))
    raise ValueError(f"unknown bypass {entry!r}: expected with = identity, zero or act (one of {sorted(ACTIVATIONS)})")


def _bypass(model: nn.Module, name: str, entry: dict) -> None:
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"plan bypasses block {name!r}, which this model does not have") from err
    if type(module).__name__ != entry["type"]:
        raise ValueError(f"plan expects block {name!r} to be a {entry['type']}, the model has {type(module).__name__}")
    model.set_submodule(name, replacement(entry))
