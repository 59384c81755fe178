"""Masked equivalence on random architectures built from the blocks the engine must understand."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import segprune
from segprune.prune.oracle import masked_copy, outputs, relative_error
from tests.conftest import randomize_norms
from tests.zoo import LayerNorm2d, ScaledStdConv, StdConv, cbr


class Residual(nn.Module):
    def __init__(self, c, width):
        super().__init__()
        self.f = nn.Sequential(cbr(c, width), nn.Conv2d(width, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.f(x))


class Branches(nn.Module):
    """Two branches concatenated: offsets along the channel dim."""

    def __init__(self, c, width):
        super().__init__()
        self.a, self.b = cbr(c, width, k=1), cbr(c, width + 2, dilation=2)
        self.out_channels = 2 * width + 2

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


class PoolUnpool(nn.Module):
    """Pooling indices from one layer consumed by an unpool after another."""

    def __init__(self, c, width):
        super().__init__()
        self.inner = cbr(c, c)

    def forward(self, x):
        p, idx = F.max_pool2d(x, 2, return_indices=True)
        return F.max_unpool2d(self.inner(p), idx, 2, output_size=x.shape[-2:])


class Gate(nn.Module):
    def __init__(self, c, width):
        super().__init__()
        self.gate, self.spatial = nn.Conv2d(c, c, 1), nn.Conv2d(c, 1, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.gate(x)) * torch.sigmoid(self.spatial(x))


class Depthwise(nn.Module):
    def __init__(self, c, width):
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(2 * c),
                                nn.ReLU6(), nn.Conv2d(2 * c, c, 1))

    def forward(self, x):
        return x + self.dw(x)


class Chunked(nn.Module):
    def __init__(self, c, width):
        super().__init__()
        self.pre = cbr(c, 2 * width)
        self.a, self.b = cbr(width, width), nn.Sequential(nn.Conv2d(width, width, 1), nn.GroupNorm(1, width))

    def forward(self, x):
        a, b = self.pre(x).chunk(2, dim=1)
        return self.a(a) + self.b(b)


class SigmoidConv(nn.Module):
    """conv -> sigmoid -> conv: a removed channel sends sigmoid(0) = 0.5 on (folded into a 1x1 consumer, frozen
    before a zero-padded 3x3)."""

    def __init__(self, c, width):
        super().__init__()
        self.p = nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width))
        self.q = nn.Conv2d(width, c, 1 if width % 2 else 3, padding="same")

    def forward(self, x):
        return x + self.q(torch.sigmoid(self.p(x)))


class ConvNeXtMLP(nn.Module):
    """LayerNorm2d (channels-last, through permutes) -> 1x1 MLP -> layer scale -> residual."""

    def __init__(self, c, width):
        super().__init__()
        self.norm = LayerNorm2d(c)
        self.fc1, self.fc2 = nn.Conv2d(c, 2 * width, 1), nn.Conv2d(2 * width, c, 1)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x)))) * self.gamma.reshape(1, -1, 1, 1)


class Attention(nn.Module):
    """Tokens -> single-head attention (SDPA for an even width, explicit softmax(q kᵀ) v otherwise) -> back to
    NCHW through a shape saved before the projections."""

    def __init__(self, c, width):
        super().__init__()
        self.sdpa = width % 2 == 0
        self.q, self.k, self.v, self.proj = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x):
        shape = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.q(t), self.k(t), self.v(t)
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v
        return x + self.proj(a).transpose(1, 2).reshape(shape)


class Heads(nn.Module):
    """Two-head attention with the head count inferred (`view(b, n, -1, width)`: whole heads cut) for an even
    width, or the head size inferred (`view(b, n, 2, -1)`: features cut inside each head) for an odd one; SDPA
    with an explicit scale, or explicit softmax(q kᵀ) v."""

    def __init__(self, c, width):
        super().__init__()
        self.width, self.whole = width, width % 2 == 0
        self.q, self.k, self.v = (nn.Linear(c, 2 * width) for _ in range(3))
        self.proj = nn.Linear(2 * width, c)

    def forward(self, x):
        shape = x.shape
        t = x.flatten(2).transpose(1, 2)
        b, n, _ = t.shape
        heads = (lambda y: y.view(b, n, -1, self.width)) if self.whole else (lambda y: y.view(b, n, 2, -1))
        q, k, v = (heads(f(t)).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.whole:
            a = F.scaled_dot_product_attention(q, k, v, scale=self.width ** -0.5)
        else:
            a = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v
        return x + self.proj(a.transpose(1, 2).reshape(b, n, -1)).transpose(1, 2).reshape(shape)


class ShapedHeads(nn.Module):
    """Attention written as a user would (issue #23): the head size computed from the input's width (`c // self.h`,
    `c` from `t.shape`), the head count in an attribute not called `*head*`, SDPA, and `reshape(b, n, c)` back: the
    stream's width sizes the heads, so both are cut in step."""

    def __init__(self, c, width):
        super().__init__()
        self.h = 2 if c % 2 == 0 else 1
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x):
        shape = x.shape
        t = x.flatten(2).transpose(1, 2)
        b, n, c = t.shape
        q, k, v = (f(t).reshape(b, -1, self.h, c // self.h).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.o(a.transpose(1, 2).reshape(b, n, c)).transpose(1, 2).reshape(shape)


class MHA(nn.Module):
    """nn.MultiheadAttention over the pixels as tokens, batch-first for an even width (2 heads) and sequence-first
    for an odd one (1 head): swapped for the split attention and cut by whole heads and the embedding."""

    def __init__(self, c, width):
        super().__init__()
        self.batch_first = c % 2 == 0
        self.attn = nn.MultiheadAttention(c, 2 if c % 2 == 0 else 1, batch_first=self.batch_first)

    def forward(self, x):
        shape = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t if self.batch_first else t.transpose(0, 1)
        a = self.attn(t, t, t, need_weights=False)[0]
        a = a if self.batch_first else a.transpose(0, 1)
        return x + a.transpose(1, 2).reshape(shape)


class WSConv(nn.Module):
    """timm's weight-standardised convs (BiT, NF-nets), plain and scaled: baked to plain convs by the opt-in."""

    def __init__(self, c, width):
        super().__init__()
        self.a, self.b = StdConv(c, width, 3, padding=1), ScaledStdConv(width, c, 1)

    def forward(self, x):
        return x + self.b(F.relu(self.a(x)))


class IntSplit(nn.Module):
    """torch.split with a fixed size (res2net): the split tensor's channels are frozen, the branches prune."""

    def __init__(self, c, width):
        super().__init__()
        self.pre = cbr(c, 2 * width)
        self.width = width
        self.a, self.b = cbr(width, width), cbr(width, width)

    def forward(self, x):
        a, b = torch.split(self.pre(x), self.width, dim=1)
        return self.a(a) + self.b(b)


BLOCKS = {"residual": Residual, "branches": Branches, "pool": PoolUnpool, "gate": Gate, "depthwise": Depthwise,
          "chunked": Chunked, "conv": lambda c, w: cbr(c, w), "sigmoid": SigmoidConv, "convnext": ConvNeXtMLP,
          "attention": Attention, "split": IntSplit, "heads": Heads, "shaped": ShapedHeads, "mha": MHA,
          "ws": WSConv}


def out_channels(block, c, width):
    if isinstance(block, Branches):
        return block.out_channels
    if isinstance(block, (Chunked, IntSplit, nn.Sequential)):
        return width
    return c


def build(spec, num_classes=3):
    layers, c = [cbr(3, 6)], 6
    for kind, width in spec:
        block = BLOCKS[kind](c, width)
        layers.append(block)
        c = out_channels(block, c, width)
    layers.append(nn.Conv2d(c, num_classes, 1))
    return nn.Sequential(*layers)


specs = st.lists(st.tuples(st.sampled_from(sorted(BLOCKS)), st.integers(2, 6)), min_size=1, max_size=5)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, ratio=st.sampled_from([0.3, 0.6]), seed=st.integers(0, 1000))
def test_random_architectures_prune_exactly(spec, ratio, seed):
    torch.manual_seed(seed)
    model = randomize_norms(build(spec), seed).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # modules swapped first (nn.MultiheadAttention; weight standardisation baked, opt-in)
            result = segprune.prune(model, x, ratio=ratio, criterion="random", seed=seed,
                                    allow_approximate=("weight_standardization",))
        except ValueError as err:  # every group frozen: nothing to cut, said so
            assert "no prunable channel" in str(err)
            return
    expected = outputs(masked_copy(model, result.groups, result.removed, result.plan.replace), x)
    assert relative_error(expected, outputs(result.model, x)) < 1e-6


@pytest.mark.parametrize("width", [4, 3])
def test_heads_block_is_cut_inside_the_attention(width):
    """The generator's attention block is really pruned inside (whole heads or per-head features), not frozen."""
    torch.manual_seed(0)
    model = randomize_norms(build([("heads", width)]), 0).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    result = segprune.prune(model, x, ratio=0.6, criterion="random")
    inner = next(g for g in result.groups if "1.v" in g.modules("out"))
    assert inner.prunable.all() and result.model[1].v.out_features < 2 * width
    masked = outputs(masked_copy(model, result.groups, result.removed), x)
    assert relative_error(masked, outputs(result.model, x)) < 1e-9


def test_heads_sized_from_the_input_are_cut_with_the_stream():
    """The generator's width-from-shape block: heads and the stream are cut together, verification frees nothing."""
    torch.manual_seed(0)
    model = randomize_norms(build([("shaped", 4)]), 0).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    result = segprune.prune(model, x, ratio=0.5, criterion="random", select="uniform")
    assert not result.verification.frozen and result.model[1].h == 1
    assert result.model[1].q.out_features == result.model[0][0].out_channels == 3
    masked = outputs(masked_copy(model, result.groups, result.removed), x)
    assert relative_error(masked, outputs(result.model, x)) < 1e-9


def test_multihead_attention_and_weight_standardised_blocks_are_swapped_and_cut():
    """The generator's nn.MultiheadAttention (both layouts) and weight-standardised blocks are swapped, then cut."""
    torch.manual_seed(0)
    model = randomize_norms(build([("mha", 4), ("ws", 3), ("conv", 5), ("mha", 4), ("ws", 3)]), 0).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    result = segprune.prune(model, x, ratio=0.5, criterion="random", select="uniform",
                            allow_approximate=("weight_standardization",))
    assert sorted(result.plan.replace) == ["1.attn", "2.a", "2.b", "4.attn", "5.a", "5.b"]
    assert not result.verification.frozen and result.channels_removed > 0
    assert result.model[1].attn.num_heads == 1 and result.model[4].attn.num_heads == 1  # of 2 and 1 (features cut)
    masked = outputs(masked_copy(model, result.groups, result.removed, result.plan.replace), x)
    assert relative_error(masked, outputs(result.model, x)) < 1e-9
