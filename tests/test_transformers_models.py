"""Third-party transformer segmenters that once broke `prune` or the cost model. They need the `transformers`
package, which the test install leaves out (it is large); run them in an environment that has it."""

import pytest
import torch
from torch import nn

import segprune
from segprune.eval.profile import count_macs

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
