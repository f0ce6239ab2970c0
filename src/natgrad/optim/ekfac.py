"""EKFAC gradient preconditioner (George et al., 2018) in the hook pattern.

Same usage and options as :class:`natgrad.optim.KFAC`. The Kronecker eigenbases of ``G_l`` and
``A_l`` are refreshed every ``inv_update_interval`` steps; on every factor-update step the
eigenvalue matrix ``S_l`` is re-estimated in the current basis as the mean over the batch of
the squared eigenbasis coordinates of the per-sample gradients
(:func:`natgrad.curvature.ekfac.projected_second_moment`) and folded into an exponential moving
average with ``factor_decay``. When a basis is refreshed the average restarts from the current
batch (old coordinates belong to the old basis). Preconditioning is ``(S_l + λ)⁻¹`` in the
eigenbasis (exact damping only). Embedding layers keep K-FAC's eigenvalues.
"""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad.distributed.reduce import all_reduce_sum_
from natgrad.optim.kfac import KFAC
from natgrad.optim.kfac_layers import LayerState

__all__ = ["EKFAC"]


class EKFAC(KFAC):
    """EKFAC preconditioner; parameters as :class:`natgrad.optim.KFAC`.

    Raises
    ------
    ValueError
        For ``damping_mode="factored"`` (EKFAC's eigenvalues are not a Kronecker product).
    """

    def __init__(self, model: torch.nn.Module, **options: object) -> None:
        if options.get("damping_mode", "eigen") != "eigen":
            raise ValueError("EKFAC supports only damping_mode='eigen'")
        super().__init__(model, **options)

    def _keeps_pairs(self) -> bool:
        return True

    def _update_eigenvalues(self, refreshed: list[LayerState]) -> None:
        estimates: list[tuple[LayerState, Tensor, Tensor]] = []
        for state in self.layers:
            if state.output_eigen is None or not state.pairs:
                state.pairs.clear()
                if state in refreshed:
                    state.eigenvalues = None
                continue
            moment = state.projected_moment()
            if moment is not None:
                estimates.append((state, *moment))
        all_reduce_sum_(
            [tensor for _, total, count in estimates for tensor in (total, count)],
            self.process_group,
        )
        for state, total, count in estimates:
            fresh = total / count
            if state in refreshed or state.eigenvalues is None:
                state.eigenvalues = fresh
            else:
                state.eigenvalues = (
                    self.factor_decay * state.eigenvalues + (1.0 - self.factor_decay) * fresh
                )
