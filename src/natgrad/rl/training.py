"""The on-policy training loop: collect a batch, update, log."""

from __future__ import annotations

import math
from dataclasses import dataclass

import gymnasium as gym

from natgrad._validation import nonnegative_int, positive_int
from natgrad.rl.policy_gradient import PolicyGradient
from natgrad.rl.rollouts import RolloutCollector


@dataclass(frozen=True)
class IterationLog:
    """Statistics of one training iteration.

    Attributes
    ----------
    iteration : int
        0-based.
    env_steps : int
        Environment steps taken so far, this iteration's batch included.
    mean_return : float
        Mean undiscounted return of the episodes that finished in this batch (NaN if none).
    episodes : int
        Number of episodes that finished in this batch.
    stats : dict of str to float
        What the agent's ``update`` reported (``kl``, ``value_loss``, ...).
    """

    iteration: int
    env_steps: int
    mean_return: float
    episodes: int
    stats: dict[str, float]


def train(
    agent: PolicyGradient,
    env: gym.Env,
    *,
    iterations: int,
    steps_per_iteration: int,
    random_state: int,
) -> list[IterationLog]:
    """Run ``iterations`` rounds of ``steps_per_iteration`` environment steps and one update.

    A call with the ``random_state`` of the agent's :attr:`~natgrad.rl.PolicyGradient.rollout_state`
    (set by the previous call, or restored by ``load_state_dict``) continues that rollout
    stream: ``train(iterations=k)`` twice is ``train(iterations=2k)`` once, bit for bit. Any
    other call starts the stream of ``random_state`` afresh.

    Parameters
    ----------
    agent : PolicyGradient
        :class:`~natgrad.rl.NPG`, :class:`~natgrad.rl.TRPO` or
        :class:`~natgrad.rl.VanillaPolicyGradient`; updated in place, its ``rollout_state``
        after every iteration. Its policy may be on a GPU: the environment steps on the CPU,
        the policy's forward passes and the update run on the policy's device.
    env : gymnasium.Env
        Continuing a stream, ``env`` is reset with the current episode's seed and the
        episode's actions are replayed (see :meth:`~natgrad.rl.RolloutCollector.from_state_dict`),
        so it may be a new instance, or have been used in between.
    iterations, steps_per_iteration : int
    random_state : int
        Non-negative seed of the environment and the action sampling (see
        :class:`~natgrad.rl.RolloutCollector`).

    Returns
    -------
    list of IterationLog
        One per iteration of this call; ``iteration`` and ``env_steps`` count from the start
        of the stream.

    Raises
    ------
    ValueError
        If an option is out of range, or a stream continued in ``env`` does not replay (see
        :meth:`~natgrad.rl.RolloutCollector.from_state_dict`).
    """
    if not isinstance(agent, PolicyGradient):
        raise TypeError(f"agent must be a PolicyGradient, got {type(agent).__name__}")
    positive_int("iterations", iterations)
    positive_int("steps_per_iteration", steps_per_iteration)
    collector = _collector(agent, env, nonnegative_int("random_state", random_state))
    history = []
    for _ in range(iterations):
        iteration = collector.batches
        batch = collector.collect(agent.policy, steps_per_iteration)
        stats = agent.update(batch)
        agent.rollout_state = collector.state_dict()
        returns = batch.episode_returns
        mean_return = sum(returns) / len(returns) if returns else math.nan
        history.append(
            IterationLog(iteration, collector.env_steps, mean_return, len(returns), stats)
        )
    return history


def _collector(agent: PolicyGradient, env: gym.Env, random_state: int) -> RolloutCollector:
    """The collector that continues the agent's stream if it has ``random_state``, else new."""
    state = agent.rollout_state
    if state is not None and state["random_state"] == random_state:
        return RolloutCollector.from_state_dict(env, state)
    return RolloutCollector(env, random_state)
