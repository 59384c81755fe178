"""A BatchNorm the user froze in eval mode inside a training model stays frozen through evaluation, training with
validation, inference and pruning: every place that saves and restores modes restores each submodule's own."""

import torch
from torch import nn
from torch.utils.data import DataLoader

import segprune
from segprune.data.synthetic import SyntheticScenes
from segprune.eval.inference import image_logits
from segprune.eval.metrics import evaluate
from segprune.train.loop import fit


class FrozenNet(nn.Module):
    """Two conv-BN blocks and a head; the first BN is frozen by the user (as when fine-tuning a pretrained stem)."""

    def __init__(self, num_classes=6):
        super().__init__()
        self.frozen = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        return {"out": self.head(self.body(self.frozen(x)))}


def _frozen_model():
    torch.manual_seed(0)
    model = FrozenNet().train()
    model.frozen[1].eval()
    return model


def _modes(model):
    return {name: m.training for name, m in model.named_modules()}


def _loader():
    return DataLoader(SyntheticScenes(num_samples=4, size=(16, 16)), batch_size=2, shuffle=False)


def test_evaluate_keeps_a_frozen_norm_frozen():
    model = _frozen_model()
    before = _modes(model)
    evaluate(model, _loader(), num_classes=6)
    assert _modes(model) == before
    assert not model.frozen[1].training and model.body[1].training


def test_image_logits_keeps_a_frozen_norm_frozen():
    model = _frozen_model()
    before = _modes(model)
    image_logits(model, torch.randint(0, 255, (16, 16, 3), dtype=torch.uint8).numpy())
    assert _modes(model) == before


def test_fit_with_validation_keeps_a_frozen_norm_frozen():
    model = _frozen_model()
    seen = []

    def validate(m):
        seen.append(m.frozen[1].training)
        return evaluate(m, _loader(), num_classes=6)["miou"]

    running = model.frozen[1].running_mean.clone()
    fit(model, _loader(), epochs=2, lr=0.01, progress=False, validate=validate)
    assert seen == [False, False]  # frozen while training each epoch, not only at the end
    assert not model.frozen[1].training and model.body[1].training
    assert torch.equal(model.frozen[1].running_mean, running)  # a frozen BN's statistics never moved


def test_prune_keeps_a_frozen_norm_frozen():
    model = _frozen_model()
    before = _modes(model)
    result = segprune.prune(model, torch.randn(1, 3, 16, 16), ratio=0.25)
    assert _modes(model) == before
    assert _modes(result.model) == before
