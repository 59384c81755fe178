"""Layer (block) pruning and structure optimisation: which blocks are found, the bypass oracle (the original with
the branch output zeroed), plan replay and composition with channel pruning, greedy removal, head slimming."""

import warnings

import pytest
import torch
from torch import nn

import segprune
from segprune import checkpoint, models
from segprune.prune.blocks import (
    bypass_blocks,
    prune_blocks,
    residual_blocks,
    score_blocks,
    slim_layers,
    zeroed_branches,
)
from segprune.prune.oracle import masked_copy, outputs, relative_error
from segprune.prune.plan import Plan
from segprune.prune.trace import trace
from tests.conftest import randomize_norms


def cbr(cin, cout, act=True):
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU()] if act else []))


class Res(nn.Module):
    """act(f(x) + x), or a projection block when the widths differ."""

    def __init__(self, cin, cout, act):
        super().__init__()
        self.f = nn.Sequential(cbr(cin, cout), cbr(cout, cout, act=False))
        self.proj = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.act = act

    def forward(self, x):
        return self.act(self.f(x) + (x if self.proj is None else self.proj(x)))


class Hand(nn.Module):
    """Every case: an input that is not a relu output (b1 keeps its ReLU), one that is (b2 becomes identity), a
    non-idempotent activation (b3 keeps SiLU), an add outside any module (branch -> zeros), a projection block and a
    skip from elsewhere (neither is bypassable)."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, act=False)
        self.b1, self.b2, self.b3 = Res(8, 8, nn.ReLU()), Res(8, 8, nn.ReLU()), Res(8, 8, nn.SiLU())
        self.branch = cbr(8, 8)
        self.wide = Res(8, 12, nn.ReLU())
        self.mix = nn.Conv2d(12, 12, 3, padding=1)
        self.cls = nn.Conv2d(12, 3, 1)

    def forward(self, x):
        x = self.b3(self.b2(self.b1(self.stem(x))))
        x = x + self.branch(x)
        s = self.wide(x)
        return {"out": self.cls(self.mix(torch.relu(s)) + s)}


class InPlaceBlock(nn.Module):
    """torchvision's BasicBlock style: `out += identity` and an in-place ReLU (a tensor changes value in place)."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += identity
        return self.relu(out)


class InPlaceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.layer = nn.Sequential(InPlaceBlock(8), InPlaceBlock(8))
        self.cls = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.cls(self.layer(self.stem(x)))


def build(name):
    torch.manual_seed(0)
    hand = {"hand": Hand, "inplace": InPlaceNet}
    model = hand[name]() if name in hand else models.create_model(name, num_classes=3)
    return randomize_norms(model).double().eval()


def example():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32, dtype=torch.float64)


def test_hand_model_blocks_and_their_bypass():
    blocks = {b.name: b for b in residual_blocks(build("hand"), example())}
    assert sorted(blocks) == ["b1", "b2", "b3", "branch"]
    assert blocks["b1"].bypass == {"with": "act", "act": "ReLU", "kwargs": {}}  # stem ends in BN: relu(x) != x
    assert blocks["b2"].bypass == {"with": "identity"}  # its input is b1's relu output
    assert blocks["b3"].bypass == {"with": "act", "act": "SiLU", "kwargs": {}}  # silu(silu(z)) != silu(z)
    assert blocks["branch"].bypass == {"with": "zero"}
    assert blocks["b1"].branch == "b1.f" and blocks["b1"].params == sum(p.numel() for p in Hand().b1.parameters())


@pytest.mark.parametrize("name, expected",
                         [("hand", 4), ("inplace", 2), ("test_pspnet", 2), ("test_deeplabv3plus", 11),
                          ("test_icnet", 2), ("test_yolact", 2)])
def test_bypass_equals_zeroed_branch(name, expected):
    model, x = build(name), example()
    blocks = residual_blocks(model, x)
    assert len(blocks) == expected
    for chosen in (blocks[:1], blocks):  # one block, and all of them at once
        bypassed, plan = bypass_blocks(model, chosen)
        assert relative_error(outputs(zeroed_branches(model, chosen), x), outputs(bypassed, x)) < 1e-6
        assert relative_error(outputs(model, x), outputs(bypassed, x)) > 1e-6, "the bypass changed nothing"
        keys = bypassed.state_dict().keys()
        assert not any(k.startswith(b.name + ".") for b in chosen for k in keys), "parameters left behind"
        removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in bypassed.parameters())
        assert removed == sum(b.params for b in chosen)
        assert sum(trace(bypassed, x, modes=("eval",)).macs.values()) == blocks.total_macs - sum(b.macs for b in chosen)


