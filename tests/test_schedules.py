"""Two-stage global filter pruning and the layer-by-layer baseline: MAC target reached, every cut equal to its masked
reference before fine-tuning, fine-tuning between cuts (timed), and a plan that replays the whole schedule."""

import warnings

import pytest
import torch

from segprune import models
from segprune.prune.oracle import masked_copy, outputs, relative_error
from segprune.prune.schedules import layer_by_layer, two_stage_global
from segprune.prune.trace import trace
from segprune.train.loop import fit
from tests.conftest import randomize_norms


def build():
    torch.manual_seed(0)
    return randomize_norms(models.create_model("test_pspnet", num_classes=3)).double().eval()


def example():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32, dtype=torch.float64)


def macs(model, x):
    return sum(trace(model, x, modes=("eval",)).macs.values())


class Recorder:
    """`finetune` that really trains (one tiny epoch) and `on_stage` that runs the oracle on every cut."""

    def __init__(self, x):
        g = torch.Generator().manual_seed(3)
        self.x, self.calls, self.errors, self.befores = x, [], [], []
        self.data = [(torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64),
                      torch.randint(0, 3, (2, 32, 32), generator=g)) for _ in range(1)]

    def finetune(self, model, epochs):
        before = [p.detach().clone() for p in model.parameters()]
        fit(model, self.data, epochs=epochs, lr=0.01, progress=False)
        model.eval()
        self.calls.append((epochs, any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))))

    def on_stage(self, name, before, cut):
        self.befores.append(before)
        masked = outputs(masked_copy(before, cut.groups, cut.removed), self.x)
        self.errors.append((name, relative_error(masked, outputs(cut.model, self.x)), cut.channels_removed))


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_two_stage_global_reaches_the_target_in_two_exact_stages():
    model, x = build(), example()
    rec = Recorder(x)
    result = quiet(two_stage_global, model, x, target_macs=0.6, finetune=rec.finetune, on_stage=rec.on_stage,
                   epochs=(1, 2))
    assert [s["name"] for s in result.stages] == ["A", "B"]
    assert [e[0] for e in rec.errors] == ["A", "B"] and all(e[1] < 1e-6 and e[2] > 0 for e in rec.errors)
    assert rec.calls == [(1, True), (2, True)], "fine-tuned after each stage, for the epochs asked"
    assert result.stages[0]["macs"] <= 0.8 < result.stages[0]["macs"] + 0.05  # stage A: half of the reduction
    final = macs(result.model, x) / macs(model, x)
    assert final == pytest.approx(result.stages[1]["macs"]) and 0.55 < final <= 0.6
    assert rec.befores[1] is not model, "stage B re-scores the fine-tuned model"
    assert result.retrain_seconds > 0
    assert result.retrain_seconds == pytest.approx(sum(s["seconds"] for s in result.stages))
    fresh = build()
    result.plan.apply(fresh).load_state_dict(result.model.state_dict())
    assert relative_error(outputs(result.model, x), outputs(fresh, x)) < 1e-12


def test_layer_by_layer_prunes_each_group_in_turn_to_the_target():
    model, x = build(), example()
    rec = Recorder(x)
    result = quiet(layer_by_layer, model, x, target_macs=0.6, finetune=rec.finetune, on_stage=rec.on_stage,
                   ignore=("backbone.stem", "backbone.layer1", "backbone.layer2"))  # fewer groups: a faster test
    assert len(result.stages) > 3 and len({s["name"] for s in result.stages}) == len(result.stages)
    assert all(err < 1e-6 and removed > 0 for _, err, removed in rec.errors)
    assert len(rec.calls) == len(result.stages) and all(changed for _, changed in rec.calls)
    final = macs(result.model, x) / macs(model, x)
    assert final == pytest.approx(result.stages[-1]["macs"]) and 0.5 < final <= 0.6
    assert result.retrain_seconds > 0
    fresh = build()
    result.plan.apply(fresh).load_state_dict(result.model.state_dict())
    assert relative_error(outputs(result.model, x), outputs(fresh, x)) < 1e-12


def test_schedules_reject_bad_targets():
    model, x = build(), example()
    for schedule in (two_stage_global, layer_by_layer):
        with pytest.raises(ValueError, match="target_macs"):
            quiet(schedule, model, x, target_macs=0.0, finetune=lambda m, e: None)
    from segprune.prune.criteria import Taylor

    with pytest.raises(ValueError, match="Taylor criterion"):
        quiet(two_stage_global, model, x, target_macs=0.5, finetune=lambda m, e: None,
              criterion=Taylor(model, [], None))
    with pytest.raises(ValueError, match="out of reach"):
        quiet(layer_by_layer, model, x, target_macs=0.01, finetune=lambda m, e: None, min_keep=0.5)


def test_recipe_schedule_and_aux_settings():
    from segprune.workflows import recipe_from

    r = recipe_from(None, {"schedule": "two_stage", "aux_layers": "backbone.layer2,backbone.layer3",
                           "aux_weights": "[0.4, 0.2]", "stage_a": "0.25"})
    assert r.aux_layers == ("backbone.layer2", "backbone.layer3") and r.aux_weights == (0.4, 0.2) and r.stage_a == 0.25
    with pytest.raises(ValueError, match="schedule must be one of"):
        recipe_from(None, {"schedule": "three_stage"})
    with pytest.raises(ValueError, match="one weight per aux layer"):
        recipe_from(None, {"aux_layers": "backbone.layer2", "aux_weights": "0.4,0.4"})


def test_pipeline_two_stage_with_aux_heads():
    from torch.utils.data import DataLoader, TensorDataset

    from segprune.workflows import recipe_from
    from segprune.workflows.compress import Stages

    r = recipe_from(None, {"method": "l1", "target_macs": "0.7", "schedule": "two_stage", "finetune_epochs": "1",
                           "aux_layers": "backbone.layer3", "aux_weights": "0.4", "optimizer": "sgd"})
    torch.manual_seed(0)
    model = models.create_model("test_pspnet", num_classes=3)
    g = torch.Generator().manual_seed(4)
    loader = DataLoader(TensorDataset(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 3, (2, 32, 32),
                                                                                           generator=g)), batch_size=2)
    lines = []
    stages = Stages(r, loader, example=torch.zeros(1, 3, 32, 32), log=lines.append)
    pruned, plan, removed = quiet(stages.schedule, model)
    x = torch.zeros(1, 3, 32, 32)
    assert macs(pruned, x) <= 0.7 * macs(model, x) and removed > 0
    assert not any(k.startswith("segprune_aux") for k in pruned.state_dict()), "aux heads left in the model"
    assert "two_stage: 2 cuts" in lines[-1] and "retraining" in lines[-1]
