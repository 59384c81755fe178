"""The pruning engine: trace, group, score, decide, cut, record. It works on any nn.Module and never
imports segprune.models."""

from segprune.prune.api import PruneResult, prune
from segprune.prune.graph import ChannelGroup, Member, channel_groups
from segprune.prune.plan import Plan
from segprune.prune.regularizer import BNSparsity
from segprune.prune.surgery import register_surgery

__all__ = ["BNSparsity", "ChannelGroup", "Member", "Plan", "PruneResult", "channel_groups", "prune",
           "register_surgery"]
