"""Layer (block) pruning: find residual blocks `y = act(x + f(x))` that can be bypassed, score them, remove them.

Miao et al. (2020) compress PSPNet by removing whole residual blocks; only identity blocks (no projection
shortcut, equal input and output shapes) can go. Here the blocks are found from a trace of any nn.Module rather
than from its class names: an `add` whose operands are the block input `x` (the same tensor, or one passed
through identity-like ops) and `f(x)`, a tensor computed from `x` alone (and weights); the *block* is the smallest
named module called on `x` that contains every op of `f`, the add and at most one activation after it, and
returns the add (or that activation). Bypassing replaces that module by what it computes when `f(x) = 0`:

- no op after the add: `x + 0 = x`, the identity;
- an activation `a` after the add: `a(x)`. That is `x` itself when `a` is idempotent (relu, relu6) and the
  trace shows that `x` already came out of the same activation, through ops that keep its range (pooling,
  dropout, identity): in a ResNet, `x` is the previous block's relu output, so `relu(x) = x`. This is checked on
  the trace, not assumed; otherwise the block is replaced by the activation alone. A dropout after the add is
  the identity (eval mode);
- when no module holds the add (or the op after it cannot be rebuilt, e.g. `y * 0.5`) but one module computes
  exactly `f(x)` from `x`, that module is replaced by zeros like its input (the add stays, with nothing behind it).

A module without parameters is never listed (removing it saves nothing). Blocks are found on one eval-mode pass
with the example input: a forward that branches on values or on the input size may hold other blocks elsewhere.

The replaced modules and their parameters are gone from the model, and the plan records the bypass (a
`bypass` step of `Plan`), so checkpoints replay it and channel pruning composes with it (`Plan.then`).

The oracle's reference for a bypassed block is the original model with the branch output `f(x)` set to zero by
a forward hook on the module that returns it (`zeroed_branches`).
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from segprune._utils import IGNORE_INDEX, eval_mode, logits, tensors
from segprune.prune.api import PruneResult, _criterion
from segprune.prune.graph import PRODUCERS, channel_groups
from segprune.prune.plan import ACTIVATIONS, Plan
from segprune.prune.record import OpRecorder, module_calls
from segprune.prune.rules import op_name
from segprune.prune.trace import as_call, trace

# ops through which a tensor stays "the same" (identity-equivalent in eval mode)
_ALIAS_OPS = {"clone", "contiguous", "identity", "detach", "dropout", "dropout1d", "dropout2d", "dropout3d",
              "alpha_dropout", "feature_alpha_dropout"}
# ops that keep every value inside the range of their input (so relu(x) = x stays true through them)
_RANGE_OPS = _ALIAS_OPS | {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
                           "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                           "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
                           "max_pool2d_with_indices", "getitem"}
_IDEMPOTENT = {"relu": "ReLU", "relu6": "ReLU6"}
_FUNCTIONAL_ACTS = {"relu": "ReLU", "relu6": "ReLU6", "silu": "SiLU", "gelu": "GELU", "hardswish": "Hardswish",
                    "sigmoid": "Sigmoid", "tanh": "Tanh", "mish": "Mish"}


@dataclass
class Block:
    """A bypassable residual block.

    Attributes:
        name: the module that is replaced.
        type: its class name (the plan checks it on replay).
        bypass: the plan entry: `{"with": "identity" | "zero" | "act", ...}`.
        macs: multiply-accumulates the block costs in one eval-mode pass on the example input (the trace's count).
        params: parameters that disappear with it.
        branch: the module whose output is `f(x)` (the oracle zeroes it), or None when an op, not a module,
            returns it.
        why: how the replacement was decided, for reports.
    """

    name: str
    type: str
    bypass: dict
    macs: int
    params: int
    branch: str | None
    why: str

    @property
    def entry(self) -> dict:
        return {"type": self.type, **self.bypass}


class Blocks(list):
    """The blocks of a model (a list), with the model's total MACs on the example input."""

    def __init__(self, blocks: Iterable[Block] = (), *, total_macs: int = 0):
        super().__init__(blocks)
        self.total_macs = total_macs


# --- the trace ------------------------------------------------------------------------------------------------
@dataclass
class _Op:
    name: str
    inputs: list[int]  # value nodes
    outputs: list[int]


@dataclass
class _Call:
    name: str
    start: int  # index of the first op inside the call
    end: int = -1  # one past the last op
    input: int | None = None  # value node of the single tensor argument
    output: int | None = None  # value node of the tensor returned


@dataclass
class _Graph:
    """Values (a tensor at one moment: an in-place op makes a new value of the same tensor), their producers,
    and the module calls around the ops."""

    producer: list[int | None] = field(default_factory=list)  # value -> op index (None: a model input)
    shape: list[tuple] = field(default_factory=list)
    ops: list[_Op] = field(default_factory=list)
    calls: list[_Call] = field(default_factory=list)
    current: dict[int, int] = field(default_factory=dict)  # id(live tensor) -> its latest value

    def new(self, t: torch.Tensor, op: int | None) -> int:
        self.producer.append(op)
        self.shape.append(tuple(t.shape))
        # Python reuses the id of a freed tensor: forget it the moment it dies (memory stays that of a forward pass)
        if id(t) not in self.current:
            weakref.finalize(t, self.current.pop, id(t), None)
        self.current[id(t)] = len(self.producer) - 1
        return len(self.producer) - 1

    def value(self, t) -> int | None:
        return self.current.get(id(t)) if isinstance(t, torch.Tensor) else None


class _Recorder(OpRecorder):
    """Every op's input and output values, in order."""

    def __init__(self, graph: _Graph):
        super().__init__()
        self.g = graph

    def record(self, func, args, kwargs, out) -> None:
        g = self.g
        inputs = [v for t in tensors((args, kwargs)) if (v := g.value(t)) is not None]
        index = len(g.ops)
        outputs = [g.new(t, index) for t in tensors(out)]
        if outputs:
            g.ops.append(_Op(op_name(func), inputs, outputs))


def _record(model: nn.Module, example_inputs) -> _Graph:
    """Run `model` once in eval mode, recording every op's values and every module call."""
    g, stack = _Graph(), []

    def enter(name, module, args):
        ts = list(tensors(args))
        stack.append(_Call(name, len(g.ops), input=g.value(ts[0]) if len(ts) == 1 else None))

    def leave(name, module, args, out):
        if stack:
            call = stack.pop()
            call.end = len(g.ops)
            call.output = g.value(out)
            g.calls.append(call)

    args, kwargs = as_call(example_inputs)
    for t in tensors((args, kwargs)):
        g.new(t, None)
    with module_calls(model, enter, leave), eval_mode(model), torch.no_grad(), _Recorder(g):
        model(*args, **kwargs)
    return g


# --- finding blocks -------------------------------------------------------------------------------------------
def _base(g: _Graph, v: int, through=_ALIAS_OPS) -> int:
    """Follow `v` back through ops that pass their single traced input on unchanged (or within its range)."""
    while (op := g.producer[v]) is not None and g.ops[op].name in through and len(g.ops[op].inputs) == 1:
        v = g.ops[op].inputs[0]
    return v


def _branch_ops(g: _Graph, f: int, x: int) -> set[int] | None:
    """The ops computing `f` from `x`: None if `f` needs any other traced value (a model input, a skip from
    elsewhere) or does not depend on `x` at all."""
    ops, todo, seen, uses_x = set(), [f], set(), False
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        if _base(g, v) == x:
            uses_x = True
            continue
        op = g.producer[v]
        if op is None:
            return None
        ops.add(op)
        todo.extend(g.ops[op].inputs)
    return ops if uses_x else None


def _post_op(g: _Graph, out: int, y: int) -> _Op | None | bool:
    """The single op between the add's value `y` and the call's output `out`: None when there is none, False
    when the output is not `y` through at most one single-input op."""
    if out == y:
        return None
    op = g.producer[out]
    if op is not None and g.ops[op].inputs == [y]:
        return g.ops[op]
    return False


def _find(g: _Graph, op_index: int) -> list[tuple[_Call, int, int, _Op | None, str]]:
    """For an add, the candidate blocks around it, preferred first: (call, x, f, post op, kind)."""
    add, found = g.ops[op_index], []
    if len(add.inputs) != 2 or len(add.outputs) != 1:
        return found
    y = add.outputs[0]
    for xv, fv in (add.inputs, add.inputs[::-1]):
        x = _base(g, xv)
        if not g.shape[xv] == g.shape[fv] == g.shape[y]:
            continue
        ops = _branch_ops(g, fv, x)
        if not ops:
            continue
        first, calls = min(ops), sorted(g.calls, key=lambda c: c.end - c.start)  # smallest module first
        mine = [c for c in calls if c.input is not None and _base(g, c.input) == x and c.start <= first]
        for call in (c for c in mine if c.end > op_index):
            post = _post_op(g, call.output, y) if call.output is not None else False
            inside = ops | {op_index} | ({g.producer[call.output]} if post else set())
            ops_in_call = range(call.start, call.end)
            if post is not False and all(i in inside or g.ops[i].name in _ALIAS_OPS for i in ops_in_call):
                found.append((call, x, fv, post, "block"))
                break
        found += [(call, x, fv, None, "zero") for call in mine if call.output == fv and call.end > max(ops)][:1]
    return found


def _activation(g: _Graph, post: _Op, x: int, call: _Call, model: nn.Module) -> tuple[dict, str] | None:
    """The bypass of a block ending with activation `post`: identity when it is idempotent and `x` already came
    out of it; else the activation as a module; None when it cannot be rebuilt."""
    if post.name in _ALIAS_OPS:
        return {"with": "identity"}, f"{post.name} after the add is the identity in eval mode"
    source = g.producer[_base(g, x, _RANGE_OPS)]
    if post.name in _IDEMPOTENT and source is not None and g.ops[source].name == post.name:
        return {"with": "identity"}, (f"{post.name}(x) = x: the block input already came out of {post.name} "
                                      "(through range-keeping ops only)")
    module = _act_module(g, post, call, model)
    if module is not None and type(module).__name__ in ACTIVATIONS:
        kwargs = {k: getattr(module, k) for k in ACTIVATIONS[type(module).__name__]}
        act = type(module).__name__
    elif post.name in _FUNCTIONAL_ACTS:
        kwargs, act = {}, _FUNCTIONAL_ACTS[post.name]
    else:
        return None
    why = f"{post.name} after the add is kept: its input is not known to be a {post.name} output"
    return {"with": "act", "act": act, "kwargs": kwargs}, why


def _act_module(g: _Graph, post: _Op, call: _Call, model: nn.Module) -> nn.Module | None:
    """The module (inside the block) that ran the activation, if one did."""
    for c in g.calls:
        if c.output == post.outputs[0] and c.name.startswith(call.name + "."):
            return model.get_submodule(c.name)
    return None


def _branch_module(g: _Graph, f: int, call: _Call) -> str | None:
    """The outermost module inside the block that returns `f(x)`."""
    found = [c for c in g.calls if c.output == f and (c.name.startswith(call.name + ".") or c is call)]
    return max(found, key=lambda c: c.end - c.start).name if found else None


def residual_blocks(model: nn.Module, example_inputs) -> Blocks:
    """The bypassable residual blocks of `model`, in the order they run (see the module docstring).

    Args:
        model: any nn.Module; it is run once in eval mode, not modified.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
    """
    g = _record(model, example_inputs)
    macs = trace(model, example_inputs, modes=("eval",)).macs
    blocks, taken = [], set()
    for i, op in enumerate(g.ops):
        for call, x, f, post, kind in _find(g, i) if op.name == "add" else ():
            module = model.get_submodule(call.name) if call.name else None
            decided = _decide(g, call, x, post, kind, model)
            # a module without parameters saves nothing (a branch already replaced by zeros)
            if decided is None or module is None or call.name in taken or not any(True for _ in module.parameters()):
                continue
            taken.add(call.name)
            blocks.append(Block(call.name, type(module).__name__, decided[0], _macs_under(macs, call.name),
                                sum(p.numel() for p in module.parameters()),
                                call.name if kind == "zero" else _branch_module(g, f, call), decided[1]))
            break
    return Blocks(blocks, total_macs=sum(macs.values()))


def _decide(g, call, x, post, kind, model) -> tuple[dict, str] | None:
    if kind == "zero":
        return {"with": "zero"}, "no module holds the add and what follows it: the branch module returns zeros"
    return ({"with": "identity"}, "x + 0 = x") if post is None else _activation(g, post, x, call, model)


def _macs_under(macs: dict[str, int], name: str) -> int:
    return sum(v for k, v in macs.items() if k == name or k.startswith(name + "."))


def require_blocks(blocks: Blocks, model: nn.Module) -> Blocks:
    """`blocks`, or a clear error when the model has none."""
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no bypassable residual block (an add of a module's input x "
                         "and f(x) of the same shape, with f computed from x alone, inside that module); layer "
                         "pruning does not apply, channel pruning (segprune.prune.prune, slim_layers, the "
                         "schedules) still does")
    return blocks


# --- bypassing and its oracle ---------------------------------------------------------------------------------
def bypass_blocks(model: nn.Module, blocks: Sequence[Block], *, inplace: bool = False) -> tuple[nn.Module, Plan]:
    """Replace each block by its bypass; returns (the model without them, the plan recording it)."""
    plan = Plan(bypass={b.name: b.entry for b in blocks})
    return plan.apply(model if inplace else copy.deepcopy(model)), plan


def zeroed_branches(model: nn.Module, blocks: Sequence[Block]) -> nn.Module:
    """The oracle's reference: a copy of `model` whose blocks' branch outputs `f(x)` are set to zero by forward
    hooks, before the residual add."""
    reference = copy.deepcopy(model)
    for b in blocks:
        if b.branch is None:
            raise ValueError(f"block {b.name}: no module returns its branch output, so no hook can zero it")
        reference.get_submodule(b.branch).register_forward_hook(lambda m, args, out: torch.zeros_like(out))
    return reference


# --- scoring and greedy removal -------------------------------------------------------------------------------
def loss_metric(loss_fn: Callable | None = None) -> Callable[[nn.Module, Sequence], float]:
    """`metric(model, batches)`: mean validation loss in eval mode (cross-entropy ignoring void by default)."""
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, ignore_index=IGNORE_INDEX))

    def metric(model: nn.Module, batches) -> float:
        with eval_mode(model), torch.no_grad():
            losses = [float(loss_fn(logits(model(x)), y)) for x, y in batches]
        if not losses:
            raise ValueError("no validation batches to score blocks on")
        return sum(losses) / len(losses)

    return metric


