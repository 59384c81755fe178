"""Masked equivalence: the acceptance test of the engine (see DESIGN.md)."""

import warnings

import pytest
import torch

import segprune
from segprune.prune.oracle import masked_copy, outputs, relative_error
from tests.conftest import randomize_norms
from tests.zoo import ZOO

try:
    from segprune.models import create_model, list_models
    REGISTRY = list_models("test_*")
except ImportError:  # the model zoo is optional for the engine's own tests
    REGISTRY = []

ARCHS = sorted(ZOO) + REGISTRY


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ZOO[name]() if name in ZOO else create_model(name, num_classes=3)
    return randomize_norms(model).double().eval()


def example(name: str) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32, dtype=torch.float64)


def check(model, x, ratio, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = segprune.channel_groups(model, x)
    result = segprune.prune(model, x, ratio=ratio, criterion="random", seed=seed, groups=groups)
    masked = outputs(masked_copy(model, groups, result.removed), x)
    return result, masked, outputs(result.model, x)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_pruned_equals_masked(name, ratio):
    model, x = build(name), example(name)
    result, masked, pruned = check(model, x, ratio, seed=int(ratio * 10))
    assert result.channels_removed > 0, "nothing was pruned: the test would prove nothing"
    assert relative_error(masked, pruned) < 1e-6
    assert relative_error(outputs(model, x), pruned) > 1e-6, "pruning changed nothing: the mask is not applied"


@pytest.mark.parametrize("name", ARCHS)
def test_ratio_zero_is_bit_identical(name):
    model, x = build(name), example(name)
    result, _, pruned = check(model, x, 0.0, seed=0)
    assert result.channels_removed == 0
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, x), pruned))


@pytest.mark.parametrize("name", ARCHS)
def test_plan_replays_on_fresh_model(name):
    model, x = build(name), example(name)
    result, _, pruned = check(model, x, 0.5, seed=3)
    plan = segprune.Plan.from_json(result.plan.to_json())
    fresh = plan.apply(build(name))
    fresh.load_state_dict(result.model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(pruned, outputs(fresh, x)))
