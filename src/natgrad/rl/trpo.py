"""Trust-region policy optimisation (Schulman et al. 2015): NPG direction plus line search."""

from __future__ import annotations

from natgrad._validation import positive_int, unit_interval
from natgrad.rl.npg import NPG
from natgrad.rl.policies import Policy
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
        Passed to :class:`~natgrad.rl.NPG` (``max_kl``, ``cg_iters``, ``cg_damping``, ...);
        not ``kl_tolerance``: TRPO's bound ``δ`` is exact.

    Raises
    ------
    TypeError
        If ``kl_tolerance`` is given.
    ValueError
        If an option is out of range.
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
        if "kl_tolerance" in kwargs:
            raise TypeError("TRPO takes no kl_tolerance: its KL bound max_kl is exact")
        super().__init__(policy, value_function, kl_tolerance=1.0, **kwargs)
        self.backtrack_ratio = unit_interval("backtrack_ratio", backtrack_ratio, closed_left=False)
        self.max_backtracks = positive_int("max_backtracks", max_backtracks)

    def accepts(self, kl: float, gain: float, baseline: float) -> bool:
        """``kl ≤ δ`` and ``gain > baseline``: within the trust region, and an improvement."""
        return kl <= self.max_kl and gain > baseline
