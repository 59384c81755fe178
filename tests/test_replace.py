"""Issue #23: nn.MultiheadAttention is swapped for an equivalent prunable module, recorded in the plan, replayed."""

import itertools
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segprune
from segprune.checkpoint import load_plan, load_weights, save
from segprune.prune.oracle import masked_copy, outputs, relative_error
from segprune.prune.replace import SplitMultiheadAttention
from tests.conftest import randomize_norms
from tests.zoo import ScaledStdConv, StdConv, cbr


def _inputs(batch_first, cross, kv_dims):
    torch.manual_seed(1)
    n, length, source, e = 2, 5, 7 if cross else 5, 8
    lay = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
    q = lay(torch.randn(n, length, e, dtype=torch.float64))
    k = lay(torch.randn(n, source, kv_dims[0] if kv_dims else e, dtype=torch.float64))
    v = lay(torch.randn(n, source, kv_dims[1] if kv_dims else e, dtype=torch.float64))
    return q, (k, v) if cross or kv_dims else (q, q), n, length, source


MASKS = {"none": lambda n, m, s: {},
         "padding": lambda n, m, s: {"key_padding_mask": torch.arange(s).expand(n, s) >= s - 2},
         "bool": lambda n, m, s: {"attn_mask": torch.ones(m, s, dtype=torch.bool).triu(1 + s - m)},
         "float3d": lambda n, m, s: {"attn_mask": torch.randn(n * 2, m, s, dtype=torch.float64)},
         "both": lambda n, m, s: {"attn_mask": torch.randn(m, s, dtype=torch.float64),
                                  "key_padding_mask": torch.arange(s).expand(n, s) >= s - 1}}


@pytest.mark.parametrize("batch_first, kv_dims, mask, need_weights, average",
                         [(bf, kv, m, w, a) for bf, kv, m, (w, a) in itertools.product(
                             [True, False], [None, (6, 4)], sorted(MASKS), [(False, True), (True, True),
                                                                            (True, False)])])
def test_the_split_module_computes_what_multihead_attention_computes(batch_first, kv_dims, mask, need_weights,
                                                                       average):
    torch.manual_seed(0)
    kdim, vdim = kv_dims or (None, None)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=vdim).double().eval()
    split = SplitMultiheadAttention(mha).eval()
    q, (k, v), n, length, source = _inputs(batch_first, False, kv_dims)
    masks = MASKS[mask](n, length, source)
    want = mha(q, k, v, need_weights=need_weights, average_attn_weights=average, **masks)
    got = split(q, k, v, need_weights=need_weights, average_attn_weights=average, **masks)
    assert torch.allclose(want[0], got[0], atol=1e-12, equal_nan=True)
    assert (want[1] is None) == (got[1] is None)
    if want[1] is not None:
        assert want[1].shape == got[1].shape and torch.allclose(want[1], got[1], atol=1e-12, equal_nan=True)


def test_unbatched_inputs_and_no_bias():
    mha = nn.MultiheadAttention(8, 4, bias=False).double().eval()
    x = torch.randn(5, 8, dtype=torch.float64)
    want, got = mha(x, x, x), SplitMultiheadAttention(mha)(x, x, x)
    assert torch.allclose(want[0], got[0], atol=1e-12) and torch.allclose(want[1], got[1], atol=1e-12)


def test_what_the_split_module_does_not_compute_is_not_replaced():
    assert SplitMultiheadAttention.of(nn.MultiheadAttention(8, 2, add_bias_kv=True)) is None
    assert SplitMultiheadAttention.of(nn.MultiheadAttention(8, 2, add_zero_attn=True)) is None


