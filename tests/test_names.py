"""Names: deprecated keywords still work and their warning says when they go, in one wording; the selection and
post-pruning tables are named for what they hold."""

import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import segprune
from segprune.data.synthetic import SyntheticScenes
from segprune.prune.postprune import POSTPRUNE_SCORES, pruning_path
from segprune.prune.select import SELECTIONS
from segprune.train.loop import fit

REMOVAL = "deprecated since 0.1.0, removed in 0.3.0"


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1))


def _loader():
    return DataLoader(SyntheticScenes(num_samples=2, size=(16, 16)), batch_size=2)


def test_prune_method_warns_with_the_removal_version():
    x = torch.randn(1, 3, 16, 16)
    with pytest.warns(DeprecationWarning, match=r"prune\(method=\.\.\.\) is " + REMOVAL) as caught:
        old = segprune.prune(_net(), x, ratio=0.25, method="uniform")
    assert caught[0].filename == __file__  # points at the caller's line, not at segprune
    new = segprune.prune(_net(), x, ratio=0.25, select="uniform")
    assert old.plan.to_json() == new.plan.to_json()


@pytest.mark.parametrize("keyword, value", [("criterion", nn.CrossEntropyLoss(ignore_index=255)),
                                            ("loss_fn", lambda out, y: nn.functional.cross_entropy(out, y))])
def test_fit_keywords_warn_with_the_removal_version(keyword, value):
    with pytest.warns(DeprecationWarning, match=rf"fit\({keyword}=\.\.\.\) is " + REMOVAL) as caught:
        losses = fit(_net(), _loader(), epochs=1, lr=0.01, progress=False, **{keyword: value})
    assert caught[0].filename == __file__
    assert len(losses) == 1


def test_the_tables_are_named_for_what_they_hold():
    """Threshold selections are SELECTIONS (prune.select) and post-pruning scores POSTPRUNE_SCORES: neither is a
    recipe method (workflows.METHODS) nor a channel criterion (prune.criteria.CRITERIA)."""
    with pytest.raises(ValueError, match=re.escape(f"choose from {sorted(SELECTIONS)}")):
        segprune.prune(_net(), torch.randn(1, 3, 16, 16), ratio=0.25, select="nope")
    assert set(SELECTIONS) == {"global", "uniform"}
    batches = [(torch.randn(1, 3, 16, 16), torch.zeros(1, 16, 16, dtype=torch.long))]
    with pytest.raises(ValueError, match=f"choose from {', '.join(POSTPRUNE_SCORES)}$"):
        pruning_path(_net(), batches[0][0], batches, lambda m: 0.0, criterion="nope")
    assert POSTPRUNE_SCORES == ("taylor", "ablation")
