"""`segprune.load`: a pruned model comes back with identical outputs, and every broken checkpoint is a clear error
naming the file."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import segprune
from segprune.checkpoint import CheckpointError
from segprune.models import create_model
from tests.conftest import randomize_norms

CONFIG = {"model": "test_pspnet", "model_kwargs": {"num_classes": 3}}


@pytest.fixture(scope="module")
def pruned_once(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_norms(create_model("test_pspnet", num_classes=3)).eval()
    result = segprune.prune(model, torch.randn(1, 3, 32, 32), ratio=0.4)
    folder = tmp_path_factory.mktemp("pruned") / "ck"
    return segprune.save(folder, result.model, config=CONFIG, plan=result.plan), result.model.eval()


@pytest.fixture
def pruned(tmp_path, pruned_once):
    """A pruned tiny PSPNet saved as a checkpoint, a fresh copy per test: (folder, model)."""
    folder, model = pruned_once
    return Path(shutil.copytree(folder, tmp_path / "ck")), model


def test_round_trip_of_a_pruned_model_is_identical(pruned):
    folder, model = pruned
    restored = segprune.load(folder)
    assert not restored.training
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        assert torch.equal(restored(x)["out"], model(x)["out"])
    assert sum(p.numel() for p in restored.parameters()) == sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in restored.parameters()) < sum(
        p.numel() for p in create_model("test_pspnet", num_classes=3).parameters())


def test_missing_folder_or_file_is_named(tmp_path, pruned):
    folder, _ = pruned
    with pytest.raises(CheckpointError, match="does not exist"):
        segprune.load(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        segprune.load(tmp_path / "file.txt")
    for name in ("plan.json", "config.json", "weights.safetensors"):
        (folder / name).rename(folder / "moved")
        with pytest.raises(CheckpointError, match=f"{name} is missing"):
            segprune.load(folder)
        (folder / "moved").rename(folder / name)
    segprune.load(folder)  # all three back: loads again


@pytest.mark.parametrize("keep", [0, 9, 100, -50])
def test_truncated_weights_are_named(pruned, keep):
    folder, _ = pruned
    weights = folder / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match="weights.safetensors: unreadable weights"):
        segprune.load(folder)


def test_tampered_weights_fail_the_digest(pruned):
    folder, _ = pruned
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0xFF  # one byte of the last tensor: still a valid file, different numbers
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        segprune.load(folder)


def test_garbage_header_is_named(pruned):
    folder, _ = pruned
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"not json!!!!"
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="weights.safetensors"):
        segprune.load(folder)


@pytest.mark.parametrize("text", ["", '{"format": "segprune.plan/1", "modu', "not json", "[]", '{"format": "x"}',
                                  '{"format": "segprune.plan/1", "modules": []}', "\udcff"])
def test_corrupt_plan_is_named(pruned, text):
    folder, _ = pruned
    (folder / "plan.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CheckpointError, match="plan.json"):
        segprune.load(folder)


def test_plan_for_another_model_is_named(pruned):
    folder, _ = pruned
    plan = json.loads((folder / "plan.json").read_text())
    name, entry = next(iter(plan["modules"].items()))
    if "out" in entry:
        entry["out"] = [10_000]  # an index the layer does not have
    else:
        entry["in"] = [10_000]
    (folder / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(CheckpointError, match="plan.json"):
        segprune.load(folder)
    (folder / "config.json").write_text(json.dumps({"model": "test_unet", "model_kwargs": {"num_classes": 3}}))
    with pytest.raises(CheckpointError, match="plan.json"):
        segprune.load(folder)


@pytest.mark.parametrize("text", ["", "{", "null", '["test_pspnet"]', '{"model": 3}',
                                  '{"model": "test_pspnet", "model_kwargs": []}',
                                  '{"model": "no_such_model", "model_kwargs": {"num_classes": 3}}',
                                  '{"model": "test_pspnet", "model_kwargs": {"num_classes": 3, "wings": 2}}'])
def test_corrupt_config_is_named(pruned, text):
    folder, _ = pruned
    (folder / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="config.json"):
        segprune.load(folder)


def test_weights_of_another_width_are_named(tmp_path, pruned):
    folder, _ = pruned
    other = segprune.save(tmp_path / "other", create_model("test_pspnet", num_classes=3), config=CONFIG)
    (other / "weights.safetensors").replace(folder / "weights.safetensors")  # unpruned weights, pruned plan
    with pytest.raises(CheckpointError, match="weights.safetensors does not fit"):
        segprune.load(folder)


def test_checkpoint_without_digest_still_loads(tmp_path):
    # Checkpoints written before the digest existed have no metadata: they load, unchecked.
    from safetensors.torch import save_file

    model = create_model("test_unet", num_classes=3)
    folder = segprune.save(tmp_path / "ck", model, config={"model": "test_unet", "model_kwargs": {"num_classes": 3}})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "weights.safetensors"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(segprune.load(folder)(x)["out"], model.eval()(x)["out"])
