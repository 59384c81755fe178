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
          "IntSplit": "split",
          "GatedSigmoid": "sigmoid"}


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


def test_a_saved_shape_is_followed_not_frozen():
    """Issue #23: the shape read before the projection sizes the reshape after it; the trace ties the projection's
    width to the stem's, so both are cut in step and verification has nothing to freeze."""
    result, error, messages = cut("SavedShape")
    widths = {m.module: len(m.index) for g in result.groups if g.id in result.removed for m in g.members}
    assert error < 1e-9 and not result.verification.frozen and "frozen" not in messages
    assert result.model.proj.out_features == result.model.stem[0].out_channels < 16 and "proj" in widths


@pytest.mark.parametrize("name", ["SigmoidThen1x1", "SigmoidThen3x3", "GatedSigmoid"])
def test_without_verify_offsets_are_frozen_not_wrong(name):
    result, error, messages = cut(name, verify=False)
    assert error < 1e-9 and "verify=False" in messages and result.verification is None


def test_a_folded_bias_replays_with_the_plan():
    result, _, _ = cut("AffineFreeBN")
    fresh = segprune.Plan.from_json(result.plan.to_json()).apply(SOUNDNESS["AffineFreeBN"]().double().eval())
    fresh.load_state_dict(result.model.state_dict())
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    assert torch.equal(outputs(fresh, x)[0], outputs(result.model, x)[0])


@pytest.mark.parametrize("name", ["ConvNeXtTiny", "ConvNeXtConvMLP"])
def test_convnext_hidden_channels_are_exact_and_the_stream_waits_for_allow_approximate(name):
    from tests.zoo import MODERN

    torch.manual_seed(0)
    model = randomize_norms(MODERN[name]()).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exact = segprune.prune(model, x, ratio=0.5, criterion="random")
    messages = " | ".join(str(w.message) for w in caught)
    assert "unsupported weight or layout" not in messages and "allow_approximate=('layer_norm',)" in messages
    hidden = [g for g in exact.groups if "stage1.0.fc1" in g.modules("out")]
    assert hidden and hidden[0].prunable.all() and not exact.verification.frozen
    masked = outputs(masked_copy(model, exact.groups, exact.removed), x)
    assert relative_error(masked, outputs(exact.model, x)) < 1e-9

    loose = segprune.prune(model, x, ratio=0.5, criterion="random", allow_approximate=("layer_norm",))
    assert loose.channels_prunable > exact.channels_prunable and loose.verification.approximate
    assert loose.verification.error > loose.verification.tolerance  # measured, reported, not frozen
    assert loose.model.stage1[0].gamma.numel() < 8 and loose.model.stage1[0].norm.weight.numel() < 8
    fresh = segprune.Plan.from_json(loose.plan.to_json()).apply(MODERN[name]().double().eval())
    fresh.load_state_dict(loose.model.state_dict())
    assert torch.equal(outputs(fresh, x)[0], outputs(loose.model, x)[0])


