"""Per-layer MACs, peak memory, file sizes, and latency of ONNX files next to eager models (runners)."""

import pytest
import torch
from torch import nn

from segprune.eval.profile import (
    as_runner,
    compare_latency,
    count_macs,
    file_bytes,
    latency_rows,
    macs_per_layer,
    measure_latency,
    peak_memory,
    profile,
)
from segprune.export.runtimes import EAGER, ONNXRUNTIME, ort_session
from segprune.export.runtimes.eager import EagerModel
from segprune.export.runtimes.onnxruntime import OrtModel

META = {"median_ms", "p90_ms", "runs", "backend", "device", "dtype", "threads", "batch", "input_size"}


class Functional(nn.Module):
    """Two convs, one of them called twice, and a functional conv in the model's own forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.weight = nn.Parameter(torch.randn(2, 8, 1, 1))

    def forward(self, x):
        x = self.block(self.block(self.a(x)))
        return nn.functional.conv2d(x, self.weight)


def test_macs_per_layer_by_hand():
    h = w = 6
    x = torch.randn(1, 3, h, w)
    model = Functional().train()
    macs = macs_per_layer(model, x)
    assert macs == {"a": 8 * 3 * 9 * h * w, "block.0": 2 * 8 * 8 * h * w, "": 2 * 8 * h * w}
    assert sum(macs.values()) == count_macs(model, x)
    assert model.training  # mode restored


class Chain(nn.Module):
    """Holds two activation-sized tensors at most: a and b, then b and the output."""

    def forward(self, x):
        a = x * 2
        b = a + 1
        del a
        return b * 3


def test_cpu_peak_memory_by_hand():
    x = torch.randn(2, 3, 32, 32)
    result = peak_memory(Chain(), x)
    assert result["peak_bytes"] == 2 * x.numel() * 4
    assert result["device"] == "cpu" and "TorchDispatchMode" in result["method"]
    assert peak_memory(Chain(), torch.randn(4, 3, 32, 32))["peak_bytes"] == 2 * result["peak_bytes"]


def test_views_and_inplace_ops_count_once():
    class Inplace(nn.Module):
        def forward(self, x):
            y = x + 1  # one new tensor
            y.relu_()
            return y.view(-1)[: x.numel() // 2]  # views of it

    x = torch.randn(1, 4, 8, 8)
    assert peak_memory(Inplace(), x)["peak_bytes"] == x.numel() * 4


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="onnxruntime timings need it: pip install 'segprune[onnx]'")
    pytest.importorskip("onnx", reason="ONNX export needs onnx: pip install 'segprune[onnx]'")
    from segprune.export.onnx import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    export_onnx(model, torch.randn(1, 3, 16, 16), path)
    return model, path


def test_measure_latency_of_an_onnx_file(onnx_file):
    _, path = onnx_file
    before = torch.get_num_threads()
    result = measure_latency(path, torch.randn(2, 3, 16, 16), warmup=1, runs=3, threads=1)
    assert META <= result.keys() and result["median_ms"] > 0
    assert (result["backend"], result["device"], result["threads"], result["batch"]) == ("onnxruntime", "cpu", 1, 2)
    assert torch.get_num_threads() == before


def test_compare_latency_mixes_backends(onnx_file):
    model, path = onnx_file
    x = torch.randn(1, 3, 16, 16)
    models = {"eager": model, "ort": path, "session": ort_session(path, threads=1),
              "runner": EAGER.compile(model, x, threads=1)}
    result = compare_latency(models, torch.randn(1, 3, 16, 16), rounds=2, runs=2, warmup=1, threads=1)
    assert [result[k]["backend"] for k in models] == ["eager", "onnxruntime", "onnxruntime", "eager"]
    assert all(META <= r.keys() and r["threads"] == 1 and r["rounds"] == 2 for r in result.values())


def test_runner_choice_and_refusal(onnx_file):
    model, path = onnx_file
    assert isinstance(as_runner(model), EagerModel) and isinstance(as_runner(str(path)), OrtModel)
    runner = ONNXRUNTIME.compile(path, None, threads=1)
    assert as_runner(runner) is runner and runner.threads == 1
    with pytest.raises(TypeError, match="int"):
        as_runner(3)


def test_latency_rows_one_per_backend(onnx_file):
    model, path = onnx_file
    rows = latency_rows(model, torch.randn(1, 3, 16, 16), onnx=path, threads=1, warmup=1, runs=2)
    expected = ["eager", "onnxruntime"] + (["eager", "eager"] if torch.cuda.is_available() else [])
    assert [r["backend"] for r in rows] == expected
    assert all(r["threads"] == 1 for r in rows[:2]) and rows[0]["dtype"] == "float32"
    if torch.cuda.is_available():
        assert [r["dtype"] for r in rows[2:]] == ["float32", "float16"] and rows[2]["device"].startswith("cuda")


def test_profile_extras_and_file_sizes(onnx_file, tmp_path):
    model, path = onnx_file
    x = torch.randn(1, 3, 16, 16)
    result = profile(model, x, layers=True, memory=True, onnx=path)
    assert result["onnx_bytes"] == path.stat().st_size == file_bytes(path)
    assert sum(result["macs_per_layer"].values()) == result["macs"]
    assert result["peak_memory"]["peak_bytes"] >= 8 * 16 * 16 * 4  # the first conv's output at least
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "b").write_bytes(b"x" * 5)
    assert file_bytes(tmp_path) == 15


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_and_latency_rows():
    model = Chain().cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    result = peak_memory(model, x)
    assert result["method"] == "torch.cuda.max_memory_allocated" and result["peak_bytes"] >= 2 * x.numel() * 4
    rows = latency_rows(nn.Conv2d(3, 4, 3), x.cpu(), threads=1, warmup=1, runs=2)
    assert [(r["device"][:4], r["dtype"]) for r in rows] == [("cpu", "float32"), ("cuda", "float32"),
                                                            ("cuda", "float16")]
