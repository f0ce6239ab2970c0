"""Traps at the environment boundary: reused observation buffers, shifted ``Discrete`` spaces,
gymnasium's terminated/truncated flags in GAE, and policies with frozen parameters."""

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
    fit_value_function,
    gae_advantages,
    make_policy,
    policy_kl_fisher,
    train,
)

DTYPE = torch.float64


class CountingEnv(gym.Env):
    """Observation ``[t, -t]`` at step ``t`` of an episode of 3 steps, always in ONE buffer."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), dtype=np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self):
        self._buffer = np.zeros(2, dtype=np.float32)
        self._step = 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self._step = 0
        self._buffer[:] = 0.0
        return self._buffer, {}

    def step(self, action):
        self._step += 1
        self._buffer[:] = (self._step, -self._step)
        return self._buffer, 1.0, False, self._step == 3, {}


class ShiftedActions(gym.Env):
    """``Discrete(3, start=-1)``: the reward is the action the environment received."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)
    action_space = gym.spaces.Discrete(3, start=-1)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is outside {self.action_space}")
        return np.zeros(1, dtype=np.float32), float(action), False, False, {}


class NaNRewardEnv(gym.Env):
    """Continuous actions; the reward of the third step of every episode is NaN."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self._step = 0
        return np.zeros(2, dtype=np.float32), {}

    def step(self, action):
        self._step += 1
        reward = float("nan") if self._step == 3 else 1.0
        return np.full(2, 0.1 * self._step, dtype=np.float32), reward, False, self._step == 10, {}


def test_observations_are_copied_from_an_environment_that_reuses_its_buffer():
    env = CountingEnv()
    policy = make_policy(env, (4,), torch.Generator().manual_seed(0))
    batch = RolloutCollector(env, random_state=0).collect(policy, 5)
    assert batch.observations[:, 0].tolist() == [0.0, 1.0, 2.0, 0.0, 1.0]
    assert batch.next_observations[:, 0].tolist() == [1.0, 2.0, 3.0, 1.0, 2.0]
    assert batch.next_observations[:, 1].tolist() == [-1.0, -2.0, -3.0, -1.0, -2.0]
    with pytest.raises(TypeError, match="policy"):
        RolloutCollector(env, random_state=0).collect(torch.nn.Linear(2, 2), 5)


def test_discrete_action_space_with_a_start_offset():
    env = ShiftedActions()
    policy = make_policy(env, (4,), torch.Generator().manual_seed(0))
    batch = RolloutCollector(env, random_state=0).collect(policy, 60)
    assert set(batch.actions.tolist()) == {0, 1, 2}  # the policy's indices, for log π
    torch.testing.assert_close(batch.rewards, batch.actions.float() - 1.0)


def gae_by_episode_sums(rewards, values, next_values, terminated, episode_ends, gamma, lam):
    """``Âₜ = Σₗ (γλ)ˡ δₜ₊ₗ`` up to the episode's end, as a float64 double loop."""
    advantages = []
    for start in range(len(rewards)):
        total, weight, step = 0.0, 1.0, start
        while True:
            bootstrap = 0.0 if terminated[step] else gamma * float(next_values[step])
            total += weight * (float(rewards[step]) + bootstrap - float(values[step]))
            if episode_ends[step]:
                break
            weight *= gamma * lam
            step += 1
        advantages.append(total)
    return torch.tensor(advantages, dtype=DTYPE)


def test_gae_with_gymnasium_flags_matches_episode_sums_and_refuses_truncated_alone():
    generator = torch.Generator().manual_seed(0)
    rewards, values, next_values = torch.randn(3, 40, generator=generator, dtype=DTYPE)
    flags = torch.rand(2, 40, generator=generator) < 0.15
    terminated, truncated = flags[0], flags[1] & ~flags[0]
    terminated[[5, 6]] = True  # two terminal steps in a row, then a one-step episode
    episode_ends = terminated | truncated
    episode_ends[-1] = True
    advantages = gae_advantages(
        rewards, values, next_values, terminated, episode_ends, gamma=0.95, lam=0.8
    )
    expected = gae_by_episode_sums(
        rewards, values, next_values, terminated, episode_ends, 0.95, 0.8
    )
    torch.testing.assert_close(advantages, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"terminated but not episode ends"):
        gae_advantages(rewards, values, next_values, terminated, truncated)
    with pytest.raises(ValueError, match="rewards must have shape"):
        gae_advantages(rewards[:, None], values, next_values, terminated, episode_ends)


