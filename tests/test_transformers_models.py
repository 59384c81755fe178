"""Third-party transformer segmenters that once broke `prune` or the cost model, or kept their attention frozen. They
need the `transformers` package (in the `test` extra); they skip where it is missing."""

import pytest
import torch
from torch import nn

import segprune
from segprune.eval.profile import count_macs
from segprune.prune.oracle import masked_copy, outputs, relative_error
from segprune.prune.replace import DetrStyleAttention
from tests.conftest import randomize_norms

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install transformers)")
pytest.importorskip("scipy", reason="transformers' OneFormer needs scipy (its loss's matching)")


class _OneFormer(nn.Module):
    """transformers' OneFormer (tiny random config) with its task tokens fixed: masks logits as the output."""

    def __init__(self):
        super().__init__()
        config = transformers.OneFormerConfig()
        for key, value in dict(hidden_dim=64, conv_dim=64, mask_dim=64, num_queries=8, decoder_layers=2,
                               encoder_layers=1, dim_feedforward=128, text_encoder_num_layers=1,
                               text_encoder_context_length=8, num_attention_heads=4, task_seq_len=8).items():
            setattr(config, key, value)
        for key, value in dict(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8]).items():
            setattr(config.backbone_config, key, value)
        self.model = transformers.OneFormerForUniversalSegmentation(config)
        self.register_buffer("task", torch.randint(0, 10, (1, config.task_seq_len)))

    def forward(self, x):
        return self.model(pixel_values=x, task_inputs=self.task).masks_queries_logits


def test_oneformer_in_training_mode_is_counted_and_pruned():
    # torch's FlopCounterMode module tracker raised "Expected gradient function to be set" at query_transformer
    torch.manual_seed(0)
    model, x = _OneFormer().train(), torch.randn(1, 3, 64, 64)
    result = segprune.prune(model, x, target_macs=0.9)
    assert 0.85 <= count_macs(result.model, x) / count_macs(model, x) <= 0.95
    assert result.verification.error <= result.verification.tolerance and not result.verification.frozen


def _mask2former():
    torch.manual_seed(0)
    backbone = transformers.SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], window_size=4,
                                       image_size=64, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone, num_labels=5, hidden_dim=32, num_queries=8, encoder_layers=1, decoder_layers=3,
        num_attention_heads=4, dim_feedforward=64, feature_size=32, mask_feature_size=32, encoder_feedforward_dim=64,
        common_stride=4)
    return randomize_norms(transformers.Mask2FormerForUniversalSegmentation(config)).double().eval()


def test_mask2former_decoder_heads_are_cut_exactly_and_replay():
    # its self-attention merges heads back to the width it read from the frozen stream (swapped: DetrStyleAttention);
    # its masked cross-attention takes a mask repeated once per head from the mask predictor's `num_heads`
    model, x = _mask2former(), {"pixel_values": torch.randn(2, 3, 64, 64, dtype=torch.float64)}
    result = segprune.prune(model, x, ratio=0.5, criterion="random", select="uniform")
    decoder = result.model.model.transformer_module.decoder
    assert {key for key in result.plan.replace.values()} >= {
        "transformers.models.mask2former.modeling_mask2former.Mask2FormerAttention"}
    assert all(isinstance(layer.self_attn, DetrStyleAttention) and layer.self_attn.num_heads == 2
               for layer in decoder.layers)
    assert {layer.cross_attn.num_heads for layer in decoder.layers} == {decoder.mask_predictor.num_heads} == {2}
    assert not result.verification.frozen
    masked = outputs(masked_copy(model, result.groups, result.removed, result.plan.replace), x)
    assert relative_error(masked, outputs(result.model, x)) < 1e-9
    fresh = result.plan.apply(_mask2former())
    fresh.load_state_dict(result.model.state_dict())
    assert relative_error(outputs(fresh, x), outputs(result.model, x)) < 1e-12


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("output_attentions", [False, True])
def test_detr_style_attention_computes_what_mask2former_attention_does(cross, output_attentions):
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerAttention

    torch.manual_seed(0)
    original = Mask2FormerAttention(16, 4).double().eval()
    q, pos = torch.randn(5, 2, 16, dtype=torch.float64), torch.randn(5, 2, 16, dtype=torch.float64)
    kv, kv_pos = torch.randn(7, 2, 16, dtype=torch.float64), torch.randn(7, 2, 16, dtype=torch.float64)
    mask = torch.randn(8, 5, 7 if cross else 5, dtype=torch.float64)
    kwargs = dict(attention_mask=mask, position_embeddings=pos, output_attentions=output_attentions)
    if cross:
        kwargs.update(key_value_states=kv, key_value_position_embeddings=kv_pos)
    want, got = original(q, **kwargs), DetrStyleAttention(original)(q, **kwargs)
    assert torch.allclose(want[0], got[0], atol=1e-12)
    assert (want[1] is None) == (got[1] is None) and (got[1] is None or torch.allclose(want[1], got[1], atol=1e-12))
