"""Channel rules: for every op the tracer records, which channels of its tensors are the same.

A rule is `rule(st, args, kwargs, out)`. It reads what the inputs carry (`st.get`) and records what
the outputs carry (`st.set`), unions channels that must be cut together, binds module weights to
channels, and freezes what it cannot reason about. Rules are keyed by the op's name, with in-place
(`add_`), reflected (`__radd__`) and dunder (`__add__`) spellings folded onto one name.

Ops are seen at the `torch.nn.functional` / `torch` / `Tensor` method level (TorchFunctionMode), so
integer tensors (max-pool indices) and tensors that need no gradient are traced too.

One module per op family, each registering its rules into the one table `RULES` when imported:
`elementwise` (pass-through and broadcasting ops), `conv` (conv/linear), `norms`, `reductions`, `shapes`
(cat/split, indexing, reshape, permute, pixel_shuffle, unfold, ...) and `attention` (heads, matmul/einsum
contractions, scaled_dot_product_attention). Add a rule with `RULES["op"] = fn` or `@rule("op")`.
"""

from segprune.prune.rules import attention, conv, elementwise, norms, reductions, shapes  # noqa: F401 - register
from segprune.prune.rules.base import RULES, _arg, _dim, constant, op_name, rule, unknown

__all__ = ["RULES", "_arg", "_dim", "constant", "op_name", "rule", "unknown"]
