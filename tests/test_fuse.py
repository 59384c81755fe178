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


def _randomise_bn_any(model: nn.Module, seed: int) -> nn.Module:
    """Random statistics and affine parameters for every BatchNorm (1d, 2d, 3d), then eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 2)
                m.running_var.copy_(torch.rand(n, generator=generator) * 3 + 0.05)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=generator))
                    m.bias.copy_(torch.randn(n, generator=generator))
    return model.eval()


# (conv, BN, input shape): plain, biased, grouped, depthwise, transposed (plain, grouped, depthwise, strided), 1d, 3d
LAYERS = {
    "conv": (lambda: nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d, (2, 4, 7, 9)),
    "conv_bias": (lambda: nn.Conv2d(4, 6, 3, stride=2), nn.BatchNorm2d, (2, 4, 9, 8)),
    "grouped": (lambda: nn.Conv2d(6, 9, 3, padding=1, groups=3), nn.BatchNorm2d, (2, 6, 5, 5)),
    "depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6, bias=False), nn.BatchNorm2d,
                  (2, 6, 6, 7)),
    "transposed": (lambda: nn.ConvTranspose2d(4, 6, 2, stride=2), nn.BatchNorm2d, (2, 4, 5, 6)),
    "transposed_grouped": (lambda: nn.ConvTranspose2d(6, 9, 3, stride=2, padding=1, output_padding=1, groups=3,
                                                      bias=False), nn.BatchNorm2d, (2, 6, 4, 5)),
    "transposed_depthwise": (lambda: nn.ConvTranspose2d(5, 5, 4, stride=2, padding=1, groups=5), nn.BatchNorm2d,
                             (2, 5, 4, 4)),
    "conv1d": (lambda: nn.Conv1d(3, 5, 3, groups=1), nn.BatchNorm1d, (2, 3, 11)),
    "conv3d_grouped": (lambda: nn.Conv3d(4, 6, 3, padding=1, groups=2), nn.BatchNorm3d, (1, 4, 3, 4, 5)),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_fused_layer_exact_with_random_statistics(kind, seed):
    make_conv, make_bn, shape = LAYERS[kind]
    torch.manual_seed(seed)
    conv = make_conv()
    model = _randomise_bn_any(nn.Sequential(conv, make_bn(conv.out_channels), nn.ReLU()), seed)
    x = torch.randn(*shape)
    fused = fuse_conv_bn(model, x)
    assert isinstance(fused[1], nn.Identity), kind
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
        other = torch.randn(*shape)  # folding is input-independent: a second input agrees too
        torch.testing.assert_close(fused(other), model(other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["conv", "conv_bias", "grouped", "depthwise", "transposed", "conv1d"])
def test_folded_weights_match_torch_fusion(kind):
    # torch.nn.utils.fusion reshapes a transposed weight as if it had one group, so grouped transposed convs are
    # checked against the unfused model above, not here.
    make_conv, make_bn, shape = LAYERS[kind]
    torch.manual_seed(3)
    conv = make_conv()
    model = _randomise_bn_any(nn.Sequential(conv, make_bn(conv.out_channels)), 3)
    ours = fuse_conv_bn(model, torch.randn(*shape))[0]
    reference = fuse_conv_bn_eval(model[0], model[1], transpose=isinstance(conv, nn.ConvTranspose2d))
    torch.testing.assert_close(ours.weight, reference.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.bias, reference.bias, rtol=1e-5, atol=1e-6)


def test_bn_without_affine_or_with_tiny_variance_is_exact():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False, eps=1e-3), nn.ReLU(),
                          nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4))
    _randomise_bn_any(model, 4)
    with torch.no_grad():
        model[1].running_var.copy_(torch.tensor([1e-6, 1.0, 5.0, 1e-4]))  # large scales: errors would show
    x = torch.randn(2, 3, 6, 6)
    fused = fuse_conv_bn(model, x)
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[4], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["test_pspnet", "test_segnet", "test_unet", "test_icnet", "test_deeplabv3plus"])
def test_zoo_model_fused_equals_unfused(name):
    from segprune.models import create_model
    from tests.conftest import randomize_norms

    torch.manual_seed(0)
    model = randomize_norms(create_model(name, num_classes=3)).eval()
    x = torch.randn(2, 3, 64, 64)
    fused = fuse_conv_bn(model, x)
    left = sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert left < sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) / 4, f"{name}: {left} BNs left"
    with torch.no_grad():
        torch.testing.assert_close(fused(x)["out"], model(x)["out"], rtol=1e-4, atol=1e-4)
