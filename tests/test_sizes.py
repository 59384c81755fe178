"""Issue #23: the trace's sizes remember which widths and attributes they were computed from (prune/sizes.py)."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segprune
from segprune.prune.oracle import masked_copy, outputs, relative_error
from segprune.prune.sizes import Size, attribute_sizes


def test_multiplication_and_exact_division_keep_the_record_other_arithmetic_does_not():
    c = Size(32, ids=np.arange(32))
    h = Size(4, attrs={("attn", "h"): 1})
    d = c // h
    assert d == 8 and d.ids is not None and d.attrs == {("attn", "h"): -1}
    both = h * d
    assert both == 32 and both.attrs == {} and both.scale == 1
    assert (c * 3).scale == 3 and type(c + 1) is int and type(c // 5) is int and type(c - c) is int
    assert type(c * c) is int and h.attribute == ("attn", "h") and d.attribute is None and (h * 1).attribute is None


def test_attributes_are_plain_ints_again_after_the_trace():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, groups=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model.extra = 5
    with attribute_sizes(model):
        assert isinstance(model.extra, Size) and model[0].groups.attribute == ("0", "groups")
        model.stored = model.extra * 2  # a forward may keep a size it computed
    assert type(model.extra) is int and type(model[0].groups) is int and type(model.stored) is int
    segprune.channel_groups(model, torch.randn(1, 3, 8, 8))
    assert all(type(v) is int for m in model.modules() for v in vars(m).values() if isinstance(v, int)
               and not isinstance(v, bool))


class WidthTimesAttribute(nn.Module):
    """A head size computed as the input's width times an attribute the cut rewrites: cannot be followed."""

    def __init__(self):
        super().__init__()
        self.stem, self.num_heads = nn.Conv2d(3, 8, 1), 2
        self.q, self.cls = nn.Linear(8, 16), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = self.stem(x)
        t = y.flatten(2).transpose(1, 2)
        b, n, c = t.shape
        q = self.q(t).view(b, n, self.num_heads, c * self.num_heads // 2)
        return self.cls(y) + q.sum((2, 3)).mean() * 0


def test_a_size_that_cannot_be_followed_is_frozen_naming_the_reshape_and_module():
    model = WidthTimesAttribute().double().eval()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = segprune.channel_groups(model, x)
    messages = " | ".join(str(w.message) for w in caught)
    q = next(g for g in groups if "q" in g.modules("out"))
    assert q.frozen and "reshape to [1, 16, 2, 8]" in messages and "in the model's top-level forward" in messages


class BiasedHeads(nn.Module):
    """Swin's attention as transformers 5 writes it: SDPA with a per-head relative-position bias (gathered from a raw
    table) as its mask; `per_head=False` gives a mask shared by every head."""

    def __init__(self, per_head):
        super().__init__()
        self.num_heads, self.head_dim, self.per_head = 2, 4, per_head
        self.inp, self.q, self.k, self.v, self.o, self.out = (nn.Linear(a, b) for a, b in
                                                              ((3, 8), (8, 8), (8, 8), (8, 8), (8, 8), (8, 3)))
        self.table = nn.Parameter(torch.randn(9, 2 if per_head else 1))
        self.register_buffer("index", torch.randint(0, 9, (16,)))

    def forward(self, x):
        t = self.inp(x)
        b, n, _ = t.shape
        q, k, v = (f(t).view(b, n, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        bias = self.table[self.index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.5)
        return self.out(self.o(a.transpose(1, 2).reshape(b, n, -1)))


@pytest.mark.parametrize("per_head", [True, False])
def test_a_per_head_attention_mask_freezes_the_heads_in_the_trace_not_in_verification(per_head):
    torch.manual_seed(0)
    model, x = BiasedHeads(per_head).double().eval(), torch.randn(1, 4, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = segprune.prune(model, x, ratio=0.5, criterion="l1", select="uniform")
    announced = any("one slice per head" in str(w.message) for w in caught)
    assert announced == per_head and not result.verification.frozen
    assert result.model.q.out_features == (8 if per_head else 4)  # a shared mask lets a head go
    masked = outputs(masked_copy(model, result.groups, result.removed), x)
    assert relative_error(masked, outputs(result.model, x)) < 1e-9
