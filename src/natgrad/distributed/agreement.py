"""Errors raised on one process, raised on every process at the next collective.

Under data parallelism an exception raised by process-local work (a shard's targets outside
the likelihood's support, non-finite outputs, an eigendecomposition that only the owner of a
factor runs) would leave the other processes waiting in the next collective until the process
group's timeout. An :class:`Agreement` keeps such an exception instead, lets the process go on
to the collective that the others are waiting in, and folds a failure flag into that
collective's buffer (one element more, no extra collective). If any process failed, every
process learns who failed and why (one ``all_gather_object``, on this path only) and raises:
the failing process its own exception, the others a ``RuntimeError`` naming the failing rank
and its message, e.g. ``"process 1 failed: ValueError: targets ..."``.

In a single process (``torch.distributed`` not initialised, or a world of size 1) nothing is
kept: exceptions propagate where they are raised and the collectives are the plain ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch.distributed as dist
from torch import Tensor

from natgrad.distributed.reduce import all_reduce_sum_, broadcast_from_, is_distributed

__all__ = ["Agreement", "ProcessFailure", "agree_on_errors"]


class ProcessFailure(RuntimeError):
    """Raised on the processes that did not fail, when another process of the group failed.

    Attributes
    ----------
    failed_rank : int
        The lowest rank (in the group) that failed.
    message : str
        That process's exception, as ``"TypeName: message"``.
    """

    def __init__(self, failed_rank: int, message: str, others: Sequence[int] = ()) -> None:
        also = f" (processes {list(others)} failed too)" if others else ""
        super().__init__(f"process {failed_rank} failed: {message}{also}")
        self.failed_rank = failed_rank
        self.message = message


class Agreement:
    """Keeps an exception of this process's local work until the next collective, where every
    process of ``group`` learns of it.

    Parameters
    ----------
    group : ProcessGroup, optional
        Default: the world.

    Notes
    -----
    The contract: between :meth:`local` and the next collective of the agreement
    (:meth:`all_reduce_sum_` or :meth:`broadcast_from_`), the process runs no other
    collective, and the tensors it passes have the shapes that the other processes pass even
    when its local work failed (zeros allocated beforehand, say). A failure still kept when no
    such collective follows is raised by :meth:`settle` on this process alone.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.distributed = is_distributed(group)
        self.failure: Exception | None = None
        self.agreed = False

    @classmethod
    def alone(cls) -> Agreement:
        """An agreement with no other process, for work that no collective follows: its
        :meth:`local` lets exceptions propagate."""
        agreement = cls.__new__(cls)
        agreement.group, agreement.distributed, agreement.failure = None, False, None
        agreement.agreed = False
        return agreement

    @property
    def failed(self) -> bool:
        """Whether this process's local work raised (and the exception is kept)."""
        return self.failure is not None

    def local(self) -> contextlib.AbstractContextManager:
        """Context for process-local work: under ``torch.distributed`` an ``Exception``
        raised inside is kept (the first one) and the block is left; otherwise it propagates.
        The agreed exceptions of a collective of this agreement run inside the block (the
        processes' failures exchanged) propagate too.
        """
        if not self.distributed:
            return contextlib.nullcontext()
        return self._keeping()

    @contextlib.contextmanager
    def _keeping(self) -> Iterator[None]:
        try:
            yield
        except Exception as error:  # kept, agreed at the next collective, then re-raised
            if self.agreed:
                raise
            if self.failure is None:
                self.failure = error

    def all_reduce_sum_(self, tensors: Sequence[Tensor]) -> None:
        """:func:`~natgrad.distributed.all_reduce_sum_` of ``tensors`` with this process's
        failure flag folded into the first tensor's buffer; raises on every process if one
        failed (before ``tensors`` are used: their values are then meaningless)."""
        if not self.distributed:
            all_reduce_sum_(tensors, self.group)
            return
        flag = self._flag(tensors[0])
        all_reduce_sum_([*tensors, flag], self.group)
        if bool(flag):
            self._raise_agreed()

    def broadcast_from_(self, tensors: Sequence[Tensor], owner: int) -> None:
        """:func:`~natgrad.distributed.broadcast_from_` with the owner's failure flag folded
        into the buffer; raises on every process if the owner failed."""
        if not self.distributed:
            broadcast_from_(tensors, owner, self.group)
            return
        flag = self._flag(tensors[0])
        broadcast_from_([*tensors, flag], owner, self.group)
        if bool(flag):
            self._raise_agreed()

    def settle(self) -> None:
        """Raise the kept exception, if any, on this process (no collective)."""
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    def _flag(self, like: Tensor) -> Tensor:
        return like.new_full((1,), 1 if self.failed else 0)

    def _raise_agreed(self) -> None:
        """Exchange the failures (one all-gather) and raise this process's own, or a
        :class:`ProcessFailure` naming the lowest failed rank."""
        self.agreed = True
        own = None if self.failure is None else f"{type(self.failure).__name__}: {self.failure}"
        messages: list[str | None] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(messages, own, group=self.group)
        self.settle()
        failed = [index for index, message in enumerate(messages) if message is not None]
        first = failed[0]
        raise ProcessFailure(first, str(messages[first]), failed[1:])


@contextlib.contextmanager
def agree_on_errors(group: dist.ProcessGroup | None = None) -> Iterator[Agreement]:
    """An :class:`Agreement` over ``group`` whose kept failure, if no collective conveyed
    it, is raised on leaving the block (on this process alone)."""
    agreement = Agreement(group)
    yield agreement
    agreement.settle()
