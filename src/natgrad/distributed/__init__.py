"""natgrad.distributed: torch.distributed reductions of curvature statistics."""

from natgrad.distributed.agreement import Agreement, ProcessFailure, agree_on_errors
from natgrad.distributed.reduce import (
    all_reduce_sum_,
    assign_owners,
    broadcast_from_,
    is_distributed,
    mean_over_processes,
    rank,
    true_everywhere,
    world_size,
)
from natgrad.distributed.shards import GlobalBatch, Shard

__all__ = [
    "Agreement",
    "GlobalBatch",
    "ProcessFailure",
    "Shard",
    "agree_on_errors",
    "all_reduce_sum_",
    "assign_owners",
    "broadcast_from_",
    "is_distributed",
    "mean_over_processes",
    "rank",
    "true_everywhere",
    "world_size",
]
