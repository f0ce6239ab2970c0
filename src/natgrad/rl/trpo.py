"""Trust-region policy optimisation (Schulman et al. 2015): NPG direction plus line search."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from natgrad._validation import positive_int, unit_interval
from natgrad.rl.npg import NPG, refused
from natgrad.rl.policies import Policy
from natgrad.rl.policy_fisher import set_flat_parameters
from natgrad.rl.policy_gradient import surrogate
from natgrad.rl.value import ValueFunction


class TRPO(NPG):
    """TRPO: the NPG step ``αd`` shrunk by backtracking until the exact KL constraint holds.

    The step ``start + βᵏ αd`` (``k = 0, 1, ..., max_backtracks − 1``) is accepted at the
    first ``k`` where the exact mean KL ``1/T Σₜ KL(π_old(·|sₜ) ‖ π(·|sₜ)) ≤ δ`` and the
    surrogate ``1/T Σₜ π(aₜ|sₜ)/π_old(aₜ|sₜ) Âₜ`` exceeds its value at ``π_old``; if none is,
    the parameters are restored (a refused step).

    Parameters
    ----------
    policy, value_function
        See :class:`~natgrad.rl.NPG`.
    backtrack_ratio : float in (0, 1), default 0.5
        ``β``.
    max_backtracks : int, default 10
    **kwargs
        Passed to :class:`~natgrad.rl.NPG` (``max_kl``, ``cg_iters``, ``cg_damping``, ...).
    """

    def __init__(
        self,
        policy: Policy,
        value_function: ValueFunction,
        *,
        backtrack_ratio: float = 0.5,
        max_backtracks: int = 10,
        **kwargs,
    ) -> None:
        super().__init__(policy, value_function, **kwargs)
        self.backtrack_ratio = unit_interval("backtrack_ratio", backtrack_ratio, closed_left=False)
        self.max_backtracks = positive_int("max_backtracks", max_backtracks)

    def apply_step(
        self,
        start: Tensor,
        step: Tensor,
        observations: Tensor,
        actions: Tensor,
        advantages: Tensor,
        old_outputs: tuple[Tensor, ...],
        old_log_probs: Tensor,
    ) -> dict[str, float]:
        baseline = float(advantages.mean())
        for attempt in range(self.max_backtracks):
            fraction = self.backtrack_ratio**attempt
            set_flat_parameters(self.policy, start + fraction * step)
            with torch.no_grad():
                outputs = self.policy(observations)
                kl = float(self.policy.kl_divergence(old_outputs, outputs).mean())
                gain = float(
                    surrogate(self.policy, observations, actions, advantages, old_log_probs)
                )
            if math.isfinite(kl) and math.isfinite(gain) and kl <= self.max_kl and gain > baseline:
                return {"kl": kl, "accepted": 1.0, "step_fraction": fraction, "surrogate": gain}
        set_flat_parameters(self.policy, start)
        return refused(advantages)
