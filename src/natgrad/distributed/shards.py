"""One global batch whose samples are split over the processes of a group.

Under data parallelism each process holds a share of every global batch (its *shard*). A
curvature statistic that is a MEAN over the samples becomes the global batch's by summing the
processes' sums and dividing by the global number of samples (:meth:`Shard.sum_`,
:meth:`Shard.mean_`), so the result equals one process on the global batch also when the shares
differ in size. Monte-Carlo targets are drawn for the whole global batch on every process, each
keeping its own rows (:meth:`Shard.sampling`), so that they are the draws of one process on the
global batch with the same generator.

Without ``torch.distributed`` (or with one process) a shard is the whole batch and every method
returns its argument unchanged, with no arithmetic: results are bit-identical to code that
does not know about shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from natgrad.distributed.reduce import (
    all_reduce_sum_,
    collective_device,
    is_distributed,
    rank,
    true_everywhere,
    world_size,
)

if TYPE_CHECKING:
    from natgrad.curvature.likelihoods import Likelihood
    from natgrad.distributed.agreement import Agreement

__all__ = ["GlobalBatch", "Shard"]


@dataclass(frozen=True)
class GlobalBatch:
    """The batch given to each process is its share of one global batch.

    Parameters
    ----------
    group : ProcessGroup, optional
        The processes that share the batch (default: the world).
    """

    group: dist.ProcessGroup | None = None

    def shard(self, count: int, agreement: Agreement | None = None) -> Shard:
        """This process's :class:`Shard` of ``count`` samples (one all-reduce of the
        processes' counts under ``torch.distributed``).

        Parameters
        ----------
        count : int
        agreement : Agreement, optional
            Carries the failures of the processes' local work before this point (the
            all-reduce of the counts holds its flag): if one failed, every process raises
            (:class:`~natgrad.distributed.agreement.Agreement`).

        Raises
        ------
        ValueError
            If ``count`` is negative, or the global batch has no samples.
        """
        if count < 0:
            raise ValueError(f"a shard cannot hold a negative number of samples, got {count}")
        shares = self._shares(count, agreement) if is_distributed(self.group) else (count,)
        if sum(shares) == 0:
            raise ValueError("the global batch has no samples (every process's shard is empty)")
        return Shard(self.group, shares, rank(self.group))

    def _shares(self, count: int, agreement: Agreement | None) -> tuple[int, ...]:
        """Every process's number of samples, by rank (one all-reduce)."""
        device = collective_device(self.group)
        counts = torch.zeros(world_size(self.group), dtype=torch.int64, device=device)
        counts[rank(self.group)] = count
        if agreement is None:
            all_reduce_sum_([counts], self.group)
        else:
            agreement.all_reduce_sum_([counts])
        return tuple(counts.tolist())


@dataclass(frozen=True)
class Shard:
    """This process's share of a :class:`GlobalBatch`.

    Attributes
    ----------
    group : ProcessGroup or None
    shares : tuple of int
        The number of samples of every process, by rank.
    index : int
        This process's rank in ``group``: its rows of the global batch follow those of the
        lower ranks.
    """

    group: dist.ProcessGroup | None
    shares: tuple[int, ...]
    index: int

    @classmethod
    def whole(cls, count: int) -> Shard:
        """A batch of ``count`` samples held by this process alone (no collectives)."""
        return cls(None, (count,), 0)

    @property
    def sharded(self) -> bool:
        """Whether other processes hold part of the batch (collectives are needed)."""
        return len(self.shares) > 1

    @property
    def count(self) -> int:
        """This process's number of samples."""
        return self.shares[self.index]

    @property
    def total(self) -> int:
        """The global batch's number of samples."""
        return sum(self.shares)

    @property
    def rows(self) -> slice:
        """This process's rows of the global batch."""
        start = sum(self.shares[: self.index])
        return slice(start, start + self.count)

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum ``tensors`` over the processes, in place (one all-reduce per dtype and device)."""
        if self.sharded:
            all_reduce_sum_(tensors, self.group)

    def mean_(self, tensors: Sequence[Tensor]) -> None:
        """Turn ``tensors``, each a mean over this process's samples, into the means over the
        global batch's samples, in place (every shard weighted by its share)."""
        if not self.sharded:
            return
        for tensor in tensors:
            tensor.mul_(self.count / self.total)
        self.sum_(tensors)

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process (one all-reduce when sharded)."""
        return true_everywhere(flag, self.group) if self.sharded else flag

    def gather(self, local: Tensor) -> Tensor:
        """The global batch's rows ``(total, ...)`` of a per-sample tensor ``(count, ...)``,
        every process's in rank order (the same on every process)."""
        if not self.sharded:
            return local
        everyone = local.new_zeros(self.total, *local.shape[1:])
        everyone[self.rows] = local.detach()
        self.sum_([everyone])
        return everyone

    def sampling(self, likelihood: Likelihood) -> Likelihood:
        """``likelihood`` drawing its targets for the global batch and keeping this process's
        rows (:class:`~natgrad.distributed.sampling.GlobalBatchSampling`); ``likelihood``
        itself when not sharded."""
        if not self.sharded:
            return likelihood
        # natgrad.curvature, which the sampling module imports, imports this module
        from natgrad.distributed.sampling import GlobalBatchSampling

        return GlobalBatchSampling(likelihood, self)
