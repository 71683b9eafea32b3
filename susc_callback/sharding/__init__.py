"""Estimates split across processes and nodes: chains as units of work, merged by adding
their running sums, resumable through shards on disk (``docs/distributed.md``)."""

from susc_callback.sharding.collectives import PeerError
from susc_callback.sharding.estimate import estimate_chains, estimate_distributed, merged_result
from susc_callback.sharding.plan import WorkUnit, rank_share, work_units
from susc_callback.sharding.shard import ChainShard, merge_shards, split_draws
from susc_callback.sharding.store import ShardMismatchError, ShardStore

__all__ = ["ChainShard", "PeerError", "ShardMismatchError", "ShardStore", "WorkUnit",
           "estimate_chains", "estimate_distributed", "merge_shards", "merged_result",
           "rank_share", "split_draws", "work_units"]