def score_blocks(model: nn.Module, blocks: Sequence[Block], batches, metric_fn: Callable | None = None
                 ) -> dict[str, float]:
    """How much each block costs when bypassed alone, without retraining: `metric(bypassed) - metric(model)`.

    Args:
        model: the model; each block is swapped out and back in turn, so it ends unchanged.
        blocks: from `residual_blocks`.
        batches: validation (input, target) batches, iterated several times.
        metric_fn: `metric(model, batches) -> float`, lower is better; mean validation loss by default
            (`loss_metric`), or `miou_metric(k)` for the drop in mIoU.
    """
    metric = metric_fn or loss_metric()
    batches = list(batches)
    base = metric(model, batches)
    scores = {}
    for b in blocks:
        original = model.get_submodule(b.name)
        Plan(bypass={b.name: b.entry}).apply(model)
        try:
            scores[b.name] = metric(model, batches) - base
        finally:
            model.set_submodule(b.name, original)
    return scores


@dataclass
class BlockPruneResult:
    """The model without the removed blocks, the plan, and the history of the greedy removal."""

    model: nn.Module
    plan: Plan
    removed: list[Block]
    history: list[dict]  # per removal: block, score, metric, macs (fraction of the original)
    base_metric: float


def prune_blocks(model: nn.Module, example_inputs, batches, *, tolerance: float | None = None,
                 target_macs: float | None = None, max_blocks: int | None = None, loss_fn: Callable | None = None,
                 metric_fn: Callable | None = None, rescore: bool = True, inplace: bool = False) -> BlockPruneResult:
    """Remove residual blocks greedily, the least important first, without retraining.

    Each round bypasses the block whose removal costs least (`score_blocks`) and stops before a removal that would
    raise the metric more than `tolerance` above the original model's, or once MACs are at most `target_macs` of
    the original, or after `max_blocks` removals (whichever comes first; at least one must be given), or when no
    block is left (a MAC target that blocks alone cannot reach: check `history[-1]["macs"]`). With
    `rescore` (the default) the remaining blocks are found and scored again on the current model after every
    removal (the greedy choice then accounts for blocks already gone, at the price of one evaluation per block per
    round); without it they are scored once on the original model and removed in that order.

    Args:
        tolerance: largest allowed increase of the metric (validation loss by default), >= 0.
        target_macs: stop when MACs <= this fraction of the original, in (0, 1].
        max_blocks: remove at most this many blocks.
        loss_fn: `loss(logits, target)` of the default loss metric.
        metric_fn: `metric(model, batches) -> float`, lower is better (overrides `loss_fn`; see `score_blocks`).
        rescore: find and score the blocks again after each removal.
        inplace: remove from `model` itself instead of a copy.
    """
    _check_stops(tolerance, target_macs, max_blocks)
    metric, batches = metric_fn or loss_metric(loss_fn), list(batches)
    current = model if inplace else copy.deepcopy(model)
    blocks = require_blocks(residual_blocks(current, example_inputs), model)
    total, base = blocks.total_macs, metric(current, batches)
    once = None if rescore else score_blocks(current, blocks, batches, metric)
    order = None if rescore else sorted(blocks, key=lambda b: once[b.name])
    plan, removed, history, macs = Plan(), [], [], blocks.total_macs
    while not _done(macs / max(total, 1), target_macs, len(removed), max_blocks):
        candidates = _candidates(current, example_inputs, order, removed)
        if not candidates:
            break
        scores = score_blocks(current, candidates, batches, metric) if rescore else None
        best = min(candidates, key=lambda b: scores[b.name]) if rescore else candidates[0]
        step, original = Plan(bypass={best.name: best.entry}), current.get_submodule(best.name)
        step.apply(current)
        after = metric(current, batches)
        if tolerance is not None and after - base > tolerance:
            current.set_submodule(best.name, original)  # this one would cost too much: put it back, stop
            break
        plan, macs = plan.then(step), macs - best.macs
        removed.append(best)
        history.append({"block": best.name, "score": after - (history[-1]["metric"] if history else base),
                        "metric": after, "macs": macs / max(total, 1)})
    return BlockPruneResult(current, plan, removed, history, base)


