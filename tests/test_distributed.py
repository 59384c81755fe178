"""DDP on CPU (gloo): two processes train to the weights of one process with the same global batch, and the
all-reduced confusion matrix equals a single process's."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this build")

# The same script runs as one plain process or as N processes under torchrun.
WORKER = """
import json, sys
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from segprune.data import make_loader
from segprune.data.synthetic import SyntheticScenes
from segprune.eval.metrics import ConfusionMatrix, evaluate
from segprune.train import distributed
from segprune.train.resume import Checkpoints
from segprune.train.loop import fit

out = sys.argv[1]
device = distributed.setup("cpu")
world, rank = distributed.get_world_size(), distributed.get_rank()
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 1))
net = distributed.wrap(model, device)
train = SyntheticScenes(num_samples=16, size=(24, 24), num_classes=4)
loader = make_loader(train, batch_size=8 // world, shuffle=True, seed=0, drop_last=True, distributed=True,
                     num_replicas=world, rank=rank)
losses = fit(net, loader, epochs=2, lr=0.1, accumulate=2, progress=False, log_dir=out,
             checkpoints=Checkpoints(out + "/checkpoints", every=1, config={}))
val = SyntheticScenes(num_samples=5, size=(24, 24), num_classes=4, split="val")  # 5: the shards differ in size
shard = DataLoader(val, batch_size=2, sampler=distributed.ShardSampler(len(val)))
metrics = evaluate(model, shard, num_classes=4, all_reduce=True)
matrix = ConfusionMatrix(4)
with torch.no_grad():
    for images, targets in shard:
        matrix.update(model(images), targets)
matrix.all_reduce()
if distributed.is_main():
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out + "/weights.safetensors")
    json.dump({"world": world, "losses": losses, "metrics": metrics, "matrix": matrix.mat.tolist(),
               "shard": len(shard.sampler)}, open(out + "/result.json", "w"))
distributed.cleanup()
"""


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2", *args]


def test_two_gloo_processes_match_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir(), double.mkdir()
    one = subprocess.Popen([sys.executable, str(script), str(single)], env=_env(), cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    two = subprocess.run(_torchrun(str(script), str(double)), env=_env(), cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert two.returncode == 0, two.stdout + two.stderr
    assert one.wait(timeout=120) == 0, one.stdout.read()
    a, b = (json.loads((folder / "result.json").read_text()) for folder in (single, double))
    assert (a["world"], b["world"]) == (1, 2) and b["shard"] == 3  # rank 0 held 3 of the 5 validation images
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)  # mean over ranks = mean over the global batch
    got, want = load_file(double / "weights.safetensors"), load_file(single / "weights.safetensors")
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-5, rtol=1e-4), key
    assert not torch.allclose(want["0.weight"], _initial_conv())  # training moved the weights
    assert b["matrix"] == a["matrix"] and sum(map(sum, a["matrix"])) == 5 * 24 * 24  # every pixel once
    assert b["metrics"] == a["metrics"]
    assert (double / "checkpoints" / "latest").read_text() == "step-0000002"  # 2 steps per epoch, rank 0 wrote
    assert len((double / "train.csv").read_text().splitlines()) == 3


def _initial_conv():
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, 8, 3, padding=1).weight.detach()


def test_cli_train_under_torchrun(tmp_path):
    out = tmp_path / "run"
    args = ["-m", "segprune.cli", "train", "--model", "test_unet", "--data", "synthetic", "--out", str(out), "--quiet",
            "--set", "method=l1", "--set", "size=[32,32]", "--set", "width=0.03125", "--set", "train_samples=8",
            "--set", "val_samples=3", "--set", "batch_size=4", "--set", "epochs=2", "--set", "checkpoint_every=1",
            "--set", "threads=1"]
    done = subprocess.run(_torchrun(*args), env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 1 and len(metrics["iou"]) == 6
    rows = (out / "train.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["1", "2"], ["2", "4"]]  # global batch 4 of 8 samples
    log = (out / "log.txt").read_text()
    assert "2 process(es)" in log and log.count("epoch 1/2") == 1  # rank 0 alone logs
    assert (out / "model" / "weights.safetensors").is_file()
