"""Masked equivalence on random architectures built from the blocks the engine must understand."""

import warnings

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import segprune
from segprune.prune.oracle import masked_copy, outputs, relative_error
from tests.conftest import randomize_norms
from tests.zoo import cbr


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


BLOCKS = {"residual": Residual, "branches": Branches, "pool": PoolUnpool, "gate": Gate, "depthwise": Depthwise,
          "chunked": Chunked, "conv": lambda c, w: cbr(c, w)}


def out_channels(block, c, width):
    if isinstance(block, Branches):
        return block.out_channels
    if isinstance(block, (Chunked, nn.Sequential)):
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


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, ratio=st.sampled_from([0.3, 0.6]), seed=st.integers(0, 1000))
def test_random_architectures_prune_exactly(spec, ratio, seed):
    torch.manual_seed(seed)
    model = randomize_norms(build(spec), seed).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = segprune.channel_groups(model, x)
    result = segprune.prune(model, x, ratio=ratio, criterion="random", seed=seed, groups=groups)
    expected = outputs(masked_copy(model, groups, result.removed), x)
    assert relative_error(expected, outputs(result.model, x)) < 1e-6