def test_frozen_parameters_are_left_out_and_an_all_frozen_policy_is_refused():
    generator = torch.Generator().manual_seed(0)
    policy = GaussianMLPPolicy(3, 2, (4,), generator=generator).to(DTYPE)
    with torch.no_grad():
        policy.mean[-1].weight.normal_(generator=generator)
    observations = torch.randn(6, 3, generator=generator, dtype=DTYPE)
    full = policy_kl_fisher(policy, observations).to_dense()
    policy.mean[0].weight.requires_grad_(False)
    trainable = torch.cat([torch.full((p.numel(),), p.requires_grad) for p in policy.parameters()])
    partial = policy_kl_fisher(policy, observations).to_dense()
    torch.testing.assert_close(partial, full[trainable][:, trainable], rtol=0, atol=0)

    value_function = ValueFunction(3, (4,), generator).to(DTYPE)
    for parameter in policy.parameters():
        parameter.requires_grad_(False)
    for agent_class in (NPG, TRPO, VanillaPolicyGradient):
        with pytest.raises(ValueError, match="no trainable parameters"):
            agent_class(policy, value_function)
    with pytest.raises(ValueError, match="no trainable parameters"):
        policy_kl_fisher(policy, observations)
    with pytest.raises(ValueError, match="obs_dim"):
        ValueFunction(0)


@pytest.mark.parametrize("agent_class", [NPG, TRPO])
def test_a_nan_reward_is_refused_before_it_reaches_the_value_function(agent_class):
    env = NaNRewardEnv()
    generator = torch.Generator().manual_seed(0)
    policy = make_policy(env, (4,), generator)
    value_function = ValueFunction(2, (4,), generator)
    before = [p.detach().clone() for p in value_function.parameters()]
    with pytest.raises(ValueError, match=r"batch.rewards is not finite at steps \[2, 12\]"):
        train(
            agent_class(policy, value_function),
            env,
            iterations=1,
            steps_per_iteration=20,
            random_state=0,
        )
    for old, new in zip(before, value_function.parameters(), strict=True):
        assert torch.equal(old, new)


def test_log_prob_refuses_actions_that_would_broadcast():
    """A (N,) action vector for a 1-d Gaussian, or (N, 1) indices for a categorical policy,
    would broadcast against the (N, ·) parameters into an N × N grid of log-densities."""
    generator = torch.Generator().manual_seed(0)
    observations = torch.randn(5, 3, generator=generator)
    gaussian = GaussianMLPPolicy(3, 1, (4,), generator=generator)
    actions = gaussian.sample(observations, generator)
    expected = torch.distributions.Normal(gaussian.mean(observations), 1.0).log_prob(actions)
    torch.testing.assert_close(gaussian.log_prob(observations, actions), expected[:, 0])
    with pytest.raises(ValueError, match=r"actions must have shape \(5, 1\)"):
        gaussian.log_prob(observations, actions[:, 0])
    categorical = CategoricalMLPPolicy(3, 4, (4,), generator=generator)
    indices = categorical.sample(observations, generator)
    with pytest.raises(ValueError, match=r"actions must have shape \(5,\)"):
        categorical.log_prob(observations, indices[:, None])


def test_value_fit_matches_least_squares_and_refuses_a_column_of_targets():
    """A linear ``V`` fitted by many Adam steps reaches the float64 least-squares solution."""
    generator = torch.Generator().manual_seed(0)
    observations = torch.randn(30, 2, generator=generator, dtype=DTYPE)
    targets = observations @ torch.tensor([1.5, -0.5], dtype=DTYPE) + 0.3
    targets = targets + 0.1 * torch.randn(30, generator=generator, dtype=DTYPE)
    value_function = ValueFunction(2, (), generator).to(DTYPE)
    optimizer = torch.optim.Adam(value_function.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"targets must have shape \(30,\)"):
        fit_value_function(value_function, observations, targets[:, None], optimizer, 1)
    loss = fit_value_function(value_function, observations, targets, optimizer, 600)
    design = torch.cat([observations, torch.ones(30, 1, dtype=DTYPE)], dim=1)
    solution = torch.linalg.lstsq(design, targets[:, None]).solution[:, 0]
    best = float((design @ solution - targets).square().mean())
    assert loss == pytest.approx(best, rel=1e-6)
