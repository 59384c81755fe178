"""Post-pruning (cost-complexity path, selection) and He et al.'s LASSO channel selection."""

import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segprune
from segprune.eval.validation import val_miou
from segprune.models import create_model
from segprune.prune import lasso
from segprune.prune.cost import CostModel
from segprune.prune.oracle import masked_copy, outputs, relative_error
from segprune.prune.plan import Plan
from segprune.prune.postprune import (
    PathStep,
    PruningPath,
    ablation,
    channel_macs,
    default_loss,
    mean_loss,
    pruning_path,
    removed_channels,
    select,
)
from segprune.report.plots import plot_path
from tests.conftest import randomize_norms


class Tiny(nn.Module):
    """conv-bn-relu x2 -> classifier: small enough for exact ablation."""

    def __init__(self, width=6, num_classes=3):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.cls = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        return {"out": self.cls(self.b(self.a(x)))}


def data(seed=0, n=4, size=16, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n, size, size), generator=g)


def unet():
    torch.manual_seed(0)
    return randomize_norms(create_model("test_unet", num_classes=3)).eval()


@pytest.fixture(scope="module")
def unet_path():
    model, (x, y) = unet(), data(size=32)
    path = pruning_path(model, x[:1], [(x, y)], val_miou([(x, y)], 3), step=0.15, min_macs=0.4)
    return model, x, path


def test_path_is_nested_and_macs_decrease(unet_path):
    model, x, path = unet_path
    total = path.steps[0].macs
    assert len(path) >= 4 and path.steps[-1].macs <= (0.4 + 0.15 / 2) * total < path.steps[-2].macs  # the stop rule
    macs = [s.macs for s in path.steps]
    assert all(a > b for a, b in zip(macs, macs[1:]))
    assert all(a.params > b.params for a, b in zip(path.steps, path.steps[1:]))
    groups = segprune.channel_groups(model, x[:1])
    gone = [removed_channels(s.plan, groups) for s in path.steps]
    for before, after in zip(gone, gone[1:]):
        for gid, chans in before.items():
            assert set(chans.tolist()) <= set(after.get(gid, np.array([])).tolist())
    assert [sum(len(c) for c in r.values()) for r in gone] == [s.removed for s in path.steps]


def test_every_step_replays_and_equals_the_masked_model(unet_path):
    model, x, path = unet_path
    groups = segprune.channel_groups(model, x[:1])
    for step in path.steps[1:]:
        pruned = path.model_at(path.steps.index(step), model)
        assert sum(p.numel() for p in pruned.parameters()) == step.params
        masked = masked_copy(model, groups, removed_channels(step.plan, groups))
        assert relative_error(outputs(masked, x), outputs(pruned, x)) < 1e-5
    again = Plan.from_json(path.steps[2].plan.to_json()).apply(unet())  # a fresh build + the recorded plan
    again.load_state_dict(path.model_at(2, model).state_dict())
    assert all(torch.equal(a, b) for a, b in zip(outputs(again, x), outputs(path.model_at(2, model), x)))


def test_the_weakest_batch_is_taken_first():
    """Channels that carry nothing (gamma = beta = 0) have dL = 0 and go in the first step."""
    torch.manual_seed(0)
    model = randomize_norms(Tiny(width=8)).eval()
    with torch.no_grad():
        model.a[1].weight[[1, 5]] = 0
        model.a[1].bias[[1, 5]] = 0
    x, y = data()
    path = pruning_path(model, x[:1], [(x, y)], lambda m: 0.5, step=2, max_steps=1)
    assert path.steps[1].plan.modules["a.0"]["out"] == [0, 2, 3, 4, 6, 7]
    assert path.steps[1].alpha == pytest.approx(0.0, abs=1e-12)


def test_ablation_is_the_exact_loss_increase():
    torch.manual_seed(0)
    model = randomize_norms(Tiny()).eval()
    x, y = data()
    groups = segprune.channel_groups(model, x[:1])
    scores = ablation(model, groups, [(x, y)])
    base = mean_loss(model, [(x, y)], default_loss)
    g = next(g for g in groups if "b.0" in g.modules("out"))
    for c in (0, 3):
        masked = masked_copy(model, groups, {g.id: np.array([c])})
        assert scores[g.id][c] == pytest.approx(mean_loss(masked, [(x, y)], default_loss) - base, abs=1e-6)
    assert mean_loss(model, [(x, y)], default_loss) == base  # the masked weights were restored exactly


def test_ablation_path_runs_on_a_small_model():
    torch.manual_seed(0)
    model, (x, y) = randomize_norms(Tiny()).eval(), data()
    path = pruning_path(model, x[:1], [(x, y)], val_miou([(x, y)], 3), criterion="ablation", step=0.2,
                        min_macs=0.5)
    assert path.criterion == "ablation" and len(path) >= 3 and path.steps[-1].macs <= 0.6 * path.steps[0].macs


