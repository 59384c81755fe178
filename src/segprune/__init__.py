"""segprune: structured pruning for segmentation networks, proven exact by a masked-equivalence oracle."""

from segprune.checkpoint import load, save
from segprune.eval.profile import profile
from segprune.prune import (
                            BNSparsity,
                            CAPSparsity,
                            ChannelGroup,
                            Plan,
                            PruneResult,
                            Taylor,
                            channel_groups,
                            register_surgery,
)
from segprune.prune.api import prune  # after the line above: the function, not the subpackage, is `segprune.prune`
from segprune.prune.latency import LatencyTable

__version__ = "0.1.0"
__all__ = ["BNSparsity", "CAPSparsity", "ChannelGroup", "LatencyTable", "Plan", "PruneResult", "Taylor",
           "channel_groups", "load", "profile", "prune", "register_surgery", "save"]
