"""`prune` verifies its own result: a wrong rule is caught, the offending group frozen with a warning, and the
model that comes back equals the masked model of what was actually removed."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segprune
from segprune.prune import rules
from segprune.prune.oracle import masked_copy, outputs, relative_error
from tests.conftest import randomize_norms
from tests.zoo import cbr


class Seg(nn.Module):
    """A SegNet stage: the decoder unpools with the encoder's pooling indices."""

    def __init__(self):
        super().__init__()
        self.enc, self.mid, self.other = cbr(3, 8), cbr(8, 8), cbr(3, 8)
        self.dec, self.side = nn.Conv2d(8, 2, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e = self.enc(x)
        p, idx = F.max_pool2d(e, 2, return_indices=True)
        up = F.max_unpool2d(self.mid(p), idx, 2, output_size=e.shape[-2:])
        return self.dec(up) + self.side(self.other(x))


def _unpool_without_indices(st, args, kwargs, out):
    """The autograd tracer's mistake: the indices' channels are not coupled with the unpooled input's."""
    st.set(out, st.get(args[0]).ids, 1)


def exact(model, x, result):
    masked = outputs(masked_copy(model, result.groups, result.removed), x)
    return relative_error(masked, outputs(result.model, x))


def test_a_broken_rule_is_caught_frozen_and_named(monkeypatch):
    monkeypatch.setitem(rules.RULES, "max_unpool2d", _unpool_without_indices)
    model, x = randomize_norms(Seg()).double().eval(), torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"verify: .*(enc|mid).*not exact.*frozen") as caught:
        result = segprune.prune(model, x, ratio=0.5, criterion="random")
    frozen = {m for entry in result.verification.frozen for m in entry["modules"]}
    assert {"enc.0", "mid.0"} & frozen and "other.0" not in frozen
    assert any("fails" in str(w.message) for w in caught)  # the broken rule makes the pruned model crash
    assert result.channels_removed > 0 and exact(model, x, result) < 1e-6
    assert result.verification.error < 1e-6 and result.verification.checks > 1


def _cat_in_reverse(st, args, kwargs, out):
    """A wrong rule that still gives consistent shapes: the parts' channels in the wrong order."""
    st.set(out, np.concatenate([st.get(t).ids for t in args[0]][::-1]), 1)


def test_a_value_mismatch_is_caught(monkeypatch):
    monkeypatch.setitem(rules.RULES, "cat", _cat_in_reverse)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.other = cbr(3, 8), cbr(3, 8), nn.Conv2d(16, 2, 1), cbr(3, 8)
            self.side = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], 1)) + self.side(self.other(x))

    model, x = randomize_norms(Two()).double().eval(), torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match="differs from the masked model"):
        result = segprune.prune(model, x, ratio=0.5, criterion="random")
    frozen = [e["modules"] for e in result.verification.frozen]
    assert ["a.0", "a.1", "b.0", "b.1", "c"] in frozen and not any("other.0" in m for m in frozen)
    assert exact(model, x, result) < 1e-6


def test_exact_models_are_checked_once_and_nothing_is_frozen():
    model, x = randomize_norms(Seg()).eval(), torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = segprune.prune(model, x, ratio=0.5, criterion="random")
    v = result.verification
    assert v.checked and v.checks == 1 and not v.frozen and v.error < 1e-9 and v.dtype == "float64"
    assert next(result.model.parameters()).dtype == torch.float32  # the check ran on copies


def test_verify_runs_train_only_heads_and_keyword_inputs_and_restores_modes():
    from tests.test_engine import KwargsTuple, WithAux

    model, x = randomize_norms(WithAux()).train(), torch.randn(2, 3, 8, 8)
    result = segprune.prune(model, x, ratio=0.4, criterion="l1")
    assert result.verification.modes == ("train",) and not result.verification.frozen  # train covers eval's ops
    assert model.training and all(m.training for m in model.modules())

    class EvalSoftmax(WithAux):
        def forward(self, x):
            out = super().forward(x)
            return out if self.training else {"out": out["out"].softmax(1)}

    result = segprune.prune(randomize_norms(EvalSoftmax()), x, ratio=0.4, criterion="l1")
    assert result.verification.modes == ("eval", "train")
    result = segprune.prune(KwargsTuple().eval(), {"image": x, "scale": 2.0}, ratio=0.4, criterion="l1")
    assert result.verification.modes == ("eval",) and result.verification.checks == 1


def test_verify_false_skips_the_check():
    model, x = Seg().eval(), torch.randn(1, 3, 8, 8)
    assert segprune.prune(model, x, ratio=0.5, verify=False).verification is None
    assert np.isfinite(segprune.prune(model, x, ratio=0.5).verification.error)


def test_compensate_folds_what_slimmed_channels_still_emit():
    """After slimming, a channel with gamma ~ 0 emits ReLU(beta): compensate keeps it in the consumer's bias."""
    model, x = randomize_norms(Seg()).eval(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model.other[1].weight[:4] = 1e-4  # slimmed: these four are the ones bn_scale removes
        model.other[1].bias[:4] = torch.tensor([0.5, 1.0, -0.5, 2.0])
    plain = segprune.prune(model, x, ratio=0.17, criterion="bn_scale")
    kept = segprune.prune(model, x, ratio=0.17, criterion="bn_scale", compensate=True)
    assert kept.removed.keys() == plain.removed.keys()
    assert all(np.array_equal(kept.removed[g], plain.removed[g]) for g in plain.removed)
    assert "side" in kept.verification.compensated and kept.verification.error < 1e-6
    reference = model(x)
    assert (kept.model(x) - reference).abs().max() < 1e-2 * (plain.model(x) - reference).abs().max()
    fresh = segprune.Plan.from_json(kept.plan.to_json()).apply(Seg().eval())
    fresh.load_state_dict(kept.model.state_dict())
    assert torch.equal(fresh(x), kept.model(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_pruned_model_shares_no_tensor_with_the_original(dtype):
    # the checked copy shares the original's tensors until surgery or the float64 conversion replaces them; what a
    # float64 model keeps uncut must still be copied, or training the pruned model would change the original
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 3, 1), cbr(3, 8), cbr(8, 8), nn.Conv2d(8, 2, 1)))
    model = model.to(dtype).eval()
    before = [t.detach().clone() for t in model.state_dict().values()]
    result = segprune.prune(model, torch.randn(1, 3, 8, 8, dtype=dtype), ratio=0.5, criterion="l1", ignore=["0"])
    assert result.model[0].weight.shape == model[0].weight.shape  # a layer kept whole
    assert result.channels_removed > 0
    originals = {t.data_ptr() for t in model.state_dict().values() if t.numel()}
    assert not [n for n, t in result.model.state_dict().items() if t.data_ptr() in originals]
    with torch.no_grad():
        for t in result.model.parameters():
            t.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))
