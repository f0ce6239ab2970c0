"""torch.distributed reductions of curvature statistics and placement of inverse work.

All functions are no-ops in a single process (``torch.distributed`` not initialised or a world
of size 1), so optimizers call them unconditionally.

Sums, not means, are all-reduced: each process contributes the sum of its per-sample statistics
and its sample count, and the global mean is ``Σ sums / Σ counts``. The result therefore equals
one process on the global batch even when the local batches differ in size.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

if dist.is_available():
    # torch.distributed.nn's functions take ``group=group.WORLD`` as a default argument, bound
    # when the module is first imported. Imported after ``init_process_group`` (torch.optim
    # optimizers import it through torch._dynamo, e.g. the Adam of ``fit_pnmf_data_parallel``),
    # they keep the default group alive, ``destroy_process_group`` cannot free it, and its gloo
    # threads can abort a spawned process at exit (torch 2.13). Importing it here, with natgrad,
    # binds the defaults before any group exists.
    importlib.import_module("torch.distributed.nn")

__all__ = [
    "all_reduce_sum_",
    "assign_owners",
    "broadcast_from_",
    "is_distributed",
    "mean_over_processes",
    "rank",
    "true_everywhere",
    "world_size",
]


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one process in ``group``."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device of the tensors that ``group``'s collectives take: the current CUDA device
    where its only backend is NCCL, the CPU otherwise (gloo, ``"cpu:gloo,cuda:nccl"``)."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of processes in ``group`` (1 without torch.distributed)."""
    return dist.get_world_size(group) if is_distributed(group) else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 without torch.distributed)."""
    return dist.get_rank(group) if is_distributed(group) else 0


def all_reduce_sum_(tensors: Sequence[Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Sum ``tensors`` over all processes, in place, with one coalesced all-reduce per dtype
    and device (in the order of their first appearance).

    Parameters
    ----------
    tensors : sequence of Tensor
        Same shapes, dtypes, devices and order on every process.
    group : ProcessGroup, optional
    """
    if not tensors or not is_distributed(group):
        return
    kinds = list(dict.fromkeys((tensor.dtype, tensor.device) for tensor in tensors))
    for kind in kinds:
        _coalesced_sum_([t for t in tensors if (t.dtype, t.device) == kind], group)


def _coalesced_sum_(tensors: Sequence[Tensor], group: dist.ProcessGroup | None) -> None:
    """:func:`all_reduce_sum_` of tensors of one dtype and device, in one all-reduce."""
    buffer = torch.cat([tensor.reshape(-1) for tensor in tensors])
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    for tensor, chunk in zip(tensors, buffer.split([t.numel() for t in tensors]), strict=True):
        tensor.copy_(chunk.view_as(tensor))


def true_everywhere(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``flag`` holds on every process of ``group`` (one all-reduce; ``flag`` itself in
    a single process). Processes that must take the same branch around a collective (refuse a
    step together) decide with it."""
    if not is_distributed(group):
        return flag
    failures = torch.tensor(
        [0.0 if flag else 1.0], dtype=torch.float64, device=collective_device(group)
    )
    dist.all_reduce(failures, op=dist.ReduceOp.SUM, group=group)
    return float(failures) == 0.0


def mean_over_processes(
    values: Sequence[Tensor], group: dist.ProcessGroup | None = None
) -> list[Tensor]:
    """Scalars ``values`` (e.g. losses) averaged over the processes of ``group``, in float64,
    with equal weights (one all-reduce); ``values`` themselves in a single process.

    Under ``DistributedDataParallel`` the objective whose gradient is averaged is the mean of
    the processes' losses, so this is the loss that gradient belongs to.
    """
    if not is_distributed(group):
        return list(values)
    stacked = torch.stack([value.detach().reshape(()).to(torch.float64) for value in values])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    return list((stacked / world_size(group)).unbind())


def assign_owners(costs: Sequence[float], size: int) -> list[int]:
    """Greedy placement of work items on ``size`` processes, most expensive first.

    Each item goes to the currently least loaded process (ties to the lowest rank), which
    balances e.g. eigendecompositions costing ``d³`` per factor.

    Returns
    -------
    list of int
        Owner rank of each item, in the order of ``costs``.
    """
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    loads = [0.0] * size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
        owner = min(range(size), key=lambda r: (loads[r], r))
        owners[index] = owner
        loads[owner] += costs[index]
    return owners


def broadcast_from_(
    tensors: Sequence[Tensor], owner: int, group: dist.ProcessGroup | None = None
) -> None:
    """Overwrite ``tensors`` on every process with the owner's values (``owner`` is a rank
    within ``group``), in place, coalesced into one broadcast."""
    if not tensors or not is_distributed(group):
        return
    source = owner if group is None else dist.get_global_rank(group, owner)
    buffer = torch.cat([tensor.reshape(-1) for tensor in tensors])
    dist.broadcast(buffer, src=source, group=group)
    for tensor, chunk in zip(tensors, buffer.split([t.numel() for t in tensors]), strict=True):
        tensor.copy_(chunk.view_as(tensor))
