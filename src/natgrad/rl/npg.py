"""Natural policy gradient (Kakade 2001) with a KL trust-region step size."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from natgrad._validation import nonnegative_float, positive_float, positive_int, real_number
from natgrad.curvature import Implicit
from natgrad.linalg import cg
from natgrad.rl.policies import Policy
from natgrad.rl.policy_fisher import (
    flat_parameters,
    policy_kl_fisher,
    set_flat_parameters,
    trainable_parameters,
)
from natgrad.rl.policy_gradient import PolicyGradient, check_advantages, surrogate
from natgrad.rl.value import ValueFunction


class NPG(PolicyGradient):
    """Natural policy gradient: ``θ ← θ + α d`` with ``d = (F + λI)⁻¹ g``.

    ``g`` is the gradient of the surrogate ``1/T Σₜ π(aₜ|sₜ)/π_old(aₜ|sₜ) Âₜ`` (at ``π_old``:
    ``1/T Σₜ ∇ log π(aₜ|sₜ) Âₜ``), ``F`` the policy Fisher, the MEAN over the batch's states
    (:func:`~natgrad.rl.policy_kl_fisher`), ``d`` is found by ``cg_iters`` conjugate-gradient
    iterations on ``F + λI``, and ``α = sqrt(2δ / dᵀF d)`` puts the step on the boundary of the
    quadratic trust region ``½ (αd)ᵀ F (αd) = δ`` (for exact CG, ``dᵀFd ≈ gᵀF⁻¹g``).

    The quadratic model can underestimate the exact KL by orders of magnitude: with
    ``cg_damping=0`` and fewer states than parameters, ``F`` is singular and CG puts large
    components of ``d`` along directions of almost no curvature, where the KL is far from
    quadratic (on CartPole, a first step of exact KL 24 for ``δ = 0.01``). So the exact mean
    KL ``1/T Σₜ KL(π_old(·|sₜ) ‖ π(·|sₜ))`` is measured after the step, and a step of KL above
    ``kl_tolerance · δ`` is halved until it is not (``step_fraction`` reports by how much).

    Parameters
    ----------
    policy : Policy
    value_function : ValueFunction
    max_kl : float, default 0.01
        Trust-region radius ``δ``.
    cg_iters : int, default 10
    cg_damping : float, default 0.01
        ``λ`` added to the Fisher in the solve.
    kl_tolerance : float >= 1, default 2.0
        The exact KL of an accepted step is at most ``kl_tolerance · max_kl``.
    **kwargs
        Passed to :class:`~natgrad.rl.PolicyGradient` (``gamma``, ``gae_lambda``, ...).

    Raises
    ------
    ValueError
        If an option is out of range (see also :class:`~natgrad.rl.PolicyGradient`).

    Notes
    -----
    A step is refused (parameters unchanged, ``accepted = 0``) when the gradient or the
    curvature ``dᵀFd`` is not finite and positive, or when ``max_backtracks`` tries
    ``step_fraction = 1, ½, ¼, ...`` all give a non-finite KL or surrogate, or a KL above the
    tolerance.
    """

    #: Ratio by which a rejected step is shrunk.
    backtrack_ratio: float = 0.5
    #: Number of step sizes tried, the full step included.
    max_backtracks: int = 10

    def __init__(
        self,
        policy: Policy,
        value_function: ValueFunction,
        *,
        max_kl: float = 0.01,
        cg_iters: int = 10,
        cg_damping: float = 0.01,
        kl_tolerance: float = 2.0,
        **kwargs,
    ) -> None:
        super().__init__(policy, value_function, **kwargs)
        self.max_kl = positive_float("max_kl", max_kl)
        self.cg_iters = positive_int("cg_iters", cg_iters)
        self.cg_damping = nonnegative_float("cg_damping", cg_damping)
        self.kl_tolerance = real_number("kl_tolerance", kl_tolerance)
        if not (math.isfinite(self.kl_tolerance) and self.kl_tolerance >= 1.0):
            raise ValueError(f"kl_tolerance must be a finite number >= 1, got {kl_tolerance!r}")

    def policy_gradient(self, observations: Tensor, actions: Tensor, advantages: Tensor) -> Tensor:
        """``g = 1/T Σₜ ∇ log π(aₜ|sₜ) Âₜ`` as a flat vector of shape ``(P,)``.

        Raises
        ------
        ValueError
            If ``advantages`` is not of shape ``(T,)`` or ``actions`` not of the shape that
            :meth:`Policy.sample` gives.
        """
        check_advantages(observations, advantages)
        objective = (self.policy.log_prob(observations, actions) * advantages).mean()
        gradients = torch.autograd.grad(objective, list(trainable_parameters(self.policy).values()))
        return torch.cat([g.reshape(-1) for g in gradients])

    def natural_step(
        self, observations: Tensor, actions: Tensor, advantages: Tensor
    ) -> tuple[Tensor, Tensor, Implicit] | None:
        """The trust-region step ``αd``, the gradient ``g`` and the Fisher at the current policy.

        Returns ``None`` when no step can be taken (non-finite or zero gradient, or
        non-positive curvature along ``d``).
        """
        gradient = self.policy_gradient(observations, actions, advantages)
        if not bool(torch.isfinite(gradient).all()) or not bool(gradient.abs().max() > 0):
            return None
        fisher = policy_kl_fisher(self.policy, observations)

        def damped_fisher(vector: Tensor) -> Tensor:
            return fisher.mv(vector) + self.cg_damping * vector

        direction, _ = cg(damped_fisher, gradient, rtol=1e-10, max_iter=self.cg_iters)
        if not bool(torch.isfinite(direction).all()):
            return None
        curvature = float(torch.dot(direction, fisher.mv(direction)))
        if not (math.isfinite(curvature) and curvature > 0):
            return None
        return math.sqrt(2.0 * self.max_kl / curvature) * direction, gradient, fisher

    def policy_step(
        self, observations: Tensor, actions: Tensor, advantages: Tensor
    ) -> dict[str, float]:
        with torch.no_grad():
            old_outputs = self.policy(observations)
            old_log_probs = self.policy.distribution_from(old_outputs).log_prob(actions)
        proposal = self.natural_step(observations, actions, advantages)
        if proposal is None:
            return refused(advantages)
        step = proposal[0]
        start = flat_parameters(self.policy)
        return self.apply_step(
            start, step, observations, actions, advantages, old_outputs, old_log_probs
        )

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
        """Move the parameters to ``start + f·step`` for the first acceptable ``f = βᵏ``.

        ``β`` is :attr:`backtrack_ratio`, ``k = 0, ..., max_backtracks − 1``; what is acceptable
        is decided by :meth:`accepts` on the exact mean KL and the surrogate. If no ``f`` is,
        the parameters are restored (a refused step).
        """
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
            if math.isfinite(kl) and math.isfinite(gain) and self.accepts(kl, gain, baseline):
                return {"kl": kl, "accepted": 1.0, "step_fraction": fraction, "surrogate": gain}
        set_flat_parameters(self.policy, start)
        return refused(advantages)

    def accepts(self, kl: float, gain: float, baseline: float) -> bool:
        """Whether a step of exact mean KL ``kl`` (finite) is taken: ``kl ≤ kl_tolerance · δ``.

        ``gain`` and ``baseline`` (the surrogate after the step and at ``π_old``) are unused
        here; :class:`~natgrad.rl.TRPO` also asks for ``gain > baseline``.
        """
        return kl <= self.kl_tolerance * self.max_kl


def refused(advantages: Tensor) -> dict[str, float]:
    """Statistics of a refused step: the policy is unchanged, the surrogate at ``π_old``."""
    return {"kl": 0.0, "accepted": 0.0, "step_fraction": 0.0, "surrogate": float(advantages.mean())}
