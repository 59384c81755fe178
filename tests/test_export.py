"""ONNX export: onnxruntime equals eager on the zoo, dynamic axes where the model allows, only the logits exported,
unexportable ops named; TorchScript and torch.export round trips."""

import pytest
import torch
from torch import nn

from segprune.export.onnx import (
    ExportError,
    export_onnx,
    export_program,
    export_torchscript,
    fixed_size_layers,
    unsupported_ops,
)
from segprune.export.pooling import MatrixAdaptiveAvgPool
from segprune.models import create_model
from tests.conftest import randomize_norms

onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx: pip install 'segprune[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="the parity check needs onnxruntime: pip install 'segprune[onnx]'")


def _model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(create_model(name, num_classes=3, **kwargs))


def _run(path, x: torch.Tensor):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)["out"]


@pytest.mark.parametrize("name", ["test_unet", "test_deeplabv3plus"])
def test_dynamic_batch_and_size_match_eager(tmp_path, name):
    model, path = _model(name), tmp_path / "m.onnx"
    result = export_onnx(model, torch.randn(1, 3, 64, 64), path)
    assert result["dynamic_axes"] == {0: "batch", 2: "height", 3: "width"} and result["notes"] == []
    assert result["max_abs_diff"] <= 1e-4 and len(result["checked_shapes"]) == 2
    assert result["opset"] >= 17 and result["file_bytes"] == path.stat().st_size
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left
    x = torch.randn(3, 3, 96, 48)  # a third size, neither of the checked ones
    torch.testing.assert_close(_run(path, x), _eager(model, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("name", "size"), [("test_pspnet", 48), ("test_icnet", 192)])
def test_adaptive_pooling_keeps_spatial_axes_static(tmp_path, name, size):
    # 48 (PSPNet, stride 8) and 192 (ICNet, stride 32) give a 6×6 map, which every pyramid bin divides.
    model = _model(name)
    # Untrained, these have logits in the hundreds: float32 rounding alone exceeds 1e-4 absolute.
    result = export_onnx(model, torch.randn(1, 3, size, size), tmp_path / "m.onnx", rtol=1e-6)
    assert result["dynamic_axes"] == {0: "batch"}
    assert any("AdaptiveAvgPool2d" in note for note in result["notes"]) and fixed_size_layers(model)
    x = torch.randn(2, 3, size, size)
    torch.testing.assert_close(_run(tmp_path / "m.onnx", x), _eager(model, x), rtol=1e-5, atol=1e-4)


@pytest.mark.slow  # the dynamo exporter: 5-20 s on a shared 2-core machine, most of it its first-call setup
def test_segnet_max_unpool_exports_through_dynamo(tmp_path):
    model = _model("test_segnet", depths=(1, 1, 1, 1, 1))
    result = export_onnx(model, torch.randn(1, 3, 32, 48), tmp_path / "segnet.onnx", dynamic=False)
    assert result["exporter"] == "dynamo"  # the TorchScript exporter cannot export max_unpool2d
    ops = {node.op_type for node in onnx.load(str(tmp_path / "segnet.onnx")).graph.node}
    assert ops & {"MaxUnpool", "ScatterND", "ScatterElements"}  # the unpooling, as dynamo decomposes it
    assert result["max_abs_diff"] <= 1e-4 and result["dynamic_axes"] == {}
    x = torch.randn(1, 3, 32, 48)  # other values: the pooling indices differ
    torch.testing.assert_close(_run(tmp_path / "segnet.onnx", x), _eager(model, x), rtol=1e-5, atol=1e-4)


def _graph_names(path) -> tuple[int, set[str], set[str]]:
    graph = onnx.load(str(path)).graph
    names = {init.name for init in graph.initializer} | {n.name for n in graph.node}
    return len(graph.node), names, {n.op_type for n in graph.node}


def test_aux_head_and_dropout_never_exported(tmp_path):
    with_aux, without = _model("test_pspnet", aux_head=True).train(), _model("test_pspnet", aux_head=False)
    x = torch.randn(1, 3, 48, 48)
    export_onnx(with_aux, x, tmp_path / "aux.onnx", rtol=1e-6)
    export_onnx(without, x, tmp_path / "plain.onnx", rtol=1e-6)
    (count_aux, names_aux, ops_aux), (count, _, ops) = _graph_names(tmp_path / "aux.onnx"), \
        _graph_names(tmp_path / "plain.onnx")
    assert count_aux == count and ops_aux == ops
    assert not any("aux" in n for n in names_aux) and "Dropout" not in ops_aux
    assert with_aux.training and with_aux.aux_head.training  # modes restored
    assert len(_run(tmp_path / "aux.onnx", x).shape) == 4  # one output: the logits


@torch.library.custom_op("segprune_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x.sin()


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Mystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return {"out": _mystery(self.conv(x))}


def test_op_names_read_from_both_exporters_messages():
    torchscript = RuntimeError("Exporting the operator 'aten::fft_rfft2' to ONNX opset version 17 is not supported.")
    dynamo = RuntimeError("No ONNX function found for <OpOverload(op='segprune_test.mystery', overload='default')>")
    dynamo.__cause__ = RuntimeError("call_function[target=torch.ops.segprune_test.mystery.default](args = ...)")
    assert unsupported_ops(torchscript) == ["aten::fft_rfft2"]
    assert unsupported_ops(dynamo) == ["segprune_test::mystery"]


def test_unexportable_op_is_named(tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="segprune_test.*mystery") as err:
        export_onnx(Mystery(), torch.randn(1, 3, 8, 8), path, exporter="torchscript")
    assert "no ONNX equivalent" in str(err.value)
    assert not path.exists() and list(tmp_path.iterdir()) == []


class FunctionalPool(nn.Module):
    """Adaptive pooling as a function, which the module scan cannot see: the dynamic-H/W export must fail over."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = nn.functional.adaptive_avg_pool2d(self.conv(x), 2)
        return {"out": nn.functional.interpolate(y, size=x.shape[-2:], mode="nearest")}


def test_export_failing_with_dynamic_size_falls_back_to_fewer_axes(tmp_path):
    result = export_onnx(FunctionalPool(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", exporter="torchscript")
    assert result["dynamic_axes"] == {0: "batch"}
    assert "dynamic batch/height/width dropped" in result["notes"][0] and "adaptive_avg_pool2d" in result["notes"][0]
    assert result["checked_shapes"] == [[1, 3, 8, 8], [2, 3, 8, 8]]


def test_unknown_op_is_not_retried_with_fewer_axes(tmp_path):
    with pytest.raises(ExportError) as err:
        export_onnx(Mystery(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", exporter="torchscript")
    assert err.value.ops == ["segprune_test::mystery"] and "dynamic" not in str(err.value)


class Drifting(nn.Module):
    """Computes something new on every call: no exported graph can match it, so the parity check must fail."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return {"out": x * self.calls}


def test_parity_failure_is_an_error_and_writes_nothing(tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="max abs diff") as err:
        export_onnx(Drifting(), torch.randn(1, 3, 8, 8), path)
    assert "of the outputs" in str(err.value) and "eager PyTorch itself moves by" in str(err.value)
    assert list(tmp_path.iterdir()) == []
    result = export_onnx(Drifting(), torch.randn(1, 3, 8, 8), path, check=False)
    assert result["max_abs_diff"] is None and path.exists()


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(nn.Identity(), torch.randn(1, 3, 4, 4), tmp_path / "m.onnx", opset=13)
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(nn.Identity(), torch.randn(1, 3, 4, 4), tmp_path / "m.onnx", exporter="magic")


class TinyAux(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
        self.cls, self.aux = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        feat = self.body(x)
        return {"out": self.cls(feat), **({"aux": self.aux(feat)} if self.training else {})}


@pytest.mark.parametrize("export", [export_torchscript, export_program])
def test_pytorch_formats_round_trip(tmp_path, export):
    model = randomize_norms(TinyAux()).train()
    x = torch.randn(2, 3, 8, 8)
    result = export(model, x, tmp_path / ("m.pt" if export is export_torchscript else "m.pt2"))
    assert result["max_abs_diff"] <= 1e-5 and result["file_bytes"] > 0
    assert model.training and list(tmp_path.iterdir()) == [tmp_path / result["path"].rsplit("/", 1)[-1]]


def test_yolact_exports_its_raw_outputs_and_detections_match_eager(tmp_path):
    from segprune.models.yolact import postprocess

    model, path = _model("test_yolact", width=0.125), tmp_path / "y.onnx"
    result = export_onnx(model, torch.randn(1, 3, 64, 64), path)
    assert result["dynamic_axes"] == {0: "batch", 2: "height", 3: "width"} and result["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["cls", "box", "coef", "proto"]  # no "seg": training only
    x = torch.randn(2, 3, 80, 96)  # another batch and size: the anchor count follows the input
    got = dict(zip(model.export_outputs, map(torch.from_numpy, session.run(None, {"input": x.numpy()}))))
    with torch.no_grad():
        want = model.eval()(x)
    for key in model.export_outputs:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)
    anchors = model.anchors(80, 96)
    ours, theirs = postprocess(want, anchors, (80, 96)), postprocess(got, anchors, (80, 96))
    assert len(ours[0]["scores"]) > 0
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-4, atol=1e-5)
        assert torch.equal(a["labels"], b["labels"]) and (a["masks"] != b["masks"]).float().mean() < 1e-3


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_yolact_torchscript_round_trip(tmp_path):
    model = _model("test_yolact", width=0.125)
    result = export_torchscript(model, torch.randn(1, 3, 64, 64), tmp_path / "y.pt")
    assert result["max_abs_diff"] <= 1e-5
    loaded = torch.jit.load(str(tmp_path / "y.pt"))
    with torch.no_grad():
        cls, box, coef, proto = loaded(torch.zeros(1, 3, 64, 64))
        assert torch.equal(proto, model.eval()(torch.zeros(1, 3, 64, 64))["proto"])


@pytest.mark.parametrize("out", [(3, 3), (6, 6), (2, 3), (None, 4), (5, 1)])
@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (1, 3, 17, 23), (1, 2, 7, 5)])
def test_the_matrix_form_of_adaptive_pooling_is_pytorchs(out, shape):
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(MatrixAdaptiveAvgPool(out)(x), nn.AdaptiveAvgPool2d(out)(x), rtol=0, atol=1e-12)


def test_pyramid_bins_that_do_not_divide_the_map_export_in_matrix_form(tmp_path):
    # 64 px (PSPNet, stride 8) gives an 8x8 map: bins 3 and 6 do not divide it (the TorchScript exporter refuses
    # AdaptiveAvgPool2d there, and the dynamo exporter writes gathered windows, a Transpose and a ReduceMean)
    model = _model("test_pspnet")
    result = export_onnx(model, torch.randn(1, 3, 64, 64), tmp_path / "m.onnx", dynamic=False, rtol=1e-6)
    assert any("averaging matrices" in note for note in result["notes"])
    ops = {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "MatMul" in ops and "ReduceMean" not in ops
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(_run(tmp_path / "m.onnx", x), _eager(model, x), rtol=1e-5, atol=1e-4)