def test_channel_macs_matches_the_cost_model(unet_path):
    model, x, _ = unet_path
    groups = segprune.channel_groups(model, x[:1])
    cost = CostModel(model, groups)
    for g in [g for g in groups if not g.frozen][:6]:
        saved = channel_macs(cost, g)
        for c in np.flatnonzero(g.prunable)[:3]:
            assert saved[c] == pytest.approx(cost.macs({}) - cost.macs({g.id: np.array([c])}))


def test_recovery_is_kept_in_the_weights():
    torch.manual_seed(0)
    model, (x, y) = randomize_norms(Tiny(width=8)).eval(), data()
    calls = []

    def recover(m):
        calls.append(1)
        with torch.no_grad():
            m.cls.bias.add_(1.0)

    path = pruning_path(model, x[:1], [(x, y)], lambda m: 0.5, step=2, max_steps=2, recover=recover)
    assert len(calls) == 2 and path.weights is not None
    rebuilt = path.model_at(2, model)
    assert torch.allclose(rebuilt.cls.bias, model.cls.bias + 2.0)
    assert torch.equal(model.cls.bias, Tiny(width=8).cls.bias) is False  # the base model was left alone


def steps(mious, ses=None):
    ses = ses or [None] * len(mious)
    return PruningPath([PathStep(0.0, 100 - 10 * i, 10 - i, m, s, i, Plan()) for i, (m, s) in
                        enumerate(zip(mious, ses))])


def test_select_obeys_delta_and_one_standard_error():
    path = steps([0.70, 0.71, 0.705, 0.69, 0.60, 0.30], ses=[0.01, 0.015, 0.01, 0.01, 0.01, 0.01])
    assert select(path, delta=0.0) == 1
    assert select(path, delta=0.01) == 2
    assert select(path, delta=0.02) == 3
    assert select(path, delta=0.5) == 5
    assert select(path, rule="1se") == 2  # best 0.71 +- 0.015: 0.705 qualifies, 0.69 does not
    chosen = select(path, delta=0.02)
    best = max(s.miou for s in path.steps)
    assert path.steps[chosen].miou >= best - 0.02
    assert all(s.macs >= path.steps[chosen].macs for s in path.steps if s.miou >= best - 0.02)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="delta must be >= 0"):
        select(steps([0.5, 0.4]), delta=-0.01)
    with pytest.raises(ValueError, match="standard error"):
        select(steps([0.5, 0.4]), rule="1se")
    model, (x, y) = Tiny(), data()
    with pytest.raises(ValueError, match="pruning split is empty"):
        pruning_path(model, x[:1], [], lambda m: 0.5)
    with pytest.raises(ValueError, match="step"):
        pruning_path(model, x[:1], [(x, y)], lambda m: 0.5, step=1.5)
    with pytest.raises(ValueError, match="criterion"):
        pruning_path(model, x[:1], [(x, y)], lambda m: 0.5, criterion="l1")


def test_val_miou_gives_a_standard_error():
    x, y = data(n=4)
    result = val_miou([(x[:2], y[:2]), (x[2:], y[2:])], 3)(Tiny().eval())
    assert len(result["per_image"]) == 4 and 0 <= result["miou"] <= 1
    path = steps([0.5, 0.4])
    from segprune.prune.postprune import validation

    assert validation(lambda m: result, None)[1] == pytest.approx(np.std(result["per_image"], ddof=1) / 2)
    assert select(path, delta=0.0) == 0


def test_path_json_round_trip_and_plot(unet_path, tmp_path, monkeypatch):
    model, x, path = unet_path
    path.save(tmp_path / "path.json", selected=2)
    again = PruningPath.load(tmp_path / "path.json")
    assert [s.macs for s in again.steps] == [s.macs for s in path.steps]
    assert again.steps[3].plan.modules == path.steps[3].plan.modules
    assert not list(tmp_path.glob("*.tmp"))
    assert plot_path(path, tmp_path / "path.png", selected=2) and (tmp_path / "path.png").stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert plot_path(path, tmp_path / "other.png") is False
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a segprune path"):
        PruningPath.load(tmp_path / "bad.json")


# --- LASSO (He et al. 2017) ------------------------------------------------------------------------------------
class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Conv2d(16, 8, 3, padding=2, dilation=2, stride=2)

    def forward(self, x):
        return self.b(self.a(x))


def test_sampled_targets_are_the_conv_outputs():
    torch.manual_seed(0)
    model, (x, _) = randomize_norms(Pair()).double().eval(), data(size=12)
    x = x.double()
    samples = lasso.sample_layer(model, "b", [(x, None)], samples=50)
    full = (model.b(model.a(x)) - model.b.bias[:, None, None]).permute(0, 2, 3, 1).reshape(-1, 8)
    nearest = torch.cdist(samples.target, full).min(1).values
    assert nearest.max() < 1e-6  # every sampled row is a row of the real output (cdist rounds near 1e-8)


def test_lasso_finds_the_channels_that_matter():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 200, generator=g, dtype=torch.float64)
    y = z[[0, 3, 5]].sum(0) + 0.01 * torch.randn(200, generator=g, dtype=torch.float64)
    kept = lasso.lasso_path_select(z @ z.T, z @ y, keep=3, removable=np.ones(10, dtype=bool))
    assert kept.tolist() == [0, 3, 5]
    fixed = np.ones(10, dtype=bool)
    fixed[9] = False  # a channel that may not be removed is always kept
    assert lasso.lasso_path_select(z @ z.T, z @ y, keep=3, removable=fixed).tolist() == [0, 3, 5, 9]