def test_resnet_blocks_become_identity_and_the_plan_replays(tmp_path):
    model, x = build("test_pspnet"), example()
    blocks = residual_blocks(model, x)
    assert [b.name for b in blocks] == ["backbone.layer3.1", "backbone.layer4.1"]
    assert all(b.bypass == {"with": "identity"} and b.type == "Bottleneck" for b in blocks)
    bypassed, plan = bypass_blocks(model, blocks)
    assert isinstance(bypassed.backbone.layer3[1], nn.Identity)
    text = plan.to_json()
    assert '"segprune.plan/2"' in text and Plan.from_json(text) == plan
    fresh = randomize_norms(models.create_model("test_pspnet", num_classes=3)).double().eval()
    Plan.from_json(text).apply(fresh).load_state_dict(bypassed.state_dict())
    assert relative_error(outputs(bypassed, x), outputs(fresh, x)) == 0
    checkpoint.save(tmp_path / "ck", bypassed.float(), plan=plan, config={"model": "test_pspnet",
                                                                         "model_kwargs": {"num_classes": 3}})
    loaded = checkpoint.load(tmp_path / "ck").double()
    assert relative_error(outputs(bypassed.double(), x), outputs(loaded, x)) < 1e-6


def test_plan_without_bypass_is_written_as_before():
    plan = Plan({"conv": {"type": "Conv2d", "out": [0], "out_size": 2}})
    assert plan.to_json() == '{"format": "segprune.plan/1", "modules": {\n  "conv": {"type": "Conv2d", "out": [0], ' \
                             '"out_size": 2}\n}}\n'
    assert Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("name", ["hand", "test_pspnet", "test_deeplabv3plus"])
def test_channel_pruning_after_block_pruning_passes_the_oracle(name):
    model, x = build(name), example()
    blocks = residual_blocks(model, x)
    bypassed, block_plan = bypass_blocks(model, blocks[::2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = segprune.channel_groups(bypassed, x)
    result = segprune.prune(bypassed, x, ratio=0.4, criterion="random", seed=3, groups=groups)
    assert result.channels_removed > 0
    assert relative_error(outputs(masked_copy(bypassed, groups, result.removed), x), outputs(result.model, x)) < 1e-6
    fresh = build(name)
    block_plan.then(result.plan).apply(fresh).load_state_dict(result.model.state_dict())
    assert relative_error(outputs(result.model, x), outputs(fresh, x)) < 1e-12


def test_block_pruning_after_channel_pruning_composes():
    model, x = build("test_pspnet"), example()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        channels = segprune.prune(model, x, ratio=0.3, criterion="l1")
    blocks = residual_blocks(channels.model, x)
    final, block_plan = bypass_blocks(channels.model, blocks[:1])
    plan = channels.plan.then(block_plan)
    assert not any(k.startswith(blocks[0].name + ".") for k in plan.modules), "cuts inside a bypassed block stay"
    fresh = build("test_pspnet")
    Plan.from_json(plan.to_json()).apply(fresh).load_state_dict(final.state_dict())
    assert relative_error(outputs(final, x), outputs(fresh, x)) < 1e-12


def batches(n=2):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 3, (2, 32, 32), generator=g))
            for _ in range(n)]


def test_scores_leave_the_model_unchanged_and_greedy_takes_the_cheapest():
    model, x, data = build("test_deeplabv3plus"), example(), batches()
    before = outputs(model, x)
    blocks = residual_blocks(model, x)
    scores = score_blocks(model, blocks, data)
    assert set(scores) == {b.name for b in blocks} and len(set(scores.values())) > 1
    assert relative_error(before, outputs(model, x)) == 0
    result = prune_blocks(model, x, data, max_blocks=1)
    assert [b.name for b in result.removed] == [min(scores, key=scores.get)]
    assert result.history[0]["score"] == pytest.approx(scores[result.removed[0].name])
    assert relative_error(before, outputs(model, x)) == 0, "not inplace: the original is untouched"


def test_scores_by_miou_are_the_drop_in_miou():
    from segprune.eval.metrics import evaluate
    from segprune.eval.validation import miou_metric

    model, x, data = build("hand"), example(), batches()
    blocks = residual_blocks(model, x)
    scores = score_blocks(model, blocks, data, miou_metric(3))
    base = evaluate(model, data, num_classes=3)["miou"]
    bypassed, _ = bypass_blocks(model, blocks[:1])
    assert scores[blocks[0].name] == pytest.approx(base - evaluate(bypassed, data, num_classes=3)["miou"])
    assert any(v != 0 for v in scores.values())


@pytest.mark.parametrize("rescore", [True, False])
def test_prune_blocks_stops_at_the_tolerance_and_the_mac_target(rescore):
    model, x, data = build("hand"), example(), batches()
    tolerant = prune_blocks(model, x, data, tolerance=0.005, rescore=rescore)
    assert 0 < len(tolerant.removed) < 4, "the tolerance should stop the removal part way on this model"
    assert all(h["metric"] - tolerant.base_metric <= 0.005 for h in tolerant.history)
    left = residual_blocks(tolerant.model, x)
    if left:  # it stopped because the next removal would cost more than the tolerance
        worst = score_blocks(tolerant.model, left, data)
        current = tolerant.history[-1]["metric"] if tolerant.history else tolerant.base_metric
        assert current + min(worst.values()) - tolerant.base_metric > 0.005 or not rescore
    target = prune_blocks(model, x, data, target_macs=0.9, rescore=rescore)
    total = residual_blocks(model, x).total_macs
    macs = sum(trace(target.model, x, modes=("eval",)).macs.values()) / total
    assert macs <= 0.9 and macs == pytest.approx(target.history[-1]["macs"])
    assert target.history[-2]["macs"] > 0.9 if len(target.history) > 1 else True


