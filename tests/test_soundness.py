"""Issue #13: what used to be silently wrong is now exact or frozen with a warning. Each case cuts 8 of 16
channels between a producer `p` and a consumer `q` with an op between that does not map 0 to 0 (or a shape saved
before the cut, or a fixed-size split); the pruned model must equal the masked model of what was removed."""

import warnings

import pytest
import torch

import segprune
from segprune.prune.oracle import masked_copy, outputs, relative_error
from tests.conftest import randomize_norms
from tests.zoo import SOUNDNESS

FOLDED = {"SigmoidThen1x1", "AddConst", "OnesLike", "Exp", "AffineFreeBN", "ParamAdd", "Softplus"}  # q: 1x1 or unpadded
FROZEN = {"SigmoidThen3x3": "sigmoid", "HardsigmoidThen3x3": "hardsigmoid", "PadValue": "pad",
          "SavedShape": "fails in the model's top-level forward: RuntimeError: shape", "IntSplit": "split"}


def cut(name, **kwargs):
    torch.manual_seed(0)
    model = randomize_norms(SOUNDNESS[name]()).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = segprune.prune(model, x, ratio=0.5, criterion="random", **kwargs)
    masked = outputs(masked_copy(model, result.groups, result.removed), x)
    return result, relative_error(masked, outputs(result.model, x)), " | ".join(str(w.message) for w in caught)


@pytest.mark.parametrize("name", sorted(FOLDED))
def test_constants_are_folded_into_the_consumer_bias(name):
    result, error, _ = cut(name)
    assert error < 1e-9 and result.verification.folded == ["q"] and not result.verification.frozen
    assert any("q" in g.modules("in") for g in result.groups if g.id in result.removed)


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_what_cannot_be_folded_is_frozen_with_a_warning(name):
    result, error, messages = cut(name)
    assert error < 1e-9 and result.channels_removed > 0
    assert "frozen" in messages and FROZEN[name] in messages


@pytest.mark.parametrize("name", ["SigmoidThen1x1", "SigmoidThen3x3"])
def test_without_verify_offsets_are_frozen_not_wrong(name):
    result, error, messages = cut(name, verify=False)
    assert error < 1e-9 and "verify=False" in messages and result.verification is None


def test_a_folded_bias_replays_with_the_plan():
    result, _, _ = cut("AffineFreeBN")
    fresh = segprune.Plan.from_json(result.plan.to_json()).apply(SOUNDNESS["AffineFreeBN"]().double().eval())
    fresh.load_state_dict(result.model.state_dict())
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    assert torch.equal(outputs(fresh, x)[0], outputs(result.model, x)[0])