def _check_stops(tolerance, target_macs, max_blocks) -> None:
    if tolerance is None and target_macs is None and max_blocks is None:
        raise ValueError("give tolerance, target_macs or max_blocks: when to stop removing blocks")
    if tolerance is not None and (tolerance < 0 or math.isnan(tolerance)):
        raise ValueError(f"tolerance must be >= 0 (the largest metric increase allowed), got {tolerance}")
    if target_macs is not None and not 0 < target_macs <= 1:
        raise ValueError(f"target_macs must be in (0, 1], got {target_macs}")
    if max_blocks is not None and max_blocks < 0:
        raise ValueError(f"max_blocks must be >= 0, got {max_blocks}")


def _done(macs: float, target_macs, count: int, max_blocks) -> bool:
    return (target_macs is not None and macs <= target_macs) or (max_blocks is not None and count >= max_blocks)


def _candidates(current, example_inputs, order, removed) -> list[Block]:
    gone = [b.name for b in removed]
    inside = lambda name: any(name == r or name.startswith(r + ".") for r in gone)  # noqa: E731
    if order is not None:
        return [b for b in order if not inside(b.name)]
    return [b for b in residual_blocks(current, example_inputs) if not inside(b.name)]


# --- structure optimisation: slim named layers to a given width -----------------------------------------------
def slim_layers(model: nn.Module, example_inputs, widths: dict[str, int], *, criterion: str | Callable = "l1",
                groups=None, inplace: bool = False):
    """Set the output width of named layers (Miao et al.'s head slimming: PSPNet's PPM branches, its 3x3 head conv)
    by removing their weakest channels, within the channel groups they belong to.

    A name may be a conv/linear layer or any module holding some: every conv and linear layer under it gets the
    width (`"ppm.branches": 8` slims the four branch convs of a segprune PSPNet to 8 channels each). A layer whose
    channels are shared with others (a residual stream) takes them along: the group is cut as one.

    Args:
        model: any nn.Module.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        widths: module name -> output channels to keep (>= 1, at most the current width).
        criterion: a name in CRITERIA or `fn(group, model) -> scores` ranking the channels within each group.
        groups: channel groups of `model` already computed (skips the trace).
        inplace: cut `model` itself instead of a copy.

    Returns:
        A `PruneResult` (model, plan, groups, removed), which the masked-equivalence oracle checks like any other.
    """
    groups = groups if groups is not None else channel_groups(model, example_inputs)
    score = _criterion(criterion, 0)
    removed: dict[int, set[int]] = {}
    for name, width in widths.items():
        for layer in _layers(model, name):
            group, member = _group_of(groups, layer, name)
            _slim(group, member, width, score(group, model), removed.setdefault(group.id, set()), layer)
    removal = {gid: torch.tensor(sorted(cs)).numpy() for gid, cs in removed.items() if cs}
    plan = Plan.from_removal(model, groups, removal)
    return PruneResult(plan.apply(model if inplace else copy.deepcopy(model)), plan, list(groups), removal)


