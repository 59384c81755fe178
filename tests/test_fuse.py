"""Conv+BN folding: fused equals unfused with randomised BN statistics, and only safe pairs are folded."""

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from segprune.export.fuse import fusable_pairs, fuse_conv_bn


class Branchy(nn.Module):
    """Every pairing situation at once: Sequential, attributes, transposed, and a shared conv output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2)
        self.up_bn = nn.BatchNorm2d(6)
        self.shared = nn.Conv2d(6, 6, 1)
        self.shared_bn = nn.BatchNorm2d(6)
        self.side = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        x = self.up_bn(self.up(torch.relu(self.bn(self.conv(self.stem(x))))))
        y = self.shared(x)
        return self.shared_bn(y) + self.side(y)  # y feeds a second branch: must stay unfolded


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator))
            m.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=generator))
            m.bias.data.copy_(torch.randn(n, generator=generator))
    return model.eval()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return _randomise_bn(Branchy())


def test_pairs_found_and_shared_output_refused(model):
    pairs = fusable_pairs(model, torch.randn(1, 3, 8, 8))
    assert pairs == [("stem.0", "stem.1"), ("conv", "bn"), ("up", "up_bn")]


def test_fused_equals_unfused(model):
    x = torch.randn(2, 3, 8, 8)
    fused = fuse_conv_bn(model, x)
    with torch.no_grad():
        assert (fused(x) - model(x)).abs().max().item() < 1e-5
    assert isinstance(fused.bn, nn.Identity) and isinstance(fused.up_bn, nn.Identity)
    assert isinstance(fused.stem[1], nn.Identity)
    assert isinstance(fused.shared_bn, nn.BatchNorm2d)  # the pair that must not fold
    assert isinstance(model.bn, nn.BatchNorm2d)  # the original is untouched
    assert not fused.training


def test_matches_torch_fuse_for_one_layer():
    torch.manual_seed(1)
    model = _randomise_bn(nn.Sequential(nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)))
    ours = fuse_conv_bn(model, torch.randn(1, 4, 6, 6))[0]
    reference = fuse_conv_bn_eval(model[0], model[1])
    torch.testing.assert_close(ours.weight, reference.weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.bias, reference.bias, rtol=1e-6, atol=1e-6)


def test_called_twice_or_returned_is_not_fused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
            self.conv2, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            feat = self.conv2(x)
            return self.bn(self.conv(self.bn(self.conv(x)))), self.bn2(feat), feat

    assert fusable_pairs(Twice(), torch.randn(1, 3, 4, 4)) == []


def test_inplace_op_between_conv_and_bn_is_not_fused():
    # ReLU(inplace) returns the conv's own output tensor, so the BN input "is" the conv output; it was read, though.
    model = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(inplace=True), nn.BatchNorm2d(4)))
    x = torch.randn(1, 3, 4, 4)
    assert fusable_pairs(model, x) == []
    with torch.no_grad():
        torch.testing.assert_close(fuse_conv_bn(model, x)(x), model(x))


def test_model_mode_restored(model):
    model.train()
    fusable_pairs(model, torch.randn(1, 3, 8, 8))
    assert model.training and model.bn.training
