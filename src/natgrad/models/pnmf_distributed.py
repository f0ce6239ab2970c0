"""Data-parallel natural-gradient PNMF over samples with ``torch.distributed``.

Every process holds a shard of the samples (rows of the count matrix) and their local
``q(F)``; the loadings ``W`` are replicated. The natural-gradient loop
(:func:`natgrad.models.pnmf_training.fit_natural`) is unchanged except that W's sufficient
statistics ``(Σ_i y_ij E[r_ijl], Σ_i E[e^{F_il}])`` and the ELBO are summed over the processes
(one all-reduce each per iteration), so every process computes the same ``W`` and takes the same
stopping decision — and, in full-batch ``"lower-bound"`` training, the same decision to keep or
restart from an extrapolated point (:mod:`natgrad.models.pnmf_extrapolation`), which each
process applies to its own rows of ``μ`` and to the shared ``W``. Initialisation draws the
global ``q(F)`` from the shared seed and keeps the own rows, so in the deterministic
``"lower-bound"`` mode the result equals one process fitting all rows, up to floating-point
summation order. In the Monte-Carlo modes each process draws its own samples, so results agree
in distribution only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from sklearn.utils import check_array, check_random_state
from sklearn.utils.validation import check_non_negative
from torch import Tensor

from natgrad.distributed.reduce import (
    all_reduce_sum_,
    collective_device,
    is_distributed,
    rank,
    world_size,
)
from natgrad.models.pnmf import (
    DEFAULT_NATURAL_STEP,
    column_sums,
    initial_loadings,
    initial_posterior,
)
from natgrad.models.pnmf_counts import count_matrix
from natgrad.models.pnmf_elbo import ELBO_MODES
from natgrad.models.pnmf_training import (
    LOADINGS_UPDATES,
    FitSettings,
    FitState,
    fit_natural,
    warn_if_refused,
)


@dataclass(frozen=True)
class DataParallelFit:
    """Result of :func:`fit_pnmf_data_parallel` on one process.

    Attributes
    ----------
    components : ndarray of shape (n_components, n_features)
        ``Wᵀ`` (identical on every process).
    variational_mean, variational_variance : ndarray of shape (n_local_samples, n_components)
        ``q(F)`` of this process's rows.
    elbo_history : ndarray of shape (n_iter,)
        Global ELBO (summed over all processes' entries) per iteration.
    n_iter : int
    converged : bool
    row_offset : int
        Index of this process's first row in the global sample order (ranks in order).
    n_refused : int
        Entries of this process's ``q(F)`` whose natural step was refused as non-finite (a
        :class:`~natgrad.models.RefusedStepWarning` on this process says so).
    """

    components: np.ndarray
    variational_mean: np.ndarray
    variational_variance: np.ndarray
    elbo_history: np.ndarray
    n_iter: int
    converged: bool
    row_offset: int
    n_refused: int = 0


def _summing(group: dist.ProcessGroup | None):
    def all_reduce(tensor: Tensor) -> Tensor:
        total = tensor.clone()
        all_reduce_sum_([total], group)
        return total

    return all_reduce


def _shard_sizes(n_local: int, group: dist.ProcessGroup | None) -> list[int]:
    sizes = torch.zeros(world_size(group), dtype=torch.float64)
    sizes[rank(group)] = n_local
    all_reduce_sum_([sizes], group)
    return [int(size) for size in sizes]


def fit_pnmf_data_parallel(
    X_local,
    n_components: int,
    *,
    mode: str = "lower-bound",
    E: int = 10,
    max_iter: int = 1000,
    tol: float = 1e-4,
    learning_rate: float | None = None,
    loadings_update: str = "multiplicative",
    random_state: int = 0,
    group: dist.ProcessGroup | None = None,
) -> DataParallelFit:
    """Fit natural-gradient PNMF with the samples sharded over the processes of ``group``.

    Call it on every process with that process's rows (ranks in order make up the global
    sample order); works in a single process too (no ``torch.distributed`` needed).

    Parameters
    ----------
    X_local : array-like or scipy.sparse matrix of shape (n_local_samples, n_features)
        Non-negative counts of this process's samples.
    n_components : int
    mode : {"simple", "expanded", "lower-bound"}
    E, max_iter, tol, learning_rate, loadings_update
        As in :class:`natgrad.models.PNMF` with ``training_mode="natural"``; with
        ``loadings_update="adam"`` W's gradient is summed over the processes.
    random_state : int
        Shared seed; must be equal on all processes.
    group : ProcessGroup, optional
    """
    if mode not in ELBO_MODES:
        raise ValueError(f"mode must be one of {ELBO_MODES}, got {mode!r}")
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components!r}")
    if loadings_update not in LOADINGS_UPDATES:
        raise ValueError(
            f"loadings_update must be one of {LOADINGS_UPDATES}, got {loadings_update!r}"
        )
    X_local = check_array(
        X_local, accept_sparse=("csr", "csc", "coo"), dtype=(np.float64, np.float32)
    )
    check_non_negative(X_local, "fit_pnmf_data_parallel (counts)")
    if is_distributed(group) and collective_device(group).type != "cpu":
        raise ValueError(
            "fit_pnmf_data_parallel fits on the CPU: give it a process group with a CPU "
            f"backend (gloo), got backend {dist.get_backend(group)!r}"
        )
    dtype = torch.float32 if X_local.dtype == np.float32 else torch.float64
    counts = count_matrix(X_local, dtype, torch.device("cpu"))
    all_reduce = _summing(group)
    sizes = _shard_sizes(counts.n_samples, group)
    offset = sum(sizes[: rank(group)])
    n_total = sum(sizes)
    seed = int(check_random_state(random_state).randint(0, 2**31 - 2 - world_size(group)))
    generator = torch.Generator()
    generator.manual_seed(seed)
    column_means = all_reduce(column_sums(counts)) / n_total
    loadings = initial_loadings(column_means, n_components, generator)
    posterior = initial_posterior(n_total, n_components, generator, dtype, counts.device)
    theta1, theta2 = (t[offset : offset + counts.n_samples] for t in posterior.natural_params)
    posterior = type(posterior).from_natural(theta1, theta2, validate=False)
    generator.manual_seed(seed + 1 + rank(group))  # independent Monte-Carlo draws per process
    step_size = DEFAULT_NATURAL_STEP[mode] if learning_rate is None else float(learning_rate)
    settings = FitSettings(
        mode=mode,
        n_draws=E,
        step_size=step_size,
        max_iter=max_iter,
        tol=tol,
        batch_size=None,
        update_loadings=True,
        generator=generator,
        all_reduce=all_reduce,
        loadings_update=loadings_update,
    )
    state = fit_natural(counts, FitState(loadings=loadings, posterior=posterior), settings)
    warn_if_refused(state, f"fit_pnmf_data_parallel (rank {rank(group)})")
    return DataParallelFit(
        components=state.loadings.T.numpy(),
        variational_mean=state.posterior.loc.numpy(),
        variational_variance=state.posterior.variance.numpy(),
        elbo_history=np.asarray(state.history),
        n_iter=state.n_iter,
        converged=state.converged,
        row_offset=offset,
        n_refused=state.n_refused,
    )