def test_lasso_reconstruction_beats_plain_removal():
    torch.manual_seed(0)
    model = randomize_norms(Pair()).eval()
    fit_batches, held_out = [data(seed=1, n=16, size=32)], [data(seed=2, n=16, size=32)]  # 4096 positions each
    groups = segprune.channel_groups(model, fit_batches[0][0][:1])
    g = next(g for g in groups if "b" in g.modules("in"))
    assert lasso.consumer_of(g, model) == "b"
    removed, recon = lasso.select_channels(model, g, "b", fit_batches, drop=8, samples=1500)
    test = lasso.sample_layer(model, "b", held_out, samples=1500, seed=5)
    w = model.b.weight.detach().double()
    lasso_err = lasso.reconstruction_error(test, recon.positions, recon.weight)
    l1_keep = np.sort(np.argsort(-w.abs().sum((0, 2, 3)).numpy())[:8])  # plain removal: weakest L1 inputs go
    assert lasso_err < 0.8 * lasso.reconstruction_error(test, l1_keep, w[:, l1_keep])  # held-out: 0.27 vs 0.52
    assert lasso_err < 0.95 * lasso.reconstruction_error(test, recon.positions, w[:, recon.positions])  # LS: vs 0.31
    assert len(removed) == 8 and len(recon.positions) == 8


def test_lasso_step_passes_the_oracle_with_reconstructed_weights():
    from segprune.prune.postprune import _lasso_reselect, _weakest_batch

    torch.manual_seed(0)
    model = randomize_norms(create_model("test_segnet", num_classes=3)).double().eval()
    x, y = data(size=32)
    x = x.double()
    groups = segprune.channel_groups(model, x[:1])
    batch, _ = _weakest_batch(model, groups, [(x, y)], "taylor", default_loss, 0.2 * groups.total_macs, 0.1)
    batch, recon = _lasso_reselect(model, groups, batch, [(x, y)], 500)
    assert recon, "no group was LASSO-selected: the test would prove nothing"
    plan = Plan.from_removal(model, groups, batch)
    pruned = plan.apply(_copy(model))
    lasso.apply_reconstruction(pruned, recon, plan)
    reference = _copy(model)
    lasso.apply_reconstruction(reference, recon)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = masked_copy(reference, groups, batch)
    assert relative_error(outputs(masked, x), outputs(pruned, x)) < 1e-6
    assert relative_error(outputs(model, x), outputs(pruned, x)) > 1e-6


def test_lasso_path_keeps_its_weights():
    model, (x, y) = unet(), data(size=32)
    path = pruning_path(model, x[:1], [(x, y)], lambda m: 0.5, step=0.2, max_steps=2, selector="lasso",
                        lasso_samples=300)
    assert path.selector == "lasso" and len(path) == 3
    rebuilt = path.model_at(2, model)
    plain = path.steps[2].plan.apply(_copy(model))
    assert relative_error(outputs(plain, x), outputs(rebuilt, x)) > 1e-6  # refitted weights, not just sliced
    assert F.cross_entropy(outputs(rebuilt, x)[0], y).isfinite()


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_postprune_recipe_runs_end_to_end(tmp_path):
    import json

    from segprune.cli import main
    from tests.test_cli import TINY

    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), *TINY, "--set", "method=postprune", "--set", "path_step=0.3",
                 "--set", "path_min_macs=0.5", "--set", "path_batches=1", "--set", "path_delta=0.02",
                 "--set", "report_samples=0", "--set", "epochs=0", "--set", "val_samples=4",
                 "--set", "path_recover_steps=1", "--set", "aux_layers=backbone.layer2",
                 "--set", "aux_weights=0.4"]) == 0
    path = json.loads((out / "path.json").read_text())
    report = json.loads((out / "report.json").read_text())
    chosen = path["steps"][path["selected"]]
    assert len(path["steps"]) >= 3 and (out / "path.png").is_file()
    assert report["after"]["macs"] == pytest.approx(chosen["macs"], rel=0.01)  # the selected step was deployed
    assert chosen["miou"] >= max(s["miou"] for s in path["steps"]) - 0.02


def test_postprune_recipe_loads_and_rejects_a_negative_delta():
    from pathlib import Path

    from segprune.workflows import recipe_from

    recipe = recipe_from(Path(__file__).resolve().parents[1] / "recipes" / "postprune_segnet_camvid_cpu.yaml")
    assert (recipe.method, recipe.path_delta, recipe.path_rule) == ("postprune", 0.01, "delta")
    with pytest.raises(ValueError, match="path_delta"):
        recipe_from(None, {"method": "postprune", "path_delta": "-0.1"})
    with pytest.raises(ValueError, match="path_rule"):
        recipe_from(None, {"method": "postprune", "path_rule": "2se"})
