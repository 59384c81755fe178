"""The training loop: a short run lowers the loss, and the regulariser runs between backward and step."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from segprune.data.synthetic import SyntheticScenes
from segprune.train.loop import fit, poly_lr, segmentation_loss, train_one_epoch


class TinyNet(nn.Module):
    def __init__(self, num_classes=6, use_aux=False):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Conv2d(16, num_classes, 1)
        self.aux = nn.Conv2d(16, num_classes, 1) if use_aux else None

    def forward(self, x):
        features = self.body(x)
        out = {"out": self.head(features)}
        if self.training and self.aux is not None:
            out["aux"] = self.aux(features[..., ::2, ::2])  # half resolution: the loop must upsample it
        return out


@pytest.fixture(scope="module")
def loader():
    return DataLoader(SyntheticScenes(num_samples=16, size=(32, 32)), batch_size=4, shuffle=False)


def test_short_run_lowers_loss(loader):
    torch.manual_seed(0)
    losses = fit(TinyNet(use_aux=True), loader, epochs=4, lr=0.2, progress=False)
    assert len(losses) == 4
    assert losses[-1] < losses[0]  # training lowers the training loss (a property, not a figure of one seed)


def test_adamw_and_unknown_optimizer(loader):
    torch.manual_seed(0)
    losses = fit(TinyNet(), loader, epochs=2, lr=3e-3, optimizer="adamw", progress=False)
    assert losses[1] < losses[0]
    with pytest.raises(ValueError):
        fit(TinyNet(), loader, epochs=1, lr=0.1, optimizer="lion", progress=False)


def test_regularizer_runs_between_backward_and_step(loader):
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def regularizer(m):
        bn = m.body[1]
        # Gradients are in, the weights are those of the last step (not yet updated), and edits to .grad count.
        seen.append((bn.weight.grad is not None, bn.weight.detach().clone()))
        bn.weight.grad.add_(1000.0)

    train_one_epoch(model, [next(iter(loader))], optimizer, regularizer=regularizer, progress=False)
    has_grad, weight_before_step = seen[0]
    assert has_grad
    assert torch.equal(weight_before_step, torch.ones(16))  # BN weight starts at 1: not yet stepped
    assert (model.body[1].weight < -50).all()  # the step applied the edited gradient: 1 - 0.1 * (g + 1000)


def test_aux_loss_weighted_and_upsampled():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8))
    out, aux = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    criterion = nn.CrossEntropyLoss()
    up = nn.functional.interpolate(aux, size=(8, 8), mode="bilinear", align_corners=False)
    expected = criterion(out, target) + 0.4 * criterion(up, target)
    got = segmentation_loss({"out": out, "aux": [aux]}, target, criterion=criterion, aux_weight=0.4)
    torch.testing.assert_close(got, expected)


def test_poly_lr_decays_to_zero():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = poly_lr(optimizer, total_iters=4, power=1.0)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_validation_after_each_epoch_is_recorded_and_changes_nothing_of_training(loader):
    """A validation loader draws its base seed from the global RNG; training must not notice it."""
    from segprune.eval.metrics import evaluate

    runs = []
    shuffled = DataLoader(loader.dataset, batch_size=4, shuffle=True)  # its order comes from the global RNG
    for validate in (None, lambda m: evaluate(m, loader, num_classes=6)["miou"]):
        torch.manual_seed(0)
        model = TinyNet(use_aux=True)
        losses = fit(model, shuffled, epochs=2, lr=0.2, progress=False, validate=validate)
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
