"""Latency tables and latency-budget allocation (#14), on a fake runtime of known cost: nothing is timed for real."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import segprune
from segprune.eval.latency import layer_specs, measure_latency_table
from segprune.prune.latency import LatencyTable, describe

STEP = 8  # the fake runtime pads widths to multiples of this, as oneDNN pads to its channel block
PER_ELEMENT, INSIDE = 1e-4, 0.8  # a layer inside the model runs at 0.8 of its time alone


class FakeRuntime:
    """Cost of a layer = padded in × padded out × kernel area × output pixels × 1e-4 ms; a whole model = 0.8 × its
    layers + 1e-4 ms per kept output element. `noise` scales repeated timings apart."""

    name = "fake"

    def __init__(self, threads=1, noise=0.0, overhead=0.0):
        self.threads, self.noise, self.layer_calls = threads, noise, 0
        self.overhead = overhead  # ms each layer costs when timed alone only (a runtime's per-call cost)

    def versions(self):
        return {"torch": torch.__version__}

    @staticmethod
    def cost(spec, cin, cout):
        pad = lambda c: STEP * math.ceil(c / STEP)  # noqa: E731
        return pad(cin) * pad(cout) * math.prod(spec.kernel) * math.prod(spec.out_hw) * 1e-4

    def time_layer(self, spec, cin, cout, runs):
        self.layer_calls += 1
        c = self.cost(spec, cin, cout) + self.overhead
        return [c * (1 + self.noise * k) for k in range(runs)]

    def model_ms(self, model, x):
        specs, widths = layer_specs(model, x), describe(model)
        return sum(INSIDE * self.cost(s, *widths[n][1:]) + PER_ELEMENT * widths[n][2] * math.prod(s.out_hw)
                           for n, s in specs.items())

    def time_models(self, models, x, rounds):
        out = {}
        for label, m in models.items():
            ms = self.model_ms(m, x)
            out[label] = {"median_ms": ms, "min_ms": ms, "spread": self.noise}
        return out


class Net(nn.Module):
    """A 3×3 conv (expensive per channel) feeding a 1×1 conv (cheap) and a 1×1 classifier."""

    def __init__(self, width=32):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.c = nn.Conv2d(width, 4, 1)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def ones(group, model):
    """Every channel equally important: the allocation then follows latency alone."""
    return np.ones(group.size)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(1, 3, 8, 8)
    table = measure_latency_table(model, x, runtime=FakeRuntime(), name="net")
    return model, x, table


def test_table_round_trips_with_its_conditions(setup, tmp_path):
    model, x, table = setup
    loaded = LatencyTable.load(table.save(tmp_path / "t.json"), runtime="fake", threads=1, input=x.shape, model=model)
    assert loaded.to_dict() == table.to_dict()
    assert loaded.meta["model"] == "net" and loaded.meta["cpu"] is not None and "torch" in loaded.meta
    assert loaded.predict() == pytest.approx(table.predict())


def test_prediction_meets_the_fake_measurement(setup):
    model, x, table = setup
    rt = FakeRuntime()
    assert table.predict() == pytest.approx(rt.model_ms(model, x), rel=1e-6)
    pruned = segprune.prune(model, x, ratio=0.4, criterion="random", seed=3).model
    assert table.predict_model(pruned) == pytest.approx(rt.model_ms(pruned, x), rel=1e-6)


def test_steps_are_measured_and_prediction_is_monotone(setup):
    _, _, table = setup
    assert table.step("b.0", "in") == STEP and table.step("b.0", "out") == STEP
    ms = [table.layer_ms("b.0", c, 32) for c in range(1, 33)]
    assert all(later >= earlier for earlier, later in zip(ms, ms[1:]))
    assert ms[24] == ms[31] and ms[23] < ms[24]  # 25..32 channels cost the same: one block


def test_target_latency_cuts_the_expensive_layer_on_its_steps(setup):
    model, x, table = setup
    result = segprune.prune(model, x, target_latency=0.5, latency=table, criterion=ones)
    a, b = model.a[0], result.model.b[0]
    # equal importance: the 3×3 conv's group saves most per channel, so it goes first, in blocks of STEP, and alone
    assert result.model.a[0].out_channels == 8 and b.out_channels == 32 and a.out_channels == 32
    assert table.predict_model(result.model) <= 0.5 * table.predict()
    mac = segprune.prune(model, x, target_macs=0.5, criterion=ones)  # half the MACs: not half the latency here
    assert table.predict_model(mac.model) > 0.5 * table.predict()


def test_unreachable_target_names_the_floors(setup):
    model, x, table = setup
    with pytest.raises(ValueError, match=r"out of reach.*predicted 0\.\d+.*floor: a\.0, b\.0"):
        segprune.prune(model, x, target_latency=0.05, latency=table, criterion=ones, min_keep=0.5)


def test_a_table_from_other_conditions_or_model_is_refused(setup, tmp_path):
    model, x, table = setup
    path = table.save(tmp_path / "t.json")
    with pytest.raises(ValueError, match=r"runtime: table 'fake', wanted 'onnxruntime'; threads: table 1, wanted 2"):
        LatencyTable.load(path, runtime="onnxruntime", threads=2)
    with pytest.raises(ValueError, match=r"input: table \[1, 3, 8, 8\]"):
        table.check(input=(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"does not fit this model.*wider than the table: a\.0 3->48"):
        segprune.prune(Net(48), x, target_latency=0.5, latency=table)
    with pytest.raises(ValueError, match="not in the table"):
        segprune.prune(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)), x, target_latency=0.5, latency=table)
    with pytest.raises(ValueError, match="needs latency="):
        segprune.prune(model, x, target_latency=0.5)


def test_a_second_model_reuses_the_shapes_already_measured(setup):
    model, x, table = setup
    rt = FakeRuntime()
    again = measure_latency_table(model, x, runtime=rt, table=table)
    assert rt.layer_calls == 0 and again.entries == table.entries


def test_the_table_records_how_it_prices_the_models_it_was_fitted_to(setup):
    _, _, table = setup
    fit = table.meta["calibration"]
    assert set(fit) == {"unpruned", "uniform50"}
    assert all(c["predicted_ms"] == pytest.approx(c["measured_ms"], rel=1e-3) for c in fit.values())


def test_layers_that_do_not_add_up_to_the_model_warn():
    """Each layer timed alone pays a per-call cost the whole model does not: no positive fit prices the uniform
    50 % pruning, and the user is told to close the loop (as OpenVINO on CamVid: 24 % too slow)."""
    with pytest.warns(UserWarning, match=r"prices the uniform50 model \d+% too slow on fake.*measure=LatencyMeter"):
        table = measure_latency_table(Net(16).eval(), torch.randn(1, 3, 8, 8), runtime=FakeRuntime(overhead=0.5))
    fit = table.meta["calibration"]["uniform50"]
    assert fit["predicted_ms"] > 1.1 * fit["measured_ms"]


def test_spread_under_load_warns():
    with pytest.warns(UserWarning, match="spread more than 10%"):
        measure_latency_table(Net(16).eval(), torch.randn(1, 3, 8, 8), runtime=FakeRuntime(noise=0.2))


def test_onnxruntime_times_the_layer_it_was_asked_for(tmp_path):
    """The one-node graph onnxruntime times computes what the layer computes (no timing asserted)."""
    pytest.importorskip("onnxruntime")
    from segprune.eval.latency import _layer, _one_node_onnx
    from segprune.export.runtimes import ort_session

    spec = layer_specs(Net(8).eval(), torch.randn(1, 3, 8, 8))["a.0"]
    module, x = _layer(spec, 3, 5)
    _one_node_onnx(module, x, [1, 5, *spec.out_hw], tmp_path / "layer.onnx")
    (y,) = ort_session(tmp_path / "layer.onnx", 1).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), module(x).detach(), rtol=1e-4, atol=1e-5)


def test_the_engine_side_imports_no_runtime_or_model():
    """prune/latency.py predicts and allocates; measuring (runtimes, exports, models) stays above it."""
    import ast
    import importlib
    import inspect

    engine = importlib.import_module("segprune.prune.latency")  # `segprune.prune` is the function
    tree = ast.parse(inspect.getsource(engine))
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + [
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [n for n in names if n.split(".")[:2] in (["segprune", p] for p in ("models", "eval", "export",
                                                                                      "report", "train"))]
    assert not [n for n in names if n.startswith(("onnx", "onnxruntime"))]
