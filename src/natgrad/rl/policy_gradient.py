"""Shared actor-critic update (GAE advantages, value fit) and vanilla policy gradient."""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor

from natgrad._validation import positive_float, positive_int, unit_interval
from natgrad.rl.advantages import gae_advantages
from natgrad.rl.policies import Policy
from natgrad.rl.policy_fisher import trainable_parameters
from natgrad.rl.rollouts import RolloutBatch
from natgrad.rl.stream_state import check_stream_state
from natgrad.rl.value import ValueFunction, fit_value_function


def normalized(advantages: Tensor) -> Tensor:
    """Advantages shifted to mean 0 and scaled to standard deviation 1 (when ``T > 1``)."""
    if advantages.numel() < 2:
        return advantages
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


class PolicyGradient(abc.ABC):
    """One on-policy update per batch: GAE advantages, a policy step, a value-function fit.

    Parameters
    ----------
    policy : Policy
    value_function : ValueFunction
        Baseline ``V(s)``, fitted to the λ-returns by ``value_steps`` full-batch Adam steps.
    gamma, gae_lambda : float, default 0.99, 0.97
        Discount and GAE parameter.
    value_steps : int, default 50
    value_lr : float, default 1e-2

    Raises
    ------
    TypeError
        If ``policy`` or ``value_function`` is of the wrong type.
    ValueError
        If an option is out of range, every parameter of ``policy`` is frozen, or
        ``value_function`` differs from ``policy`` in ``obs_dim``, dtype or device.

    Attributes
    ----------
    rollout_state : dict or None
        The state of the rollout stream (:meth:`RolloutCollector.state_dict`) where
        :func:`~natgrad.rl.train` stopped, ``None`` before it ran: calling ``train`` again
        with the same ``random_state`` continues it.

    Notes
    -----
    Subclasses implement :meth:`policy_step` on the batch's states, actions and normalised
    advantages. The policy step uses the advantages of the value function *before* the fit.
    The updates run where the policy's parameters are (move the policy and the value function
    with ``.to(device)`` before building the agent): the batches of
    :class:`~natgrad.rl.RolloutCollector` are collected there.
    To resume training, save :meth:`state_dict` (the policy and value parameters, the
    optimizers' moments AND the rollout stream); the policy's and value function's own state
    dicts are not enough. The rollout stream's tensors may be loaded onto any device
    (``torch.load(..., map_location=device)``).
    """

    #: Attributes whose ``state_dict`` the agent's :meth:`state_dict` holds.
    stateful: tuple[str, ...] = ("policy", "value_function", "value_optimizer")

    def __init__(
        self,
        policy: Policy,
        value_function: ValueFunction,
        *,
        gamma: float = 0.99,
        gae_lambda: float = 0.97,
        value_steps: int = 50,
        value_lr: float = 1e-2,
    ) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a natgrad.rl.Policy, got {type(policy).__name__}")
        if not isinstance(value_function, ValueFunction):
            raise TypeError(
                f"value_function must be a ValueFunction, got {type(value_function).__name__}"
            )
        trainable_parameters(policy)
        check_value_function_fits(policy, value_function)
        self.policy = policy
        self.value_function = value_function
        self.gamma = unit_interval("gamma", gamma, closed_right=True)
        self.gae_lambda = unit_interval("gae_lambda", gae_lambda, closed_right=True)
        self.value_steps = positive_int("value_steps", value_steps)
        self.value_optimizer = torch.optim.Adam(
            value_function.parameters(), lr=positive_float("value_lr", value_lr)
        )
        self.rollout_state: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, dict | None]:
        """The state the next updates depend on: by attribute name (see :attr:`stateful`),
        and ``"rollouts"``, the :attr:`rollout_state` (``None`` before training)."""
        state: dict[str, dict | None] = {
            name: getattr(self, name).state_dict() for name in self.stateful
        }
        state["rollouts"] = None if self.rollout_state is None else dict(self.rollout_state)
        return state

    def load_state_dict(self, state_dict: dict[str, dict | None]) -> None:
        """Restore what :meth:`state_dict` returned (of an agent of the same class and sizes).

        Raises
        ------
        ValueError
            If ``state_dict`` lacks an entry of :attr:`stateful` or ``"rollouts"``, has
            another one, or its ``"rollouts"`` is neither ``None`` nor a valid stream state
            (the message names the key; checked before anything is loaded).
        """
        expected = {*self.stateful, "rollouts"}
        if set(state_dict) != expected:
            raise ValueError(
                f"state_dict must have the keys {sorted(expected)}, got {sorted(state_dict)}"
            )
        rollouts = state_dict["rollouts"]
        if rollouts is not None:
            check_stream_state(rollouts, "state_dict['rollouts']")
        for name in self.stateful:
            getattr(self, name).load_state_dict(state_dict[name])
        self.rollout_state = None if rollouts is None else dict(rollouts)

    def advantages(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        """GAE advantages ``Âₜ`` and λ-returns ``Âₜ + V(sₜ)``, both of shape ``(T,)``."""
        with torch.no_grad():
            values = self.value_function(batch.observations)
            next_values = self.value_function(batch.next_observations)
        advantages = gae_advantages(
            batch.rewards,
            values,
            next_values,
            batch.terminated,
            batch.episode_ends,
            self.gamma,
            self.gae_lambda,
        )
        return advantages, advantages + values

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """Improve the policy and the baseline on one batch; returns the step's statistics.

        Raises
        ------
        ValueError
            If the batch holds a non-finite reward or observation (it would poison the
            value function's parameters with NaN).
        """
        check_finite_batch(batch)
        advantages, returns = self.advantages(batch)
        stats = self.policy_step(batch.observations, batch.actions, normalized(advantages))
        stats["value_loss"] = fit_value_function(
            self.value_function, batch.observations, returns, self.value_optimizer, self.value_steps
        )
        return stats

    @abc.abstractmethod
    def policy_step(
        self, observations: Tensor, actions: Tensor, advantages: Tensor
    ) -> dict[str, float]:
        """Update the policy parameters in place from ``(T, ·)`` states, actions, advantages."""


def check_value_function_fits(policy: Policy, value_function: ValueFunction) -> None:
    """Raise ``ValueError`` unless ``value_function`` reads the policy's observations."""
    if value_function.obs_dim != policy.obs_dim:
        raise ValueError(
            f"value_function.obs_dim={value_function.obs_dim} differs from the policy's "
            f"obs_dim={policy.obs_dim}"
        )
    policy_parameter = next(policy.parameters())
    value_parameter = next(value_function.parameters())
    if value_parameter.dtype != policy_parameter.dtype:
        raise ValueError(
            f"value_function has dtype {value_parameter.dtype} but the policy has "
            f"{policy_parameter.dtype} (the batches are in the policy's dtype); convert one "
            "with .to(dtype)"
        )
    if value_parameter.device != policy_parameter.device:
        raise ValueError(
            f"value_function is on {value_parameter.device} but the policy is on "
            f"{policy_parameter.device} (the batches are on the policy's device); move one "
            "with .to(device)"
        )


def check_finite_batch(batch: RolloutBatch) -> None:
    """Raise ``ValueError`` naming the steps where a reward or an observation is not finite."""
    for name in ("rewards", "observations", "next_observations"):
        values = getattr(batch, name)
        bad = ~torch.isfinite(values.reshape(len(batch), -1)).all(dim=1)
        if bool(bad.any()):
            steps = torch.nonzero(bad).flatten().tolist()
            raise ValueError(f"batch.{name} is not finite at steps {steps}")


def check_advantages(observations: Tensor, advantages: Tensor) -> None:
    """Raise ``ValueError`` unless ``advantages`` has shape ``(T,)`` for ``(T, obs_dim)`` states.

    A ``(T, 1)`` column would broadcast against the ``(T,)`` log-probabilities into a wrong
    ``(T, T)`` objective.
    """
    expected = (observations.shape[0],)
    if tuple(advantages.shape) != expected:
        raise ValueError(f"advantages must have shape {expected}, got {tuple(advantages.shape)}")


def surrogate(
    policy: Policy, observations: Tensor, actions: Tensor, advantages: Tensor, old_log_probs: Tensor
) -> Tensor:
    """Importance-weighted surrogate ``1/T Σₜ π(aₜ|sₜ)/π_old(aₜ|sₜ) Âₜ`` (scalar)."""
    ratio = torch.exp(policy.log_prob(observations, actions) - old_log_probs)
    return (ratio * advantages).mean()


class VanillaPolicyGradient(PolicyGradient):
    """REINFORCE with a baseline: one Adam step on the surrogate per batch.

    Parameters
    ----------
    policy, value_function
        See :class:`PolicyGradient`.
    lr : float, default 1e-2
        Adam learning rate of the policy.
    **kwargs
        Passed to :class:`PolicyGradient`.
    """

    stateful = (*PolicyGradient.stateful, "policy_optimizer")

    def __init__(
        self, policy: Policy, value_function: ValueFunction, *, lr: float = 1e-2, **kwargs
    ) -> None:
        super().__init__(policy, value_function, **kwargs)
        self.policy_optimizer = torch.optim.Adam(policy.parameters(), lr=positive_float("lr", lr))

    def policy_step(
        self, observations: Tensor, actions: Tensor, advantages: Tensor
    ) -> dict[str, float]:
        check_advantages(observations, advantages)
        with torch.no_grad():
            old_outputs = self.policy(observations)
        self.policy_optimizer.zero_grad()
        loss = -(self.policy.log_prob(observations, actions) * advantages).mean()
        loss.backward()
        self.policy_optimizer.step()
        with torch.no_grad():
            kl = self.policy.kl_divergence(old_outputs, self.policy(observations)).mean()
        return {"kl": float(kl)}
