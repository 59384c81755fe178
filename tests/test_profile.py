"""Parameter, MAC, size and latency measurements against hand-computed values."""

import pytest
import torch
from torch import nn

from segprune.eval.profile import compare_latency, count_macs, count_params, measure_latency, profile, size_bytes

META = {"median_ms", "p90_ms", "runs", "device", "dtype", "threads", "batch", "input_size"}


def test_count_params_conv():
    conv = nn.Conv2d(3, 8, 3)
    assert count_params(conv) == 8 * 3 * 3 * 3 + 8


def test_count_params_counts_shared_once():
    conv = nn.Conv2d(4, 4, 1)
    assert count_params(nn.Sequential(conv, conv)) == 4 * 4 + 4


def test_count_macs_conv_and_mode_restored():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1).train()
    h_out, w_out = 16 // 2, 20 // 2
    assert count_macs(conv, torch.randn(1, 3, 16, 20)) == 8 * 3 * 3 * 3 * h_out * w_out
    assert conv.training


def test_size_bytes_close_to_four_bytes_per_param():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3))
    size = size_bytes(model)
    assert 4 * count_params(model) < size < 4 * count_params(model) + 1024  # header is a few hundred bytes


def test_size_bytes_handles_tied_weights():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    assert size_bytes(nn.Sequential(a, b)) > 4 * (2 * 64 + 16)  # each state-dict entry is written


def test_profile_keys():
    result = profile(nn.Conv2d(3, 4, 1), torch.randn(1, 3, 4, 4))
    assert result == {"params": 16, "macs": 3 * 4 * 16, "size_bytes": result["size_bytes"]}


def test_measure_latency_metadata_and_threads_restored():
    before = torch.get_num_threads()
    model = nn.Conv2d(3, 4, 3).train()
    result = measure_latency(model, torch.randn(2, 3, 16, 16), warmup=1, runs=5, threads=1)
    assert META <= result.keys()
    assert result["median_ms"] > 0 and result["p90_ms"] >= result["median_ms"]
    assert (result["threads"], result["batch"], result["input_size"]) == (1, 2, [16, 16])
    assert (result["device"], result["dtype"], result["runs"]) == ("cpu", "float32", 5)
    assert torch.get_num_threads() == before and model.training


def test_compare_latency_one_entry_per_model():
    models = {"small": nn.Conv2d(3, 4, 1), "big": nn.Conv2d(3, 64, 5, padding=2)}
    result = compare_latency(models, torch.randn(1, 3, 32, 32), rounds=3, runs=3, warmup=1)
    assert set(result) == {"small", "big"}
    for entry in result.values():
        assert META <= entry.keys() and entry["median_ms"] > 0 and entry["rounds"] == 3


@pytest.mark.parametrize("threads", [None, 1])
def test_compare_latency_restores_threads(threads):
    before = torch.get_num_threads()
    compare_latency({"a": nn.Identity()}, torch.randn(1, 3, 4, 4), rounds=1, runs=1, warmup=0, threads=threads)
    assert torch.get_num_threads() == before
