"""segprune: structured pruning for segmentation networks, proven exact by a masked-equivalence oracle.

`segprune.load` and `segprune.save` (checkpoint folders, which build models from the zoo), `segprune.profile`
(measurement) and `segprune.predictor` (a checkpoint ready to predict images) are imported on first use, so
`import segprune.prune` loads the engine alone.
"""

from segprune.prune import (
                            BNSparsity,
                            CAPSparsity,
                            ChannelGroup,
                            Plan,
                            PruneResult,
                            Taylor,
                            channel_groups,
                            register_replacement,
                            register_surgery,
)
from segprune.prune.api import prune  # after the line above: the function, not the subpackage, is `segprune.prune`
from segprune.prune.latency import LatencyTable

__version__ = "0.1.0"
__all__ = ["BNSparsity", "CAPSparsity", "ChannelGroup", "LatencyTable", "Plan", "PruneResult", "Taylor",
           "channel_groups", "load", "predictor", "profile", "prune", "register_replacement", "register_surgery",
           "save"]
_LAZY = {"load": "segprune.checkpoint", "save": "segprune.checkpoint", "profile": "segprune.eval.profile",
         "predictor": "segprune.workflows.inference"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segprune' has no attribute {name!r}")