def cut_attention(model):
    """Random 50 % of a float64 token-attention model: (result, error against the masked model, warnings)."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = segprune.prune(model, x, ratio=0.5, criterion="random")
    masked = outputs(masked_copy(model, result.groups, result.removed, result.plan.replace), x)
    return result, relative_error(masked, outputs(result.model, x)), [str(w.message) for w in caught]


@pytest.mark.parametrize("kind", ["sdpa", "explicit", "mha"])
def test_attention_is_exact_or_frozen_with_a_warning(kind):
    from tests.zoo import ATTENTION

    torch.manual_seed(0)
    result, error, messages = cut_attention(randomize_norms(ATTENTION[f"Attention_{kind}"]()).double().eval())
    assert error < 1e-9
    hidden = next(g for g in result.groups if "fc1" in g.modules("out"))
    assert hidden.prunable.all() and hidden.id in result.removed  # the MLP still prunes
    stream = next(g for g in result.groups if "stem.0" in g.modules("out"))
    assert not messages and stream.prunable.all()
    if kind == "mha":  # swapped for SplitMultiheadAttention: heads and the stream are cut independently
        assert result.plan.replace == {"attn": "torch.nn.MultiheadAttention"} and len(stream.prunable) == 16
    else:  # `c // self.heads` and `reshape(b, n, c)` read the stream's width: whole heads go with 8 stream channels
        assert len(stream.prunable) == 2


@pytest.mark.parametrize("kind", ["sdpa", "explicit"])
def test_heads_sized_from_the_input_width_are_cut_and_replayed(kind):
    """Issue #23: the head size comes from the input's shape and the head count from an attribute named `heads`:
    one of two heads is cut with the stream channels it is tied to, `heads` is rewritten, and the plan replays."""
    from tests.zoo import ATTENTION

    torch.manual_seed(0)
    model = randomize_norms(ATTENTION[f"Attention_{kind}"]()).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    result = segprune.prune(model, x, ratio=0.5, criterion="random", select="uniform")
    masked = outputs(masked_copy(model, result.groups, result.removed), x)
    assert relative_error(masked, outputs(result.model, x)) < 1e-9 and not result.verification.frozen
    assert result.model.heads == 1 and result.model.stem[0].out_channels == 8 and result.model.proj.in_features == 8
    fresh = segprune.Plan.from_json(result.plan.to_json()).apply(ATTENTION[f"Attention_{kind}"]().double().eval())
    fresh.load_state_dict(result.model.state_dict())
    assert fresh.heads == 1 and torch.equal(outputs(fresh, x)[0], outputs(result.model, x)[0])


@pytest.mark.parametrize("kind, attributes", [("inferred", ()),
                                              ("attributes", ("num_attention_heads", "all_head_size")),
                                              ("features", ("num_heads",))])
def test_attention_heads_and_features_are_cut_exactly(kind, attributes):
    """Whole heads (head count inferred, or held in attributes that are rewritten) or features inside every head
    (explicit scale): q, k, v and the output projection lose the same ones, and the model equals the masked one."""
    from tests.zoo import HEADS

    torch.manual_seed(0)
    model = randomize_norms(HEADS[f"Heads_{kind}"]()).double().eval()
    result, error, messages = cut_attention(model)
    assert error < 1e-9 and not [m for m in messages if "frozen" in m]
    qk = next(g for g in result.groups if "q" in g.modules("out"))
    v = next(g for g in result.groups if "v" in g.modules("out"))
    assert qk.prunable.all() and v.prunable.all() and not result.verification.frozen
    assert len(qk.prunable) == len(v.prunable) == 4  # 4 heads, or 4 features coupled over the 4 heads
    assert set(qk.modules("out")) == ({"q", "k"} if kind == "features" else {"q", "k", "v"})
    assert v.modules("in") == ["proj"]
    q = result.model.q.out_features
    assert q < 16 and q % 4 == 0  # whole heads of 4 features, or 4 heads of fewer features
    expected = {"num_attention_heads": q // 4, "all_head_size": q, "num_heads": 4}
    assert {name: getattr(result.model, name) for name in attributes} == {n: expected[n] for n in attributes}
    fresh = segprune.Plan.from_json(result.plan.to_json()).apply(HEADS[f"Heads_{kind}"]().double().eval())
    fresh.load_state_dict(result.model.state_dict())
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(outputs(fresh, x)[0], outputs(result.model, x)[0])


def test_sdpa_default_scale_freezes_query_key_features_with_a_warning():
    """Cutting q/k features changes SDPA's default scale 1/sqrt(E): frozen, said, and the value features still cut."""
    from tests.zoo import HEADS

    model = HEADS["Heads_features"]().double().eval()
    model.scale = None  # SDPA's default
    result, error, messages = cut_attention(model)
    assert error < 1e-9 and any("default scale" in m for m in messages)
    qk = next(g for g in result.groups if "q" in g.modules("out"))
    v = next(g for g in result.groups if "v" in g.modules("out"))
    assert not qk.prunable.any() and v.prunable.all() and set(qk.modules("out")) == {"q", "k"}


@pytest.mark.parametrize("name, attr", [("AttrSplit", "width"), ("ListSplit", "splits")])
def test_split_sizes_held_in_an_attribute_are_rewritten(name, attr):
    from tests.zoo import ZOO

    torch.manual_seed(0)
    model = randomize_norms(ZOO[name]()).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    result = segprune.prune(model, x, ratio=0.5, criterion="random")
    stem = next(g for g in result.groups if "stem.0" in g.modules("out"))
    assert stem.prunable.all() and stem.id in result.removed and not result.verification.frozen
    assert getattr(result.model, attr) != getattr(model, attr)
    masked = outputs(masked_copy(model, result.groups, result.removed), x)
    assert relative_error(masked, outputs(result.model, x)) < 1e-9
    fresh = segprune.Plan.from_json(result.plan.to_json()).apply(ZOO[name]().double().eval())
    fresh.load_state_dict(result.model.state_dict())
    assert getattr(fresh, attr) == getattr(result.model, attr)


def test_a_single_head_loses_features_with_its_head_size_rewritten():
    """transformers' SegFormer stage 1: one head, `view(.., -1, head_dim)`: features are cut in q, k, v alike and
    `head_dim` follows; without that attribute they are frozen with a warning."""
    from tests.zoo import HeadAttention

    torch.manual_seed(0)
    model = randomize_norms(HeadAttention(kind="inferred", heads=1)).double().eval()
    result, error, messages = cut_attention(model)
    assert error < 1e-9 and not result.verification.frozen
    assert result.model.head_dim == result.model.q.out_features == result.model.v.out_features < 16

    fixed = type("FixedHead", (HeadAttention,), {"head_dim": 16})(kind="inferred", heads=1)
    del fixed.head_dim  # the class's constant now: nothing on the module for the plan to rewrite
    result, error, messages = cut_attention(randomize_norms(fixed).double().eval())
    assert error < 1e-9 and any("the only attention head" in m for m in messages)
