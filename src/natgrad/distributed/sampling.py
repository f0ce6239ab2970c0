"""Monte-Carlo targets of a global batch split over processes, each keeping its own rows."""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad.curvature.likelihoods import Likelihood
from natgrad.distributed.shards import Shard

__all__ = ["GlobalBatchSampling"]


class GlobalBatchSampling(Likelihood):
    """A likelihood whose :meth:`sample` draws the targets of the whole global batch, from the
    outputs gathered from every process (:meth:`Shard.gather`), and keeps this process's rows.

    With generators in the same state on every process (the same seed), the processes' draws
    are those of one process on the global batch, and their generators stay in step; with
    different states each row is still a draw from ``p(y | f)``. Everything else is the
    wrapped likelihood's.

    The Monte-Carlo Fisher draws ``mc_samples`` times from the same outputs (one tensor):
    they are gathered at the first draw only (one all-reduce for all the draws, made alike on
    every process since each passes its own outputs tensor the same number of times), and
    the draws are those of as many gathers, in the same order. Outputs are not to be changed
    in place between draws.

    Parameters
    ----------
    likelihood : Likelihood
    shard : Shard
    """

    def __init__(self, likelihood: Likelihood, shard: Shard) -> None:
        self.likelihood = likelihood
        self.shard = shard
        self.name = likelihood.name
        self._gathered: tuple[Tensor, Tensor] | None = None

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """This process's rows of targets drawn for the global batch's outputs."""
        return self.likelihood.sample(self.gathered(outputs), generator)[self.shard.rows]

    def gathered(self, outputs: Tensor) -> Tensor:
        """The global batch's outputs (:meth:`Shard.gather`), gathered once per ``outputs``
        tensor: again for the same tensor, the rows gathered before (no collective)."""
        if self._gathered is None or self._gathered[0] is not outputs:
            self._gathered = (outputs, self.shard.gather(outputs))
        return self._gathered[1]

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.likelihood.nll(outputs, targets)

    def nll_gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.likelihood.nll_gradient(outputs, targets)

    def natural_hessian_sqrt(self, outputs: Tensor) -> Tensor:
        return self.likelihood.natural_hessian_sqrt(outputs)

    def natural_hessian(self, outputs: Tensor) -> Tensor:
        return self.likelihood.natural_hessian(outputs)

    def natural_hessian_product(self, outputs: Tensor, tangents: Tensor) -> Tensor:
        return self.likelihood.natural_hessian_product(outputs, tangents)

    def check_observed(self, outputs: Tensor, targets: Tensor) -> None:
        self.likelihood.check_observed(outputs, targets)

    def check_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.likelihood.check_targets(outputs, targets)
