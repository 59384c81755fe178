"""`segprune bench` and `segprune export` end to end on tiny checkpoints, and their errors on bad input."""

import json
import shutil

import pytest
import torch

import segprune
from segprune.cli import main
from segprune.models import create_model
from tests.conftest import randomize_norms

CONFIG = {"model": "test_unet", "model_kwargs": {"num_classes": 3}}
FAST = ["--input-size", "32", "32", "--rounds", "2", "--runs", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An unpruned and a pruned tiny U-Net checkpoint: (dense, pruned) folders."""
    root = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    model = randomize_norms(create_model("test_unet", num_classes=3)).eval()
    dense = segprune.save(root / "dense", model, config=CONFIG)
    result = segprune.prune(model, torch.randn(1, 3, 32, 32), ratio=0.5)
    return dense, segprune.save(root / "pruned", result.model, config=CONFIG, plan=result.plan)


def test_bench_table_and_json(tmp_path, checkpoints, capsys):
    dense, pruned = checkpoints
    out = tmp_path / "bench.json"
    assert main(["bench", str(dense), str(pruned), *FAST, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "pruned" in printed and "eager ms" in printed
    result = json.loads(out.read_text())
    assert list(tmp_path.iterdir()) == [out]  # written atomically: no temporary file left
    first, second = result["rows"]
    assert first["ratios"] == {k: 1.0 for k in ("params", "macs", "weights_bytes", "latency_ms")}
    assert second["ratios"]["params"] < 1 and second["ratios"]["macs"] < 1 and second["ratios"]["weights_bytes"] < 1
    # measured as deployed, Conv+BN folded: each BN's 2 parameters per channel become 1 conv bias
    assert first["params"] < sum(p.numel() for p in segprune.load(dense).parameters())
    for row in result["rows"]:
        lat = row["latency"]
        assert (lat["backend"], lat["threads"], lat["batch"], lat["input_size"], lat["rounds"]) == \
            ("eager", 1, 1, [32, 32], 2)
        assert row["latency_ms"] > 0 and row["peak_memory_bytes"] > 0
    assert result["settings"]["fused"] and result["machine"]["torch"] == torch.__version__


def test_bench_with_onnxruntime(checkpoints, capsys):
    pytest.importorskip("onnxruntime", reason="--onnx needs onnxruntime: pip install 'segprune[onnx]'")
    pytest.importorskip("onnx", reason="--onnx needs onnx: pip install 'segprune[onnx]'")
    dense, pruned = checkpoints
    from segprune.workflows.bench import bench

    result = bench([dense, pruned], input_size=(32, 32), rounds=2, runs=2, warmup=1, onnx=True)
    for row in result["rows"]:
        assert row["onnx_latency"]["backend"] == "onnxruntime" and row["onnx_latency"]["threads"] == 1
        assert row["onnx_bytes"] > 0 and row["onnx_max_abs_diff"] <= 1e-4
    assert result["rows"][1]["ratios"]["onnx_bytes"] < 1


def test_bench_errors_are_named(tmp_path, checkpoints, capsys):
    dense, pruned = checkpoints
    assert main(["bench", str(dense), str(tmp_path / "nowhere"), *FAST]) == 2
    assert "nowhere: does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["bench", str(tmp_path / "empty"), *FAST]) == 2
    assert "not a segprune checkpoint" in capsys.readouterr().err
    mixed = shutil.copytree(dense, tmp_path / "mixed")
    shutil.copy(pruned / "weights.safetensors", mixed / "weights.safetensors")
    assert main(["bench", str(mixed), *FAST]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert main(["bench", str(dense), "--input-size", "33", "40", "--rounds", "1", "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert "dense: cannot take input size 33×40" in err and "divisible by 16" in err
    other = segprune.save(tmp_path / "yolact", create_model("test_yolact", num_classes=3),
                          config={"model": "test_yolact", "model_kwargs": {"num_classes": 3}})
    assert main(["bench", str(other), *FAST]) == 0  # an instance model: its export_outputs are timed
    assert "yolact" in capsys.readouterr().out


def test_bench_refuses_a_model_without_the_outputs_it_exports():
    from segprune.workflows.bench import check_takes

    class Named(torch.nn.Module):
        def forward(self, x):
            return {"logits": x}

    with pytest.raises(ValueError, match=r"somewhere: the model returns \['logits'\], not \['out'\]"):
        check_takes("somewhere", Named(), torch.zeros(1, 3, 8, 8))


def test_export_fused_onnx_matches_the_checkpoint(tmp_path, checkpoints, capsys):
    ort = pytest.importorskip("onnxruntime", reason="export's parity check needs onnxruntime")
    pytest.importorskip("onnx", reason="ONNX export needs onnx")
    _, pruned = checkpoints
    out = tmp_path / "m.onnx"
    assert main(["export", str(pruned), "--onnx", str(out), "--fuse", "--input-size", "32", "32"]) == 0
    assert "max abs diff" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        expected = segprune.load(pruned)(x)["out"]
    assert expected.abs().max() > 0.1  # a model that computes something, so the comparison means something
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), expected,
                               rtol=1e-4, atol=1e-4)
    assert main(["export", str(pruned), "--onnx", str(out), "--input-size", "32", "32"]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err


def test_export_errors_are_named(tmp_path, checkpoints, capsys):
    _, pruned = checkpoints
    assert main(["export", str(pruned), "--input-size", "32", "32"]) == 2
    assert "--onnx" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(pruned), "--onnx", str(tmp_path / "m.onnx"), "--input-size", "20", "20"]) == 2
    assert "cannot take input size 20×20" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_export_defaults_to_the_size_the_recipe_trained_at(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="export's parity check needs onnxruntime")
    pytest.importorskip("onnx", reason="ONNX export needs onnx")
    torch.manual_seed(0)
    folder = segprune.save(tmp_path / "yolact", create_model("test_yolact", num_classes=3),
                           config={"model": "test_yolact", "model_kwargs": {"num_classes": 3},
                                   "recipe": {"size": [40, 48]}})
    assert main(["export", str(folder), "--onnx", str(tmp_path / "y.onnx")]) == 0
    assert "[[1, 3, 40, 48]," in capsys.readouterr().out
