"""Unit tests of the engine: tracing hygiene, rules peers get wrong, errors, criteria, regulariser."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segprune
from segprune.prune.criteria import bn_scale, l1
from tests.conftest import randomize_norms
from tests.zoo import ZOO, AttentionGate, GroupNormDecoder, cbr


class WithAux(nn.Module):
    """An auxiliary head that runs only in training mode, on a mid-level feature."""

    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(8, 8)
        self.cls, self.aux = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        mid = self.a(x)
        out = {"out": self.cls(self.b(mid))}
        if self.training:
            out["aux"] = self.aux(mid)
        return out


class KwargsTuple(nn.Module):
    """Forward needs a keyword argument and returns a tuple."""

    def __init__(self):
        super().__init__()
        self.a, self.cls = cbr(3, 8), nn.Conv2d(8, 2, 1)

    def forward(self, image, *, scale=1.0):
        y = self.a(image) * scale
        out = self.cls(y)
        return out, out.mean()


def groups_of(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return segprune.channel_groups(model, x, **kw)


def group_with(groups, module, role="out"):
    return next(g for g in groups if any(m.module == module and m.role == role for m in g.members))


def test_trace_leaves_weights_stats_and_modes_untouched():
    model = randomize_norms(WithAux())
    model.train()
    model.b[1].eval()  # a mixed-mode model must come back mixed
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    groups_of(model, torch.randn(1, 3, 16, 16))
    assert [m.training for m in model.modules()] == modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_train_only_aux_head_is_traced_and_pruned():
    model, x = randomize_norms(WithAux()), torch.randn(2, 3, 16, 16)
    result = segprune.prune(model, x, ratio=0.5, criterion="l1")
    assert "aux" in result.plan.modules and "in" in result.plan.modules["aux"]
    pruned = result.model.train()
    assert pruned(x)["aux"].shape == (2, 2, 16, 16)


def test_unknown_op_freezes_and_warns_with_op_and_module():
    model = ZOO["UnknownOp"]()
    with pytest.warns(UserWarning, match="roll"):
        groups = segprune.channel_groups(model, torch.randn(1, 3, 8, 8))
    assert group_with(groups, "b.0").frozen
    assert "roll" in group_with(groups, "b.0").reason
    assert not group_with(groups, "a.0").frozen  # untouched layers stay prunable


def test_size_one_gate_broadcast_couples_nothing():
    groups = groups_of(AttentionGate(), torch.randn(1, 3, 8, 8))
    body = group_with(groups, "body.0")
    assert "spatial" not in body.modules("out")
    assert body.size == 12 and body.prunable.all()


def test_group_norm_channels_go_in_whole_groups():
    model, x = randomize_norms(GroupNormDecoder()), torch.randn(1, 3, 16, 16)
    result = segprune.prune(model, x, ratio=0.5, criterion="random")
    gn = result.model.dec1[1]
    assert gn.num_groups < 4 and gn.num_channels == 4 * gn.num_groups


def test_segnet_unpool_couples_indices_with_their_pool():
    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.mid, self.dec = cbr(3, 8), cbr(8, 8), cbr(8, 2)

        def forward(self, x):
            e = self.enc(x)
            p, idx = F.max_pool2d(e, 2, return_indices=True)
            return self.dec(F.max_unpool2d(self.mid(p), idx, 2, output_size=e.shape[-2:]))

    groups = groups_of(Seg(), torch.randn(1, 3, 8, 8))
    assert "mid.0" in group_with(groups, "enc.0").modules("out")


def test_kwargs_and_tuple_outputs():
    model = randomize_norms(KwargsTuple())
    inputs = {"image": torch.randn(1, 3, 8, 8), "scale": 2.0}
    result = segprune.prune(model, inputs, ratio=0.5, criterion="l1")
    assert result.channels_removed == 4
    assert result.model(**inputs)[0].shape == (1, 2, 8, 8)


def test_ignore_keeps_a_layers_channels():
    model, x = randomize_norms(WithAux()), torch.randn(1, 3, 8, 8)
    result = segprune.prune(model, x, ratio=0.5, criterion="l1", ignore=("a",))
    assert result.model.a[0].out_channels == 8 and result.model.b[0].out_channels < 8


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"ratio": 0.5, "ignore": ("nope",)}, "nope"),
    ({"ratio": 0.5, "criterion": "bogus"}, "bogus"), ({"ratio": 0.5, "method": "bogus"}, "bogus"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        segprune.prune(WithAux(), torch.randn(1, 3, 8, 8), **kwargs)


def test_no_prunable_channel_is_an_error():
    with pytest.raises(ValueError, match="no prunable channel"):
        segprune.prune(nn.Conv2d(3, 2, 1), torch.randn(1, 3, 4, 4), ratio=0.5)


def test_prune_does_not_touch_the_original():
    model = randomize_norms(WithAux())
    before = copy.deepcopy(model.state_dict())
    segprune.prune(model, torch.randn(1, 3, 8, 8), ratio=0.5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_plan_that_does_not_fit_is_refused_by_name():
    model, x = randomize_norms(WithAux()), torch.randn(1, 3, 8, 8)
    plan = segprune.prune(model, x, ratio=0.5, criterion="l1").plan
    other = WithAux()
    other.b[0] = nn.Conv2d(8, 6, 3, padding=1)
    with pytest.raises(ValueError, match="'b.0'"):
        plan.apply(other)
    with pytest.raises(ValueError, match="not a segprune plan"):
        segprune.Plan.from_json('{"modules": {}}')


def test_bn_scale_and_l1_rank_hand_set_magnitudes():
    model = WithAux()
    groups = groups_of(model, torch.randn(1, 3, 8, 8))
    group = group_with(groups, "a.0")
    with torch.no_grad():
        model.a[1].weight.copy_(torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 1.0, 0.05, 4.0]))
        model.a[0].weight.copy_(torch.arange(8.0).view(8, 1, 1, 1).expand_as(model.a[0].weight))
    order = [m.index for m in group.members if m.module == "a.1"][0]
    assert list(order[np.argsort(bn_scale(group, model))]) == [6, 2, 4, 0, 5, 3, 1, 7]
    assert list(np.argsort(l1(group, model))) == list(range(8))


def test_global_threshold_removes_the_smallest_gammas():
    model = randomize_norms(WithAux())
    with torch.no_grad():
        model.a[1].weight.copy_(torch.tensor([1.0, 1e-3, 1.0, 1e-3, 1.0, 1.0, 1.0, 1.0]))
        model.b[1].weight.fill_(1.0)
    result = segprune.prune(model, torch.randn(1, 3, 8, 8), ratio=2 / 16)
    assert result.plan.modules["a.1"]["out"] == [0, 2, 4, 5, 6, 7]
    assert "b.1" not in result.plan.modules


def test_bn_sparsity_adds_exactly_lambda_sign_gamma():
    model = randomize_norms(WithAux())
    with torch.no_grad():
        model.a[1].weight[0] = -0.7
    out = model(torch.randn(2, 3, 8, 8))
    (out["out"].sum() + out["aux"].sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    segprune.BNSparsity(model, lam=1e-3)(model)
    for name, p in model.named_parameters():
        expected = grads[name] + (1e-3 * torch.sign(p) if name.endswith("1.weight") else 0)
        assert torch.allclose(p.grad, expected, atol=0, rtol=0), name
    assert model.a[1].weight.grad[0] == grads["a.1.weight"][0] - 1e-3


def test_oracle_catches_a_missed_coupling():
    """What an autograd tracer does to SegNet: prune the unpooled layer without its indices' pool."""
    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.mid, self.dec = cbr(3, 8), cbr(8, 8), nn.Conv2d(8, 2, 3, padding=1)

        def forward(self, x):
            e = self.enc(x)
            p, idx = F.max_pool2d(e, 2, return_indices=True)
            return self.dec(F.max_unpool2d(self.mid(p), idx, 2, output_size=e.shape[-2:]))

    from segprune.prune.oracle import masked_copy, outputs, relative_error

    model, x = randomize_norms(Seg()).double().eval(), torch.randn(1, 3, 8, 8, dtype=torch.float64)
    groups = groups_of(model, x)
    removed = {group_with(groups, "enc.0").id: np.array([1, 5])}
    good = segprune.Plan.from_removal(model, groups, removed)
    wrong = copy.deepcopy(good)
    wrong.modules["mid.0"]["out"] = [0, 1, 2, 3, 4, 6]  # the decoder side loses other channels than the encoder
    wrong.modules["mid.1"]["out"] = [0, 1, 2, 3, 4, 6]
    masked = outputs(masked_copy(model, groups, removed), x)
    assert relative_error(masked, outputs(good.apply(copy.deepcopy(model)), x)) < 1e-6
    assert relative_error(masked, outputs(wrong.apply(copy.deepcopy(model)), x)) > 1e-3


def test_two_prunings_compose_into_one_plan():
    model, x = randomize_norms(WithAux()).eval(), torch.randn(1, 3, 8, 8)
    first = segprune.prune(model, x, ratio=0.25, criterion="l1")
    second = segprune.prune(first.model, x, ratio=0.3, criterion="l1")
    fresh = first.plan.then(second.plan).apply(WithAux())
    fresh.load_state_dict(second.model.state_dict())
    fresh.eval()
    assert torch.equal(fresh(x)["out"], second.model(x)["out"])


def test_shape_only_trace_finds_the_same_groups_as_a_real_run():
    from tests.zoo import ZOO

    model, x = randomize_norms(ZOO["SplitSliceLinear"]()), torch.randn(1, 3, 16, 16)
    fast, real = groups_of(model, x), groups_of(model, x, shape_only=False)
    key = lambda gs: sorted((g.size, tuple(g.prunable), tuple(f"{m.module}.{m.role}" for m in g.members)) for g in gs)  # noqa: E731
    assert key(fast) == key(real) and fast.total_macs == real.total_macs
