"""Seeded on-policy rollouts in a gymnasium environment."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from natgrad._validation import nonnegative_int, positive_int
from natgrad.rl.policies import CategoricalMLPPolicy, GaussianMLPPolicy, Policy
from natgrad.rl.stream_state import check_stream_state, env_id


@dataclass(frozen=True)
class RolloutBatch:
    """``T`` consecutive environment steps (episodes may start and end inside the batch).

    The tensors are on the device of the policy that collected them, the observations and
    rewards in its dtype.

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


def _batch(
    records: Mapping[str, list],
    episode_returns: tuple[float, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> RolloutBatch:
    """The batch of the steps in ``records`` (CPU tensors and Python scalars) on ``device``."""
    episode_ends = torch.tensor(records["end"])
    episode_ends[-1] = True
    return RolloutBatch(
        observations=torch.stack(records["obs"]).to(device),
        next_observations=torch.stack(records["next"]).to(device),
        actions=torch.stack(records["act"]).to(device),
        rewards=torch.tensor(records["rew"], dtype=dtype).to(device),
        terminated=torch.tensor(records["term"]).to(device),
        episode_ends=episode_ends.to(device),
        episode_returns=episode_returns,
    )


def episode_seed(random_state: int, episode: int) -> int:
    """The ``env.reset`` seed of episode ``episode`` (0-based) of a collector's stream.

    ``random_state`` itself for the first episode, then the first 64-bit word of
    ``numpy.random.SeedSequence((random_state, episode))``.
    """
    if episode == 0:
        return random_state
    return int(np.random.SeedSequence((random_state, episode)).generate_state(1, np.uint64)[0])


class RolloutCollector:
    """Runs a policy in ``env``; episodes continue across successive batches.

    Parameters
    ----------
    env : gymnasium.Env
        With a 1-d ``Box`` observation space.
    random_state : int
        Non-negative seed of the action-sampling generator and of the environment: episode
        ``k`` starts with ``env.reset(seed=episode_seed(random_state, k))``, so the episodes'
        initial states do not depend on the policy. Two collectors with the same seed,
        environment and policy produce the same batches.

    Attributes
    ----------
    generator : torch.Generator
        The CPU generator of the actions, seeded with ``random_state``: a policy on a GPU
        draws the same actions as on the CPU (see :meth:`Policy.sample`).
    env_steps : int
        Environment steps taken so far.
    batches : int
        Batches collected so far.

    Raises
    ------
    ValueError
        If ``env`` is a ``gymnasium.vector.VectorEnv`` (one environment at a time), its
        observation space is not a 1-d ``Box``, or ``random_state`` is negative.

    Notes
    -----
    :meth:`state_dict` and :meth:`from_state_dict` save and resume the stream: the resumed
    collector continues the run bit for bit, by resetting its environment with the current
    episode's seed and replaying the episode's actions (which is exact for an environment
    whose state follows from its reset seed and the actions, as gymnasium's do).
    """

    def __init__(self, env: gym.Env, random_state: int) -> None:
        self.random_state = nonnegative_int("random_state", random_state)
        _check_observation_space(env)
        self.env = env
        self.generator = torch.Generator().manual_seed(self.random_state)
        self.env_steps = 0
        self.batches = 0
        self._start_episode(0)

    def _start_episode(self, episode: int) -> None:
        observation, _ = self.env.reset(seed=episode_seed(self.random_state, episode))
        # a copy: an environment may return one buffer that it mutates in place
        self._observation = np.array(observation)
        self._episode = episode
        self._episode_actions: list[np.ndarray | int] = []
        self._episode_return = 0.0

    def _env_action(self, action: Tensor) -> np.ndarray | int:
        space = self.env.action_space
        _check_action(action, space)
        if isinstance(space, gym.spaces.Discrete):
            return int(space.start) + int(action)
        return np.clip(action.numpy().astype(space.dtype), space.low, space.high)

    def collect(self, policy: Policy, num_steps: int) -> RolloutBatch:
        """Take ``num_steps`` steps with actions sampled from ``policy``.

        The environment steps on the CPU; each observation goes to the device of the
        policy's parameters for the sampling, each action back to the CPU for ``env.step``,
        and the batch is returned on the policy's device (see :class:`RolloutBatch`).

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
        parameter = next(policy.parameters())
        dtype, device = parameter.dtype, parameter.device
        records: dict[str, list] = {k: [] for k in ("obs", "next", "act", "rew", "term", "end")}
        finished: list[float] = []
        for _ in range(num_steps):
            observation = torch.tensor(self._observation, dtype=dtype)
            action = policy.sample(observation.to(device).unsqueeze(0), self.generator)[0].cpu()
            env_action = self._env_action(action)
            next_observation, reward, terminated, truncated, _ = self.env.step(env_action)
            self._episode_actions.append(env_action)
            self._episode_return += float(reward)
            records["obs"].append(observation)
            records["next"].append(torch.tensor(next_observation, dtype=dtype))
            records["act"].append(action)
            records["rew"].append(float(reward))
            records["term"].append(bool(terminated))
            records["end"].append(bool(terminated or truncated))
            if terminated or truncated:
                finished.append(self._episode_return)
                self._start_episode(self._episode + 1)
            else:
                self._observation = np.array(next_observation)
        self.env_steps += num_steps
        self.batches += 1
        return _batch(records, tuple(finished), dtype, device)

    def state_dict(self) -> dict[str, Any]:
        """The state of the stream, a plain dict of numbers, strings and CPU tensors (copies).

        Loadable with ``torch.load(..., weights_only=True)``. Keys: ``"env_id"`` (the
        environment's ``spec.id``, or ``None``), ``"random_state"``, ``"generator_state"``
        (uint8 tensor), ``"env_steps"``, ``"batches"``, ``"episode"`` (the index of the current
        episode), ``"episode_actions"`` (the actions the environment received in
        it, shape ``(L, *action_space.shape)``), ``"episode_return"`` and ``"observation"``
        (the current one, shape ``(obs_dim,)``).
        """
        space = self.env.action_space
        actions = np.array(self._episode_actions, dtype=space.dtype).reshape(-1, *space.shape)
        return {
            "env_id": env_id(self.env),
            "random_state": self.random_state,
            "generator_state": self.generator.get_state(),
            "env_steps": self.env_steps,
            "batches": self.batches,
            "episode": self._episode,
            "episode_actions": torch.from_numpy(actions),
            "episode_return": self._episode_return,
            "observation": torch.from_numpy(self._observation.copy()),
        }

    @classmethod
    def from_state_dict(cls, env: gym.Env, state_dict: Mapping[str, Any]) -> RolloutCollector:
        """A collector that continues the stream of ``state_dict`` (see :meth:`state_dict`).

        Resets ``env`` with the current episode's seed and replays the saved episode's actions.

        Raises
        ------
        ValueError
            If a key is missing or a value is invalid (the message names it), ``env`` is
            another environment than the saved one, or the replay does not reproduce the
            saved observation and return (an environment whose state does not follow from
            its reset seed and the actions).
        """
        check_stream_state(state_dict)
        saved_id, current_id = state_dict["env_id"], env_id(env)
        if saved_id != current_id:
            raise ValueError(
                f"state_dict['env_id'] is {saved_id!r} but the environment is {current_id!r}"
            )
        collector = cls(env, state_dict["random_state"])
        collector._replay(state_dict["episode"], state_dict["episode_actions"])
        collector._check_replay(state_dict)
        collector.generator.set_state(state_dict["generator_state"].cpu())
        collector.env_steps = state_dict["env_steps"]
        collector.batches = state_dict["batches"]
        return collector

    def _replay(self, episode: int, actions: Tensor) -> None:
        self._start_episode(episode)
        discrete = isinstance(self.env.action_space, gym.spaces.Discrete)
        for step, action in enumerate(actions.cpu().numpy()):
            env_action = int(action) if discrete else action
            observation, reward, terminated, truncated, _ = self.env.step(env_action)
            if terminated or truncated:
                raise ValueError(
                    f"replaying state_dict['episode_actions'], the episode ended at step {step} "
                    f"of {len(actions)}: the environment does not reproduce the saved episode"
                )
            self._episode_actions.append(env_action)
            self._episode_return += float(reward)
            self._observation = np.array(observation)

    def _check_replay(self, state_dict: Mapping[str, Any]) -> None:
        saved = state_dict["observation"].cpu().numpy()
        if not np.array_equal(self._observation, saved):
            raise ValueError(
                f"replaying the saved episode led to the observation {self._observation!r}, not "
                f"to state_dict['observation'] = {saved!r}: the environment's state does not "
                "follow from its reset seed and actions"
            )
        if self._episode_return != state_dict["episode_return"]:
            raise ValueError(
                f"replaying the saved episode gave the return {self._episode_return!r}, not "
                f"state_dict['episode_return'] = {state_dict['episode_return']!r}"
            )
