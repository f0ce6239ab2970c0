"""The on-policy training loop: collect a batch, update, log."""

from __future__ import annotations

import math
from dataclasses import dataclass

import gymnasium as gym

from natgrad._validation import positive_int
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

    Parameters
    ----------
    agent : PolicyGradient
        :class:`~natgrad.rl.NPG`, :class:`~natgrad.rl.TRPO` or
        :class:`~natgrad.rl.VanillaPolicyGradient`; updated in place.
    env : gymnasium.Env
    iterations, steps_per_iteration : int
    random_state : int
        Seeds the environment and the action sampling (see
        :class:`~natgrad.rl.RolloutCollector`).

    Returns
    -------
    list of IterationLog
    """
    if not isinstance(agent, PolicyGradient):
        raise TypeError(f"agent must be a PolicyGradient, got {type(agent).__name__}")
    positive_int("iterations", iterations)
    positive_int("steps_per_iteration", steps_per_iteration)
    collector = RolloutCollector(env, random_state)
    history = []
    for iteration in range(iterations):
        batch = collector.collect(agent.policy, steps_per_iteration)
        stats = agent.update(batch)
        returns = batch.episode_returns
        mean_return = sum(returns) / len(returns) if returns else math.nan
        history.append(
            IterationLog(iteration, collector.env_steps, mean_return, len(returns), stats)
        )
    return history