@pytest.mark.parametrize("name", ["test_segnet", "test_unet"])
def test_models_without_residual_blocks_are_told_so(name):
    with pytest.raises(ValueError, match="no bypassable residual block.*channel pruning"):
        prune_blocks(build(name), example(), batches(1), max_blocks=1)


def test_bad_input_is_a_clear_error():
    x, data = example(), batches(1)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 1)).double()
    with pytest.raises(ValueError, match="no bypassable residual block.*channel pruning"):
        prune_blocks(plain, x, data, max_blocks=1)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        prune_blocks(build("hand"), x, data, tolerance=-0.1)
    with pytest.raises(ValueError, match="give tolerance, target_macs or max_blocks"):
        prune_blocks(build("hand"), x, data)


def test_slim_layers_sets_widths_and_passes_the_oracle():
    model, x = build("test_pspnet"), example()
    result = slim_layers(model, x, {"ppm.branches": 2, "head.0": 8})
    widths = {n: m.out_channels for n, m in result.model.named_modules() if isinstance(m, nn.Conv2d)}
    assert [widths[f"ppm.branches.{i}.1.conv"] for i in range(4)] == [2] * 4 and widths["head.0.conv"] == 8
    masked = outputs(masked_copy(model, result.groups, result.removed), x)
    assert relative_error(masked, outputs(result.model, x)) < 1e-6
    assert relative_error(outputs(model, x), outputs(result.model, x)) > 1e-6


def test_slim_layers_bad_names_and_frozen_groups():
    model, x = build("test_pspnet"), example()
    with pytest.raises(ValueError, match="no layer 'head.ppm'"):
        slim_layers(model, x, {"head.ppm": 4})
    with pytest.raises(ValueError, match="frozen .*reaches the model's output"):
        slim_layers(model, x, {"head.2": 2})
    with pytest.raises(ValueError, match="must be in \\[1, 16\\]"):
        slim_layers(model, x, {"head.0": 0})


def test_recipe_structure_step_removes_blocks_and_slims_heads():
    from torch.utils.data import DataLoader, TensorDataset

    from segprune.workflows import recipe_from
    from segprune.workflows.compress import Stages

    r = recipe_from(None, {"layer_pruning": "true", "layer_max": "1", "slim_widths": "ppm.branches=2, head.0=8",
                           "layer_metric": "miou", "layer_tolerance": "1.0"})
    torch.manual_seed(0)
    model = models.create_model("test_pspnet", num_classes=3).eval()
    g = torch.Generator().manual_seed(4)
    loader = DataLoader(TensorDataset(torch.randn(2, 3, 32, 32, generator=g),
                                      torch.randint(0, 3, (2, 32, 32), generator=g)), batch_size=2)
    lines = []
    x = torch.zeros(1, 3, 32, 32)
    structured, plan, fraction = Stages(r, loader, example=x, log=lines.append).structure(model)
    assert len(plan.bypass) == 1 and structured.head[0].conv.out_channels == 8 and fraction < 1
    fresh = models.create_model("test_pspnet", num_classes=3)
    Plan.from_json(plan.to_json()).apply(fresh).load_state_dict(structured.state_dict())
    assert relative_error(outputs(structured, x), outputs(fresh, x)) == 0
    with pytest.raises(ValueError, match="slim_widths: 'head.0' is not name=width"):
        recipe_from(None, {"slim_widths": "head.0"})
    with pytest.raises(ValueError, match="layer_tolerance"):
        recipe_from(None, {"layer_tolerance": "-0.1"})
    with pytest.raises(ValueError, match="layer_metric"):
        recipe_from(None, {"layer_metric": "iou"})


def test_a_block_ending_in_dropout_or_an_unknown_op():
    class Drop(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.f, self.drop, self.scale = cbr(4, 4), nn.Dropout2d(0.2), scale

        def forward(self, x):
            y = x + self.f(x)
            return y * 0.5 if self.scale else self.drop(y)

    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    model = nn.Sequential(Drop(False), Drop(True)).double().eval()
    blocks = residual_blocks(model, x)
    # y * 0.5 after the add cannot be rebuilt: the branch module returns zeros instead
    assert [(b.name, b.bypass) for b in blocks] == [("0", {"with": "identity"}), ("1.f", {"with": "zero"})]
    bypassed, _ = bypass_blocks(model, blocks)
    assert relative_error(outputs(zeroed_branches(model, blocks), x), outputs(bypassed, x)) < 1e-12
