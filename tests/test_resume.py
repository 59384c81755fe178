"""Training checkpoints: a run killed mid-epoch and resumed ends with the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from segprune import checkpoint
from segprune.cli import main
from segprune.data.synthetic import SyntheticScenes
from segprune.train.loop import fit
from segprune.train.resume import Checkpoints, Progress, decode, encode

# Runs segprune.cli in a subprocess. With BLOCK_AFTER=n it hangs on fetching the (n+1)-th training sample, so
# the test can kill it at a known point; FETCH_LOG receives the number of training samples fetched at exit.
SCRIPT = """
import atexit, os, sys, time
from segprune.data.synthetic import SyntheticScenes
block, fetched, fetch = int(os.environ.get("BLOCK_AFTER", "0")), [0], SyntheticScenes.__getitem__
def counting(self, index):
    if self.split == "train":
        fetched[0] += 1
        if block and fetched[0] > block:
            time.sleep(600)
    return fetch(self, index)
SyntheticScenes.__getitem__ = counting
atexit.register(lambda: open(os.environ["FETCH_LOG"], "w").write(str(fetched[0])))
from segprune.cli import main
sys.exit(main(sys.argv[1:]))
"""
# 8 samples in batches of 2: 4 steps per epoch, 12 in all; slimming's lambda ramps up over 10 steps, so the
# regulariser's step counter must survive the resume too.
TRAIN = ["train", "--model", "test_pspnet", "--data", "synthetic", "--quiet", "--set", "size=[32,32]",
         "--set", "width=0.03125", "--set", "train_samples=8", "--set", "val_samples=2", "--set", "batch_size=2",
         "--set", "epochs=3", "--set", "checkpoint_every=2", "--set", "warmup=10", "--set", "threads=1"]


def _launch(tmp_path, out, *extra, block=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FETCH_LOG": str(out) + ".fetched", "BLOCK_AFTER": str(block)}
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    return subprocess.Popen([sys.executable, str(script), *TRAIN, "--out", str(out), *extra], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(proc, latest, name, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not (latest.is_file() and latest.read_text() == name):
        assert proc.poll() is None, f"training ended before writing {name}: {proc.stdout.read()}"
        assert time.monotonic() < deadline, f"no checkpoint {name} after {timeout} s"
        time.sleep(0.05)


def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, capsys):
    reference, run = tmp_path / "reference", tmp_path / "run"
    uninterrupted = _launch(tmp_path, reference)
    killed = _launch(tmp_path, run, block=12)  # hangs fetching batch 7: step 6 (mid-epoch 2) is its last save
    _wait_for_checkpoint(killed, run / "checkpoints" / "latest", "step-0000006")
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    assert not (run / "model").exists() and len((run / "train.csv").read_text().splitlines()) == 2  # header + 1
    assert main([*TRAIN, "--set", "epochs=4", "--out", str(run), "--resume"]) == 2  # a resume keeps the settings
    assert "differ: epochs" in capsys.readouterr().err

    resumed = _launch(tmp_path, run, "--resume")
    assert resumed.wait(timeout=60) == 0, resumed.stdout.read()
    assert uninterrupted.wait(timeout=60) == 0, uninterrupted.stdout.read()
    # The resumed process loaded only the 2 batches left of epoch 2 and epoch 3: 12 of the 24 samples.
    assert (tmp_path / "run.fetched").read_text() == "12"
    assert (tmp_path / "reference.fetched").read_text() == "24"
    got, want = load_file(run / "model" / "weights.safetensors"), load_file(reference / "model" / "weights.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key].double(), want[key].double(), atol=1e-6, rtol=0), key
    losses = [[row.split(",")[:4] for row in (folder / "train.csv").read_text().splitlines()]
              for folder in (run, reference)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]  # epoch, step, loss, lr of each epoch, exactly
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())


class _Augmented(Dataset):
    """Synthetic scenes plus noise from a seeded generator (a main-process augmentation stream); can fail."""

    def __init__(self, fail_after: int | None = None):
        self.scenes = SyntheticScenes(num_samples=8, size=(16, 16), num_classes=3)
        self.transform = self  # found by the checkpoint through dataset.transform.generators()
        self.generator = torch.Generator().manual_seed(5)
        self.fetched, self.fail_after = 0, fail_after

    def generators(self):
        return [self.generator]

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, index):
        self.fetched += 1
        if self.fail_after is not None and self.fetched > self.fail_after:
            raise KeyboardInterrupt  # stands for the kill
        image, mask = self.scenes[index]
        return image + 0.1 * torch.randn(image.shape, generator=self.generator), mask


def _dropout_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Dropout2d(0.3),
                         nn.Conv2d(8, 3, 1))


def _fit(data, folder, *, resume=False):
    loader = DataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = _dropout_net()
    losses = fit(model, loader, epochs=3, lr=0.05, optimizer="sgd", accumulate=2, progress=False, resume=resume,
                 checkpoints=Checkpoints(folder, every=1, keep=1, config={}), log_dir=folder)
    return model, losses


def test_interrupted_fit_resumes_order_augmentation_dropout_and_accumulation(tmp_path):
    torch.manual_seed(0)
    reference, reference_losses = _fit(_Augmented(), tmp_path / "reference")
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):  # 4 batches of 2 per epoch, a step every 2: dies in epoch 2, step 4
        _fit(_Augmented(fail_after=12), tmp_path / "run")
    assert (tmp_path / "run" / "latest").read_text() == "step-0000003"
    torch.manual_seed(123)  # the checkpoint's RNG states, not these, must drive dropout from here on
    data = _Augmented()
    model, losses = _fit(data, tmp_path / "run", resume=True)
    assert data.fetched == 12  # batches 3-4 of epoch 2 and epoch 3; the finished ones were not loaded
    assert losses == reference_losses and len(losses) == 3
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(got, want, atol=1e-6, rtol=0), name
    rows = (tmp_path / "run" / "train.csv").read_text().splitlines()
    assert rows[0] == "epoch,step,loss,lr,seconds,val_miou" and [r.split(",")[:2] for r in rows[1:]] == [
        ["1", "2"], ["2", "4"], ["3", "6"]]


def test_resume_without_a_checkpoint_starts_fresh_and_a_finished_run_stays_finished(tmp_path):
    torch.manual_seed(0)
    _, first = _fit(_Augmented(), tmp_path / "run", resume=True)  # nothing to resume: trains from scratch
    data = _Augmented()
    _, again = _fit(data, tmp_path / "run", resume=True)
    assert again == first and data.fetched == 0


def test_state_encoding_round_trips_without_pickle():
    param = nn.Parameter(torch.ones(3))
    adam = torch.optim.AdamW([param], lr=0.1, betas=(0.8, 0.9))
    param.grad = torch.full((3,), 0.5)
    adam.step()
    state = {"optimizer": adam.state_dict(), "numpy": np.random.RandomState(3).get_state(), "none": None}
    tensors = {}
    structure = json.loads(json.dumps(encode(state, tensors, "s")))  # JSON only
    back = decode(structure, tensors)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)  # a tuple again
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], adam.state_dict()["state"][0]["exp_avg"])
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    with pytest.raises(TypeError, match="pickle"):
        encode({"x": object()}, {}, "s")


def test_checkpoint_folders_are_complete_model_checkpoints_and_old_ones_go(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    store = Checkpoints(tmp_path, every=2, keep=2, config={"model": "test_unet", "model_kwargs": {"num_classes": 3}})
    for step in (2, 4, 6):
        store.save(Progress(step=step), model=model, optimizer=optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000004", "step-0000006"]
    assert store.latest() == tmp_path / "step-0000006"
    assert {p.name for p in store.latest().iterdir()} == {
        "weights.safetensors", "plan.json", "config.json", "state.json", "state.safetensors"}
    assert checkpoint.load_config(store.latest())["model"] == "test_unet"
    assert [store.due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]


def test_train_refuses_a_used_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["train", "--data", "synthetic", "--out", str(out), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--data", "synthetic", "--out", str(out), "--resume", "--force"]) == 2
    assert main(["train", "--data", "synthetic", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert (out / "keep.txt").read_text() == "precious"
