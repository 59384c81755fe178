import os
from pathlib import Path

import pytest
import torch
from torch import nn


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm non-trivial affine parameters and statistics, so a masked channel differs from a live one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@pytest.fixture
def data_root() -> Path:
    """The real data folder, from SEGPRUNE_DATA; tests that need it skip with the reason when it is absent."""
    root = os.environ.get("SEGPRUNE_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("real data not available: set SEGPRUNE_DATA to the folder holding camvid/ (see README)")
    return Path(root)
