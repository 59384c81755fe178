"""The pruning engine: trace, group, score, decide, cut, record. It works on any nn.Module and never
imports segprune.models."""

from segprune.prune.api import PruneResult, prune
from segprune.prune.blocks import Block, bypass_blocks, prune_blocks, residual_blocks, score_blocks, slim_layers
from segprune.prune.cost import CostModel
from segprune.prune.criteria import Taylor
from segprune.prune.graph import ChannelGroup, ChannelGroups, Member, channel_groups
from segprune.prune.plan import Plan
from segprune.prune.postprune import PruningPath, pruning_path
from segprune.prune.regularizer import BNSparsity, CAPSparsity
from segprune.prune.replace import SplitMultiheadAttention, register_replacement
from segprune.prune.surgery import register_surgery

__all__ = ["BNSparsity", "Block", "CAPSparsity", "ChannelGroup", "ChannelGroups", "CostModel", "Member", "Plan",
           "PruneResult", "PruningPath", "Taylor", "bypass_blocks", "channel_groups", "prune", "prune_blocks",
           "pruning_path", "register_replacement", "register_surgery", "residual_blocks", "score_blocks", "slim_layers",
           "SplitMultiheadAttention"]
