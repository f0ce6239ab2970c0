"""Seeded rollouts, bookkeeping against a replay, determinism, and learning on CartPole."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from natgrad.rl import (
    NPG,
    TRPO,
    CategoricalMLPPolicy,
    GaussianMLPPolicy,
    RolloutCollector,
    ValueFunction,
    VanillaPolicyGradient,
    episode_seed,
    make_policy,
    train,
)


class MultiDiscreteActions(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,))
    action_space = gym.spaces.MultiDiscrete([2, 3])


def agent_for(agent_class, env, seed, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    policy = make_policy(env, (32, 32), generator)
    return agent_class(policy, ValueFunction(policy.obs_dim, (32, 32), generator), **kwargs)


def test_pendulum_batch_matches_a_replay_of_its_actions():
    env = gym.make("Pendulum-v1")
    policy = make_policy(env, (8,), torch.Generator().manual_seed(0))
    assert isinstance(policy, GaussianMLPPolicy)
    with torch.no_grad():
        policy.log_std.fill_(1.0)  # wide enough that some actions leave [-2, 2]
    batch = RolloutCollector(env, random_state=3).collect(policy, 450)

    assert batch.observations.shape == (450, 3) and batch.actions.shape == (450, 1)
    assert not bool(batch.terminated.any())
    assert torch.nonzero(batch.episode_ends).flatten().tolist() == [199, 399, 449]
    assert len(batch.episode_returns) == 2
    assert bool((batch.actions.abs() > 2).any())

    replay = gym.make("Pendulum-v1")
    observation, _ = replay.reset(seed=3)
    episode = 0
    for step in range(450):
        np.testing.assert_allclose(batch.observations[step].numpy(), observation, rtol=1e-6)
        action = np.clip(batch.actions[step].numpy(), -2.0, 2.0)
        observation, reward, _, truncated, _ = replay.step(action)
        assert float(batch.rewards[step]) == pytest.approx(float(reward), rel=1e-6)
        np.testing.assert_allclose(batch.next_observations[step].numpy(), observation, rtol=1e-6)
        if truncated:
            episode += 1
            observation, _ = replay.reset(seed=episode_seed(3, episode))
    assert batch.episode_returns[0] == pytest.approx(float(batch.rewards[:200].sum()), rel=1e-5)


def test_cartpole_policy_and_termination_flags():
    env = gym.make("CartPole-v1")
    policy = make_policy(env, (8,), torch.Generator().manual_seed(0))
    assert isinstance(policy, CategoricalMLPPolicy)
    batch = RolloutCollector(env, random_state=0).collect(policy, 300)
    assert batch.actions.dtype == torch.int64
    assert bool(batch.terminated.any())
    assert bool((batch.terminated <= batch.episode_ends).all())
    assert len(batch.episode_returns) == int(batch.terminated.sum())


@pytest.mark.parametrize("agent_class", [VanillaPolicyGradient, NPG, TRPO])
def test_seeded_training_is_reproducible(agent_class):
    def run(seed):
        env = gym.make("CartPole-v1")
        agent = agent_for(agent_class, env, seed)
        history = train(agent, env, iterations=2, steps_per_iteration=100, random_state=seed)
        params = torch.cat([p.detach().reshape(-1) for p in agent.policy.parameters()])
        return [(log.mean_return, log.stats) for log in history], params

    first, second, other = run(0), run(0), run(1)
    assert first[0] == second[0]
    assert torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


@pytest.mark.parametrize("agent_class", [NPG, TRPO])
def test_cartpole_return_improves(agent_class):
    """8 × 1000 steps. Over seeds 0–3 the first batch averages 20–22 and the last two
    batches 123–272 (NPG) / 123–165 (TRPO); the bound 3 × first leaves a wide margin."""
    env = gym.make("CartPole-v1")
    agent = agent_for(agent_class, env, seed=0)
    history = train(agent, env, iterations=8, steps_per_iteration=1000, random_state=0)
    first = history[0].mean_return
    last = (history[-1].mean_return + history[-2].mean_return) / 2
    assert last > 3 * first
    assert all(log.stats["accepted"] == 1.0 for log in history)


def test_rollout_and_training_reject_bad_input():
    env = gym.make("CartPole-v1")
    with pytest.raises(TypeError, match="random_state"):
        RolloutCollector(env, random_state="0")
    collector = RolloutCollector(env, random_state=0)
    policy = make_policy(env, (4,))
    with pytest.raises(ValueError, match="num_steps"):
        collector.collect(policy, 0)
    with pytest.raises(ValueError, match="iterations"):
        train(agent_for(NPG, env, 0), env, iterations=0, steps_per_iteration=10, random_state=0)
    with pytest.raises(ValueError, match="observation space"):
        make_policy(gym.make("Blackjack-v1"))
    with pytest.raises(ValueError, match="action space"):
        make_policy(MultiDiscreteActions())
    with pytest.raises(ValueError, match="n_actions"):
        CategoricalMLPPolicy(4, 0)
    with pytest.raises(TypeError, match="obs_dim"):
        CategoricalMLPPolicy(4.0, 2)
