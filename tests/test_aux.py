"""Auxiliary heads for compression: they change the backbone's gradients, they train with the loop, and the deployed
model is exactly as without them (state-dict keys, ops, MACs)."""

import pytest
import torch
from torch import nn

from segprune import models
from segprune.eval.profile import count_macs
from segprune.prune.blocks import _record
from segprune.train.aux import AuxLoss, add_losses
from segprune.train.loop import SegmentationLoss, backward, fit

LAYERS, WEIGHTS = ["backbone.layer2", "backbone.layer3"], [0.4, 0.4]


def build():
    torch.manual_seed(0)
    return models.create_model("test_pspnet", num_classes=3, aux_head=False)


def data(n=2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 3, (2, 32, 32), generator=g)) for _ in range(n)]


def grads(model, images, targets, aux=None):
    model.train()
    model.zero_grad()
    torch.manual_seed(5)  # the same dropout masks in every call
    ce = nn.CrossEntropyLoss(ignore_index=255)
    backward(model, images, targets, loss=SegmentationLoss(aux.criterion(ce) if aux else ce),
             extra_loss=aux and aux.extra_loss)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_aux_loss_changes_the_backbone_gradients():
    model, (images, targets) = build(), data(1)[0]
    plain = grads(model, images, targets)
    with AuxLoss(model, LAYERS, WEIGHTS, num_classes=3, example_inputs=images) as aux:
        with_aux = grads(model, images, targets, aux)
        aux.weights = [0.0, 0.0]
        zero = grads(model, images, targets, aux)
    early = "backbone.layer2.0.conv1.conv.weight"
    assert not torch.allclose(plain[early], with_aux[early]), "the auxiliary loss did not reach the backbone"
    assert torch.allclose(plain[early], zero[early], atol=1e-6), "with zero weights it must change nothing"
    late = "backbone.layer4.0.conv1.conv.weight"  # after the taps: the auxiliary loss cannot reach it
    assert torch.allclose(plain[late], with_aux[late], atol=1e-6)
    heads = [g for n, g in with_aux.items() if n.startswith("segprune_aux.")]
    assert heads and all(g.abs().sum() > 0 for g in heads), "the heads get no gradient"


def test_deployed_model_after_aux_training_is_as_without():
    train = data()
    x = train[0][0][:1]
    plain, model = build(), build()
    fit(plain, train, epochs=1, lr=0.01, progress=False)
    with AuxLoss(model, LAYERS, WEIGHTS, num_classes=3, example_inputs=x) as aux:
        assert any(k.startswith("segprune_aux.") for k in model.state_dict())
        before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.layer2")}
        fit(model, train, epochs=1, lr=0.01, progress=False, criterion=aux.criterion(), extra_loss=aux.extra_loss)
        assert any(not torch.equal(before[k], model.state_dict()[k]) for k in before)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [op.name for op in _record(model, x).ops] == [op.name for op in _record(plain, x).ops]
    assert count_macs(model, x) == count_macs(plain, x)
    model.train()
    model(train[0][0])  # no hook left behind: a training forward without the heads runs


def test_bad_aux_settings_are_clear_errors():
    model, x = build(), data(1)[0][0]
    with pytest.raises(ValueError, match="no layer \\['backbone.layer9'\\]"):
        AuxLoss(model, ["backbone.layer9"], [0.4], num_classes=3, example_inputs=x)
    with pytest.raises(ValueError, match="1 weights for 2 aux_layers"):
        AuxLoss(model, LAYERS, [0.4], num_classes=3, example_inputs=x)
    with pytest.raises(ValueError, match=">= 0"):
        AuxLoss(model, LAYERS[:1], [-1.0], num_classes=3, example_inputs=x)
    with pytest.raises(ValueError, match="backbone returns list"):
        AuxLoss(model, ["backbone"], [0.4], num_classes=3, example_inputs=x)
    assert not hasattr(model, "segprune_aux")
    with AuxLoss(model, LAYERS, WEIGHTS, num_classes=3, example_inputs=x) as aux:
        model.train()
        with pytest.raises(RuntimeError, match="no target noted"):
            aux.extra_loss(x, model(x))


def test_add_losses_sums_extra_losses():
    assert add_losses(None) is None
    total = add_losses(lambda i, o: torch.tensor(1.0), None, lambda i, o: torch.tensor(2.0))
    assert float(total(None, None)) == 3.0


def test_segprune_train_with_aux_heads_saves_a_model_without_them(tmp_path):
    from segprune import checkpoint
    from segprune.workflows import recipe_from, run_training

    recipe = recipe_from(None, {"model": "test_pspnet", "width": "0.03125", "train_samples": "4", "val_samples": "2",
                                "epochs": "1", "size": "[32,32]", "batch_size": "2", "threads": "1",
                                "aux_layers": "backbone.layer2,backbone.layer3", "aux_weights": "0.4,0.2"})
    run_training(recipe, tmp_path / "run", "cpu", resume=False, force=False, quiet=True)
    model = checkpoint.load(tmp_path / "run" / "model")
    plain = models.create_model("test_pspnet", num_classes=recipe.num_classes, width=0.03125)
    assert list(model.state_dict()) == list(plain.state_dict())


def test_aux_heads_predict_the_models_classes_so_class_weights_fit():
    """Regression: the class count was read from the last hooked feature map, not the model's logits."""
    model = models.create_model("test_pspnet", num_classes=2).train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 2, (2, 32, 32))
    ce = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0]), ignore_index=255)
    with AuxLoss(model, ["backbone.layer2"], [0.4], example_inputs=x[:1]) as aux:
        out = model(x)
        aux.criterion(ce)(out["out"], y)
        assert torch.isfinite(aux.extra_loss(x, out))
