"""Seeded on-policy rollouts in a gymnasium environment."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from natgrad._validation import integer, positive_int
from natgrad.rl.policies import CategoricalMLPPolicy, GaussianMLPPolicy, Policy


@dataclass(frozen=True)
class RolloutBatch:
    """``T`` consecutive environment steps (episodes may start and end inside the batch).

    Attributes
    ----------
    observations, next_observations : Tensor of shape (T, obs_dim)
        ``sₜ`` and the observation ``sₜ₊₁`` the step led to (the final one when the episode
        ended there).
    actions : Tensor of shape (T,) or (T, action_dim)
        Actions as sampled by the policy: before clipping to a ``Box`` action space, and
        for a ``Discrete(n, start)`` space the index ``0..n-1`` (the env got ``start + index``).
    rewards : Tensor of shape (T,)
    terminated : bool Tensor of shape (T,)
        The step reached a terminal state.
    episode_ends : bool Tensor of shape (T,)
        The episode ended after the step: terminated, truncated, or last step of the batch.
    episode_returns : tuple of float
        Undiscounted returns of the episodes that finished inside the batch.
    """

    observations: Tensor
    next_observations: Tensor
    actions: Tensor
    rewards: Tensor
    terminated: Tensor
    episode_ends: Tensor
    episode_returns: tuple[float, ...]

    def __len__(self) -> int:
        return self.rewards.shape[0]


def _check_observation_space(env: gym.Env) -> int:
    if isinstance(env, gym.vector.VectorEnv):
        raise ValueError(
            f"vector environments are not supported, got {type(env).__name__}; "
            "pass a single gymnasium.Env"
        )
    space = env.observation_space
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise ValueError(f"expected a 1-d Box observation space, got {space!r}")
    return space.shape[0]


def make_policy(
    env: gym.Env, hidden_sizes: Sequence[int] = (32, 32), generator: torch.Generator | None = None
) -> Policy:
    """A :class:`CategoricalMLPPolicy` for a ``Discrete`` action space, else a Gaussian one.

    Raises
    ------
    ValueError
        If ``env`` is a vector environment, the observation space is not a 1-d ``Box``, or
        the action space is neither ``Discrete`` nor a 1-d ``Box``.
    """
    obs_dim = _check_observation_space(env)
    space = env.action_space
    if isinstance(space, gym.spaces.Discrete):
        return CategoricalMLPPolicy(obs_dim, int(space.n), hidden_sizes, generator)
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
        return GaussianMLPPolicy(obs_dim, space.shape[0], hidden_sizes, generator=generator)
    raise ValueError(f"unsupported action space {space!r}")


def _check_policy_fits(policy: Policy, space: gym.Space) -> None:
    """Raise ``ValueError`` if a categorical policy's action count differs from ``Discrete(n)``.

    With fewer actions the policy would silently never try the others; other mismatches
    are caught per action by :func:`_check_action`.
    """
    if (
        isinstance(space, gym.spaces.Discrete)
        and isinstance(policy, CategoricalMLPPolicy)
        and policy.n_actions != int(space.n)
    ):
        raise ValueError(
            f"the policy has n_actions={policy.n_actions} but the action space is {space!r}"
        )


def _check_action(action: Tensor, space: gym.Space) -> None:
    """Raise ``ValueError`` unless ``action`` is an index of ``Discrete(n)`` or a float vector
    of the ``Box``'s shape.

    Environments do not always check: many cut a too-long ``Box`` action to its first entries
    and take an integer as a torque, while the batch would keep the action the policy sampled.
    """
    if isinstance(space, gym.spaces.Discrete):
        fits = (
            action.shape == ()
            and not action.is_floating_point()
            and 0 <= int(action) < int(space.n)
        )
        expected = f"an integer index in [0, {int(space.n)})"
    else:
        fits = tuple(action.shape) == space.shape and action.is_floating_point()
        expected = f"a float tensor of shape {space.shape}"
    if not fits:
        raise ValueError(f"the policy sampled {action!r}; the action space needs {expected}")


class RolloutCollector:
    """Runs a policy in ``env``; episodes continue across successive batches.

    Parameters
    ----------
    env : gymnasium.Env
        With a 1-d ``Box`` observation space.
    random_state : int
        Seeds the first ``env.reset(seed=...)`` and the action-sampling generator, so two
        collectors with the same seed, environment and policy produce the same batches.

    Raises
    ------
    ValueError
        If ``env`` is a ``gymnasium.vector.VectorEnv`` (one environment at a time) or its
        observation space is not a 1-d ``Box``.
    """

    def __init__(self, env: gym.Env, random_state: int) -> None:
        random_state = integer("random_state", random_state)
        _check_observation_space(env)
        self.env = env
        self.generator = torch.Generator().manual_seed(random_state)
        observation, _ = env.reset(seed=random_state)
        self._observation = observation
        self._episode_return = 0.0
        self.env_steps = 0

    def _env_action(self, action: Tensor) -> np.ndarray | int:
        space = self.env.action_space
        _check_action(action, space)
        if isinstance(space, gym.spaces.Discrete):
            return int(space.start) + int(action)
        return np.clip(action.numpy().astype(space.dtype), space.low, space.high)

    def collect(self, policy: Policy, num_steps: int) -> RolloutBatch:
        """Take ``num_steps`` steps with actions sampled from ``policy``.

        Raises
        ------
        TypeError
            If ``policy`` is not a :class:`Policy` or ``num_steps`` is not an integer.
        ValueError
            If ``num_steps`` is not positive, or the policy's actions do not fit the
            environment's action space (a categorical policy with another number of actions
            than ``Discrete(n)``, a Gaussian action of another length than the ``Box``).
        """
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a natgrad.rl.Policy, got {type(policy).__name__}")
        positive_int("num_steps", num_steps)
        _check_policy_fits(policy, self.env.action_space)
        dtype = next(policy.parameters()).dtype
        records: dict[str, list] = {k: [] for k in ("obs", "next", "act", "rew", "term", "end")}
        finished: list[float] = []
        for _ in range(num_steps):
            # torch.tensor copies: an environment may return one buffer that it mutates in place
            observation = torch.tensor(self._observation, dtype=dtype).unsqueeze(0)
            action = policy.sample(observation, self.generator)[0]
            next_observation, reward, terminated, truncated, _ = self.env.step(
                self._env_action(action)
            )
            self._episode_return += float(reward)
            records["obs"].append(observation[0])
            records["next"].append(torch.tensor(next_observation, dtype=dtype))
            records["act"].append(action)
            records["rew"].append(float(reward))
            records["term"].append(bool(terminated))
            records["end"].append(bool(terminated or truncated))
            if terminated or truncated:
                finished.append(self._episode_return)
                self._episode_return = 0.0
                next_observation, _ = self.env.reset()
            self._observation = next_observation
        self.env_steps += num_steps
        episode_ends = torch.tensor(records["end"])
        episode_ends[-1] = True
        return RolloutBatch(
            observations=torch.stack(records["obs"]),
            next_observations=torch.stack(records["next"]),
            actions=torch.stack(records["act"]),
            rewards=torch.tensor(records["rew"], dtype=dtype),
            terminated=torch.tensor(records["term"]),
            episode_ends=episode_ends,
            episode_returns=tuple(finished),
        )