def _layers(model: nn.Module, name: str) -> list[str]:
    names = dict(model.named_modules())
    if name not in names:
        near = [n for n in names if n and (name.split(".")[-1] in n)][:5]
        raise ValueError(f"slim_layers: the model has no layer {name!r}" + (f" (similar: {near})" if near else ""))
    found = [n for n, m in names.items() if (n == name or n.startswith(name + ".")) and isinstance(m, PRODUCERS)]
    if not found:
        raise ValueError(f"slim_layers: {name!r} is a {type(names[name]).__name__} with no conv or linear layer")
    return found


def _group_of(groups, layer: str, name: str):
    for group in groups:
        for member in group.members:
            if member.module == layer and member.role == "out":
                return group, member
    raise ValueError(f"slim_layers: {layer} (under {name!r}) was not traced: it does not run on the example input")


def _slim(group, member, width: int, scores, removed: set[int], layer: str) -> None:
    """Add to `removed` the weakest channels of `member` so that `width` of them stay."""
    held = sorted(set(member.index.tolist()))
    left = [c for c in held if c not in removed]
    if not 1 <= width <= len(held):
        raise ValueError(f"slim_layers: width {width} for {layer} must be in [1, {len(held)}] (its channels)")
    cut = len(left) - width
    if cut <= 0:
        return
    free = [c for c in left if group.prunable[c]]
    if len(free) < cut:
        frozen = next((group.reasons[c] for c in left if not group.prunable[c]), "frozen")
        raise ValueError(f"slim_layers: cannot slim {layer} to {width}: only {len(free)} of its {len(left)} channels "
                         f"may be removed; the others are frozen ({frozen})")
    if scores is None:
        raise ValueError(f"slim_layers: the criterion cannot score {layer}'s channel group; try criterion='l1'")
    removed.update(sorted(free, key=lambda c: float(scores[c]))[:cut])
