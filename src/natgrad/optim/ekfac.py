"""EKFAC gradient preconditioner (George et al., 2018) in the hook pattern.

Same usage and options as :class:`natgrad.optim.KFAC`. The Kronecker eigenbases of ``G_l`` and
``A_l`` are refreshed every ``inv_update_interval`` steps; on every factor-update step the
eigenvalue matrix ``S_l`` is re-estimated in the current basis as the mean over the batch of
the squared eigenbasis coordinates of the per-sample gradients
(:func:`natgrad.curvature.ekfac.projected_second_moment`) and folded into an exponential moving
average with ``factor_decay``. When a basis is refreshed the average restarts (old coordinates
belong to the old basis): by default from the K-FAC eigenvalues of the refreshed factors, which
are diagonal in the new basis and carry the factors' history (``S ← ω S_K-FAC + (1 − ω)
S_batch``), or with ``eigenvalue_restart="batch"`` from the current batch alone, as George et
al. do. Preconditioning is ``(S_l + λ)⁻¹`` in the eigenbasis (exact damping only). An
embedding's eigenvalues come from its tokens and output gradients (its input factor is
diagonal: :func:`natgrad.curvature.ekfac.embedding_second_moment`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad._validation import one_of
from natgrad.distributed.agreement import Agreement, agree_on_errors
from natgrad.distributed.reduce import is_distributed
from natgrad.optim.kfac import KFAC
from natgrad.optim.kfac_layers import LayerState

__all__ = ["EKFAC"]


class EKFAC(KFAC):
    """EKFAC preconditioner; parameters as :class:`natgrad.optim.KFAC`, and:

    Parameters
    ----------
    eigenvalue_restart : {"kfac", "batch"}, default "kfac"
        Where the eigenvalue average restarts when the eigenbases are refreshed: ``"kfac"``,
        ``factor_decay`` times the refreshed factors' K-FAC eigenvalues plus
        ``1 − factor_decay`` times the current batch's estimate; ``"batch"``, that estimate
        alone (George et al.). With factors and bases refreshed together the ``"batch"``
        estimate rests on one batch, and training can be erratic; ``"kfac"`` keeps the
        factors' average in it (on digits it removed EKFAC's slow and failed runs on the
        classifiers for at most 6 % more steps on the autoencoder, see ``docs/kfac.md``).

    Raises
    ------
    ValueError
        For ``damping_mode="factored"`` (EKFAC's eigenvalues are not a Kronecker product) or an
        unknown ``eigenvalue_restart``.
    """

    def __init__(
        self, model: torch.nn.Module, *, eigenvalue_restart: str = "kfac", **options: object
    ) -> None:
        if options.get("damping_mode", "eigen") != "eigen":
            raise ValueError("EKFAC supports only damping_mode='eigen'")
        self.eigenvalue_restart = one_of(
            "eigenvalue_restart", eigenvalue_restart, ("kfac", "batch")
        )
        super().__init__(model, **options)

    def _keeps_pairs(self) -> bool:
        return True

    def _update_eigenvalues(self, refreshed: list[LayerState]) -> None:
        """Fold this step's eigenvalue estimates of :meth:`_estimated_layers` into their
        averages; a layer without an estimate (no pairs, on every process) keeps its average,
        or drops it if its basis was refreshed. Under ``torch.distributed`` the sums and counts
        are all-reduced with a failure flag: every process raises if one failed."""
        estimated = self._estimated_layers()
        with agree_on_errors(self.process_group) as agreement:
            moments = self._local_moments(estimated, agreement)
            if moments:
                agreement.all_reduce_sum_([tensor for moment in moments for tensor in moment])
        decay = self.current_factor_decay()
        counted = torch.stack([count for _, count in moments]).tolist() if moments else []
        estimates = {
            id(state): (total, count)
            for state, (total, count), samples in zip(estimated, moments, counted, strict=True)
            if samples > 0  # one read-back of all counts
        }
        for state in self.layers:
            if id(state) not in estimates:
                if state in refreshed:
                    state.eigenvalues = None
                continue
            total, count = estimates[id(state)]
            self._fold_eigenvalues(state, total / count, state in refreshed, decay)

    def _estimated_layers(self) -> list[LayerState]:
        """The layers whose eigenvalues this step estimates: those with an eigenbasis and kept
        pairs; under ``torch.distributed``, on a recording step, every layer with an eigenbasis,
        so that every process passes the same list whichever layers its own batch called."""
        with_basis = [state for state in self.layers if state.output_eigen is not None]
        if not is_distributed(self.process_group):
            return [state for state in with_basis if state.pairs]
        recorded = self.steps % self.factor_update_interval == 0
        return with_basis if recorded else []

    def _local_moments(
        self, estimated: list[LayerState], agreement: Agreement
    ) -> list[tuple[Tensor, Tensor]]:
        """Each layer's sum of squared eigenbasis coordinates (the shape of its K-FAC
        eigenvalues, ``(d_out, d_in)``) and sample count ``()`` on this process's batch: zeros
        without pairs, or once this process's local work has failed (the failure is kept by
        ``agreement``). Every layer's pairs are consumed, whatever happens."""
        try:
            return [self._local_moment(state, agreement) for state in estimated]
        finally:
            for state in self.layers:
                state.pairs.clear()

    @staticmethod
    def _local_moment(state: LayerState, agreement: Agreement) -> tuple[Tensor, Tensor]:
        moment = None
        if not agreement.failed:
            with agreement.local():
                moment = state.projected_moment()
        if moment is None:
            total = torch.zeros_like(state.kfac_eigenvalues())
            moment = (total, total.new_zeros(()))
        return moment

    def _fold_eigenvalues(
        self, state: LayerState, fresh: Tensor, refreshed: bool, decay: float
    ) -> None:
        """Fold the estimate ``fresh`` ``(d_out, d_in)`` into ``state``'s average, restarting
        it (``eigenvalue_restart``) if the basis was refreshed or there is no average yet."""
        restart = refreshed or state.eigenvalues is None
        if restart and self.eigenvalue_restart == "batch":
            state.eigenvalues = fresh
            return
        previous = state.kfac_eigenvalues() if restart else state.eigenvalues
        state.eigenvalues = decay * previous + (1.0 - decay) * fresh
