"""natgrad.distributed: torch.distributed reductions of curvature statistics."""

from natgrad.distributed.reduce import (
    all_reduce_sum_,
    assign_owners,
    broadcast_from_,
    is_distributed,
    rank,
    world_size,
)

__all__ = [
    "all_reduce_sum_",
    "assign_owners",
    "broadcast_from_",
    "is_distributed",
    "rank",
    "world_size",
]
