"""GAE against hand-computed examples and its λ = 0 / λ = 1 limits."""

import pytest
import torch

from natgrad.rl import gae_advantages

GAMMA, LAM = 0.9, 0.5


def test_gae_hand_computed_episode_boundaries():
    # steps: 0, 1 (terminal), 2 (truncated: bootstraps from next value), 3 (batch end)
    rewards = torch.tensor([1.0, 2.0, 0.5, 1.0])
    values = torch.tensor([0.5, 1.0, 2.0, 0.0])
    next_values = torch.tensor([1.0, 9.0, 3.0, 4.0])
    terminated = torch.tensor([False, True, False, False])
    episode_ends = torch.tensor([False, True, True, True])
    # δ = r + γ (1 − term) V' − V
    deltas = [1.0 + 0.9 * 1.0 - 0.5, 2.0 - 1.0, 0.5 + 0.9 * 3.0 - 2.0, 1.0 + 0.9 * 4.0 - 0.0]
    expected = torch.tensor([deltas[0] + 0.45 * deltas[1], deltas[1], deltas[2], deltas[3]])
    advantages = gae_advantages(rewards, values, next_values, terminated, episode_ends, GAMMA, LAM)
    torch.testing.assert_close(advantages, expected)


def test_gae_lambda_one_gives_discounted_returns_minus_values():
    rewards = torch.tensor([1.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    values = torch.tensor([0.3, -0.2, 0.7, 1.1], dtype=torch.float64)
    next_values = torch.cat([values[1:], torch.zeros(1, dtype=torch.float64)])
    terminated = torch.tensor([False, False, False, True])
    returns = torch.zeros(4, dtype=torch.float64)
    running = 0.0
    for step in range(3, -1, -1):
        running = float(rewards[step]) + GAMMA * running
        returns[step] = running
    advantages = gae_advantages(
        rewards, values, next_values, terminated, terminated.clone(), GAMMA, 1.0
    )
    torch.testing.assert_close(advantages, returns - values)
    td_errors = gae_advantages(
        rewards, values, next_values, terminated, terminated.clone(), GAMMA, 0.0
    )
    torch.testing.assert_close(td_errors, rewards + GAMMA * next_values - values)


def test_gae_rejects_bad_input():
    ones = torch.ones(3)
    flags = torch.zeros(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="gamma"):
        gae_advantages(ones, ones, ones, flags, flags, gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        gae_advantages(ones, ones, ones, flags, flags, lam=-0.1)
    with pytest.raises(ValueError, match="next_values"):
        gae_advantages(ones, ones, torch.ones(2), flags, flags)