class MHANet(nn.Module):
    """conv stem -> tokens -> nn.MultiheadAttention (self, with a padding mask) + MLP -> NCHW; a DETR-style decoder
    with learned queries cross-attending to the tokens is the second head."""

    def __init__(self, batch_first=True, dim=16, heads=4):
        super().__init__()
        self.batch_first = batch_first
        self.stem = cbr(3, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.queries = nn.Embedding(3, dim)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.cls, self.box = nn.Conv2d(dim, 3, 1), nn.Linear(dim, 4)

    def forward(self, x):
        y = self.stem(x)
        b, c, h, w = y.shape
        t = y.flatten(2).transpose(1, 2)
        pad = torch.zeros(b, h * w, dtype=torch.bool)
        pad[:, -1] = True
        lay = (lambda s: s) if self.batch_first else (lambda s: s.transpose(0, 1))
        t = t + lay(self.attn(lay(t), lay(t), lay(t), key_padding_mask=pad)[0])
        t = t + self.fc2(F.gelu(self.fc1(t)))
        q = self.queries.weight.unsqueeze(0).expand(b, -1, -1)
        found = lay(self.cross(lay(q), lay(t), lay(t), need_weights=False)[0])
        return self.cls(t.transpose(1, 2).reshape(b, c, h, w)), self.box(found)


def _random_cut(net: nn.Module, shape=(2, 3, 4, 4)):
    """`net` (norms randomised, float64) pruned by half in each group at random, its input, and segprune's warnings."""
    torch.manual_seed(0)
    model, x = randomize_norms(net).double().eval(), torch.randn(*shape, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = segprune.prune(model, x, ratio=0.5, criterion="random", select="uniform")
    return model, x, result, [str(w.message) for w in caught if "segprune" in str(w.message)]


def _pruned(batch_first):
    return _random_cut(MHANet(batch_first))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_in_a_conv_net_is_pruned_by_whole_heads_exactly(batch_first):
    model, x, result, messages = _pruned(batch_first)
    assert result.plan.replace == {"attn": "torch.nn.MultiheadAttention", "cross": "torch.nn.MultiheadAttention"}
    assert not messages and not result.verification.frozen
    attn = result.model.attn
    assert isinstance(attn, SplitMultiheadAttention) and attn.num_heads == 2 and attn.q.out_features == 8
    masked = outputs(masked_copy(model, result.groups, result.removed, result.plan.replace), x)
    assert relative_error(masked, outputs(result.model, x)) < 1e-9
    assert isinstance(model.attn, nn.MultiheadAttention)  # the user's model is left as it was


def test_a_replaced_module_replays_from_the_plan_and_its_checkpoint_loads_without_pickle(tmp_path):
    _, x, result, _ = _pruned(True)
    assert json.loads(result.plan.to_json())["format"] == "segprune.plan/3"
    save(tmp_path / "ckpt", result.model, config={"model": "MHANet"}, plan=result.plan)
    fresh = load_plan(tmp_path / "ckpt").apply(MHANet().double().eval())
    fresh.load_state_dict(load_weights(tmp_path / "ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(outputs(fresh, x), outputs(result.model, x)))
    again = segprune.Plan.from_json(result.plan.to_json())
    with pytest.raises(ValueError, match="'attn'"):
        again.apply(nn.Sequential())


def test_the_pruned_model_exports_to_onnx_with_onnxruntime_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    from segprune.export.onnx import export_onnx

    _, _, result, _ = _pruned(True)
    model = result.model.float().eval()
    report = export_onnx(model, torch.randn(2, 3, 4, 4), tmp_path / "m.onnx", dynamic=False, check=True)
    assert report["max_abs_diff"] < 1e-4


class MaskPredictor(nn.Module):
    """Mask2Former's mask predictor: query embeddings against the pixel tokens, repeated once per head of the masked
    cross-attention (`repeat(1, self.num_heads, 1, 1)`, the count an attribute of its own)."""

    def __init__(self, dim, heads, boolean):
        super().__init__()
        self.num_heads, self.boolean, self.embed = heads, boolean, nn.Linear(dim, dim)

    def forward(self, queries, tokens):
        logits = torch.einsum("bqc,bnc->bqn", self.embed(queries), tokens)
        mask = logits.sigmoid().unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1)
        if not self.boolean:
            return mask * -4.0
        mask = mask < 0.5
        return mask & (mask.sum(-1, keepdim=True) != mask.shape[-1])  # a query may not mask out every token


class MaskedCrossNet(nn.Module):
    """Learned queries cross-attending to a conv net's pixel tokens under a per-head mask the queries predict."""

    def __init__(self, boolean, dim=16, heads=4):
        super().__init__()
        self.stem, self.queries = cbr(3, dim), nn.Linear(dim, dim)
        self.predictor = MaskPredictor(dim, heads, boolean)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.box = nn.Linear(dim, 4)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        q = self.queries(t[:, :3])
        return self.box(self.cross(q, t, t, attn_mask=self.predictor(q, t), need_weights=False)[0])


@pytest.mark.parametrize("boolean", [True, False])
def test_a_mask_repeated_per_head_from_an_attribute_is_cut_with_the_heads(boolean):
    model, x, result, messages = _random_cut(MaskedCrossNet(boolean))
    assert not messages and not result.verification.frozen
    assert result.model.cross.num_heads == result.model.predictor.num_heads == 2  # the repeat follows the heads
    masked = outputs(masked_copy(model, result.groups, result.removed, result.plan.replace), x)
    assert relative_error(masked, outputs(result.model, x)) < 1e-9


class FixedSizeNet(nn.Module):
    """nn.MultiheadAttention over the tokens of a 64x64 image, then a linear layer over all of them: the model runs on
    its input size only, so the swap is checked on the full inputs, not on a crop."""

    def __init__(self, dim=8):
        super().__init__()
        self.stem = nn.Sequential(cbr(3, dim), nn.MaxPool2d(8))
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head = nn.Linear(64 * dim, 4)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        return self.head((t + self.attn(t, t, t)[0]).flatten(1))


def test_a_model_of_a_fixed_input_size_is_swapped_checking_the_full_inputs():
    model, x, result, messages = _random_cut(FixedSizeNet(), (1, 3, 64, 64))
    assert result.plan.replace == {"attn": "torch.nn.MultiheadAttention"}
    assert not any("not replaced" in m for m in messages)
    assert result.model.attn.num_heads == 1
    masked = outputs(masked_copy(model, result.groups, result.removed, result.plan.replace), x)
    assert relative_error(masked, outputs(result.model, x)) < 1e-9


class TransformerNet(nn.Module):
    """A conv stem, nn.TransformerEncoderLayer over its tokens and an nn.TransformerDecoder of learned queries
    (DETR): every attention inside is an nn.MultiheadAttention."""

    def __init__(self, dim=16):
        super().__init__()
        self.stem = cbr(3, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, 4, 32, dropout=0.0, batch_first=True)
        layer = nn.TransformerDecoderLayer(dim, 4, 32, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, 2)
        self.queries = nn.Parameter(torch.randn(1, 3, dim))
        self.box = nn.Linear(dim, 4)

    def forward(self, x):
        t = self.encoder(self.stem(x).flatten(2).transpose(1, 2))
        return self.box(self.decoder(self.queries.expand(x.shape[0], -1, -1), t))


def test_transformer_layers_take_the_split_attention_and_prune_exactly():
    model, x, result, messages = _random_cut(TransformerNet())
    assert not any("not replaced" in m for m in messages)
    assert set(result.plan.replace) == {"encoder.self_attn", "decoder.layers.0.self_attn",
                                        "decoder.layers.0.multihead_attn", "decoder.layers.1.self_attn",
                                        "decoder.layers.1.multihead_attn"}
    assert result.model.encoder.self_attn.num_heads == 2 and not result.verification.frozen
    masked = outputs(masked_copy(model, result.groups, result.removed, result.plan.replace), x)
    assert relative_error(masked, outputs(result.model, x)) < 1e-9


class MixAttention(nn.Module):
    """smp's Mix-Transformer attention as its code reads (the head size computed from the input's width); the
    replacement registry knows it by its qualified name, which this copy takes."""

    def __init__(self, dim=16, num_heads=2, sr_ratio=2):
        super().__init__()
        self.dim, self.num_heads, self.sr_ratio = dim, num_heads, sr_ratio
        self.scale = (dim // num_heads) ** -0.5
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = nn.Dropout(0.0), nn.Dropout(0.0)
        self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio) if sr_ratio > 1 else nn.Identity()
        self.norm = nn.LayerNorm(dim) if sr_ratio > 1 else nn.Identity()

    def forward(self, x, height, width):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, c // self.num_heads).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            x_ = self.sr(x.permute(0, 2, 1).reshape(b, c, height, width)).reshape(b, c, -1).permute(0, 2, 1)
            x = self.norm(x_)
        kv = self.kv(x).reshape(b, -1, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop(((q @ kv[0].transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ kv[1]).transpose(1, 2).reshape(b, n, c)))


MixAttention.__module__, MixAttention.__qualname__ = "segmentation_models_pytorch.encoders.mix_transformer", "Attention"


class MixNet(nn.Module):
    def __init__(self, heads):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, 16, 3, padding=1), nn.LayerNorm(16)
        self.attn, self.cls = MixAttention(16, heads), nn.Conv2d(16, 3, 1)

    def forward(self, x):
        y = self.stem(x)
        b, c, h, w = y.shape
        t = self.norm(y.flatten(2).transpose(1, 2))
        t = t + self.attn(t, h, w)
        return self.cls(t.transpose(1, 2).reshape(b, c, h, w))


@pytest.mark.parametrize("heads", [1, 2])
def test_smp_mix_transformer_attention_is_swapped_and_its_heads_cut(heads):
    """The stream is LayerNorm-normalised (frozen), so `C // self.num_heads` would freeze the heads with it: the
    swap holds the head size in `head_dim`, and heads (or one head's features) are cut."""
    torch.manual_seed(0)
    model = randomize_norms(MixNet(heads)).double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    result = segprune.prune(model, x, ratio=0.5, criterion="random", select="uniform")
    assert result.plan.replace == {"attn": "segmentation_models_pytorch.encoders.mix_transformer.Attention"}
    assert not result.verification.frozen and result.model.attn.q.out_features == 8
    assert (result.model.attn.num_heads, result.model.attn.head_dim) == (1, 8)  # a head cut, or half of the one
    masked = outputs(masked_copy(model, result.groups, result.removed, result.plan.replace), x)
    assert relative_error(masked, outputs(result.model, x)) < 1e-9
    fresh = segprune.Plan.from_json(result.plan.to_json()).apply(MixNet(heads).double().eval())
    fresh.load_state_dict(result.model.state_dict())
    assert torch.equal(outputs(fresh, x)[0], outputs(result.model, x)[0])


def test_a_swap_that_changes_the_outputs_is_undone_with_a_warning():
    from segprune.prune.replace import REPLACEMENTS, register_replacement

    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

    register_replacement(Scale, lambda m: nn.Identity(), name="test.Scale")
    try:
        model = nn.Sequential(nn.Conv2d(3, 8, 1), Scale(), nn.ReLU(), nn.Conv2d(8, 3, 1)).double().eval()
        x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
        with pytest.warns(UserWarning, match="1 .Scale. is not replaced with Identity: it changes the outputs"):
            result = segprune.prune(model, x, ratio=0.5, criterion="l1")
        assert result.plan.replace == {} and isinstance(result.model[1], Scale)
    finally:
        del REPLACEMENTS["test.Scale"]


def _ws_net():
    return nn.Sequential(StdConv(3, 8, 3, padding=1), nn.GroupNorm(1, 8), nn.ReLU(), StdConv(8, 8, 3, padding=1),
                         nn.ReLU(), ScaledStdConv(8, 8, 3, padding=1), nn.ReLU(), StdConv(8, 3, 1))


def test_weight_standardised_convs_freeze_unless_baked_by_opt_in_then_prune_exactly(tmp_path):
    torch.manual_seed(0)
    model, x = _ws_net().double().eval(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="no prunable channel"):
        warnings.simplefilter("ignore")  # opt-in: without it nothing is swapped, and every filter's inputs freeze
        segprune.prune(model, x, ratio=0.5, criterion="l1", select="uniform")
    result = segprune.prune(model, x, ratio=0.5, criterion="l1", select="uniform",
                            allow_approximate=("weight_standardization",))
    assert set(result.plan.replace) == {"0", "3", "5", "7"}
    assert result.channels_removed == 8 and not result.verification.frozen  # half of the 2 groups not under GroupNorm
    assert all(type(m) is nn.Conv2d for m in result.model if isinstance(m, nn.Conv2d))
    masked = outputs(masked_copy(model, result.groups, result.removed, result.plan.replace), x)
    assert relative_error(masked, outputs(result.model, x)) < 1e-9
    save(tmp_path / "ckpt", result.model, config={"model": "ws"}, plan=result.plan)
    fresh = load_plan(tmp_path / "ckpt").apply(_ws_net().double().eval())
    fresh.load_state_dict(load_weights(tmp_path / "ckpt"))
    assert torch.equal(outputs(fresh, x)[0], outputs(result.model, x)[0])


def test_a_timm_bit_prunes_with_weight_standardisation_baked():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=4).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    result = segprune.prune(model, x, ratio=0.5, criterion="l1", allow_approximate=("weight_standardization",))
    assert result.plan.replace and not result.verification.frozen
    assert result.verification.error <= result.verification.tolerance
    assert sum(p.numel() for p in result.model.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())
