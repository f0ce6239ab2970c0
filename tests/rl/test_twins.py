"""Twin set-ups that must agree: whole vs split batches, a resumed agent vs an uninterrupted one,
TRPO vs NPG, NPG vs a dense natural-gradient solve; and policies that do not fit the env."""

import io
import math

import gymnasium as gym
import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

from natgrad.rl import (
    NPG,
    TRPO,
    CategoricalMLPPolicy,
    GaussianMLPPolicy,
    RolloutCollector,
    ValueFunction,
    VanillaPolicyGradient,
    make_policy,
    policy_kl_fisher,
)
from natgrad.rl.policy_fisher import flat_parameters

DTYPE = torch.float64
AGENTS = [NPG, TRPO, VanillaPolicyGradient]


def cartpole_agent(agent_class, seed):
    generator = torch.Generator().manual_seed(seed)
    policy = make_policy(gym.make("CartPole-v1"), (8,), generator)
    return agent_class(policy, ValueFunction(policy.obs_dim, (8,), generator))


def all_parameters(agent):
    value = torch.nn.utils.parameters_to_vector(agent.value_function.parameters()).detach()
    return torch.cat([flat_parameters(agent.policy), value])


def train_steps(agent, collector, updates):
    for _ in range(updates):
        agent.update(collector.collect(agent.policy, 100))


@pytest.mark.parametrize("agent_class", AGENTS)
def test_resuming_from_the_agent_state_dict_equals_uninterrupted_training(agent_class):
    uninterrupted = cartpole_agent(agent_class, seed=0)
    train_steps(uninterrupted, RolloutCollector(gym.make("CartPole-v1"), 7), 4)

    first = cartpole_agent(agent_class, seed=0)
    collector = RolloutCollector(gym.make("CartPole-v1"), 7)
    train_steps(first, collector, 2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = cartpole_agent(agent_class, seed=5)  # other initial weights, fresh optimizers
    resumed.load_state_dict(torch.load(buffer))
    train_steps(resumed, collector, 2)
    assert torch.equal(all_parameters(resumed), all_parameters(uninterrupted))


def test_agent_load_state_dict_names_missing_entries():
    agent = cartpole_agent(VanillaPolicyGradient, seed=0)
    state = agent.state_dict()
    del state["policy_optimizer"]
    with pytest.raises(ValueError, match="policy_optimizer"):
        agent.load_state_dict(state)


def test_value_function_of_another_dtype_or_size_is_refused():
    policy = make_policy(gym.make("CartPole-v1"), (8,)).to(DTYPE)
    with pytest.raises(ValueError, match="dtype"):
        NPG(policy, ValueFunction(4, (8,)))
    with pytest.raises(ValueError, match="obs_dim"):
        NPG(policy, ValueFunction(3, (8,)).to(DTYPE))


@pytest.mark.parametrize(
    ("env_id", "policy"),
    [
        ("Pendulum-v1", GaussianMLPPolicy(3, 2, (4,))),  # Pendulum keeps only action[0]
        ("Pendulum-v1", CategoricalMLPPolicy(3, 3, (4,))),  # an index taken as a torque
        ("CartPole-v1", CategoricalMLPPolicy(4, 1, (4,))),  # never pushes right
        ("CartPole-v1", CategoricalMLPPolicy(4, 3, (4,))),
        ("CartPole-v1", GaussianMLPPolicy(4, 1, (4,))),
    ],
)
def test_a_policy_that_does_not_fit_the_action_space_is_refused(env_id, policy):
    collector = RolloutCollector(gym.make(env_id), random_state=0)
    with pytest.raises(ValueError, match="action space"):
        collector.collect(policy, 5)
    assert collector.env_steps == 0


def test_vector_environments_are_refused_by_name():
    env = gym.make_vec("CartPole-v1", num_envs=2, vectorization_mode="sync")
    with pytest.raises(ValueError, match="vector environments"):
        RolloutCollector(env, random_state=0)


def test_one_batch_equals_two_half_batches_and_the_fisher_their_weighted_mean():
    policy = make_policy(gym.make("CartPole-v1"), (8,), torch.Generator().manual_seed(0))
    whole = RolloutCollector(gym.make("CartPole-v1"), 3).collect(policy, 60)
    collector = RolloutCollector(gym.make("CartPole-v1"), 3)
    halves = [collector.collect(policy, 30) for _ in range(2)]
    for name in ("observations", "next_observations", "actions", "rewards", "terminated"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(h, name) for h in halves]))
    assert whole.episode_returns == halves[0].episode_returns + halves[1].episode_returns

    policy = policy.to(DTYPE)
    states = whole.observations.to(DTYPE)
    fisher = policy_kl_fisher(policy, states).to_dense()
    parts = [policy_kl_fisher(policy, part).to_dense() for part in (states[:20], states[20:])]
    torch.testing.assert_close(fisher, (20 * parts[0] + 40 * parts[1]) / 60)


def gaussian_policy_with_a_frozen_layer():
    generator = torch.Generator().manual_seed(0)
    policy = GaussianMLPPolicy(3, 2, (4,), generator=generator).to(DTYPE)
    with torch.no_grad():
        policy.mean[-1].weight.normal_(generator=generator)
        policy.log_std.copy_(torch.tensor([-0.3, 0.4]))
    policy.mean[0].weight.requires_grad_(False)
    return policy


def dense_natural_step(policy, observations, actions, advantages, damping, max_kl):
    """``α (F + λI)⁻¹ g`` with ``F`` and ``g`` from per-sample ``torch.func`` Jacobians."""
    params = {k: p.detach() for k, p in policy.named_parameters() if p.requires_grad}

    def log_prob(params, observation, action):
        outputs = functional_call(policy, params, (observation.unsqueeze(0),))
        return policy.distribution_from(outputs).log_prob(action.unsqueeze(0))[0]

    def outputs_of(params, observation):
        mean, log_std = functional_call(policy, params, (observation.unsqueeze(0),))
        return torch.cat([mean[0], log_std[0]])

    count = observations.shape[0]
    scores = vmap(grad(log_prob), in_dims=(None, 0, 0))(params, observations, actions)
    gradient = advantages @ torch.cat([s.reshape(count, -1) for s in scores.values()], 1) / count
    jacobians = vmap(jacrev(outputs_of), in_dims=(None, 0))(params, observations)
    rows = torch.cat([j.reshape(count, 4, -1) for j in jacobians.values()], dim=-1)
    # Fisher of N(m, diag e^{2s}) in (m, s): diag(e^{-2s}) and 2I
    output_fisher = torch.cat([torch.exp(-2 * policy.log_std.detach()), torch.full((2,), 2.0)])
    fisher = torch.einsum("nop,o,noq->pq", rows, output_fisher.to(DTYPE), rows) / count
    direction = torch.linalg.solve(
        fisher + damping * torch.eye(len(gradient), dtype=DTYPE), gradient
    )
    return math.sqrt(2 * max_kl / float(direction @ fisher @ direction)) * direction


def test_npg_and_trpo_steps_match_a_dense_solve_with_a_frozen_layer():
    generator = torch.Generator().manual_seed(1)
    observations = torch.randn(12, 3, generator=generator, dtype=DTYPE)
    advantages = torch.randn(12, generator=generator, dtype=DTYPE)
    actions = gaussian_policy_with_a_frozen_layer().sample(observations, generator)
    start = flat_parameters(gaussian_policy_with_a_frozen_layer())
    expected = dense_natural_step(
        gaussian_policy_with_a_frozen_layer(), observations, actions, advantages, 1e-3, 1e-3
    )
    for agent_class in (NPG, TRPO):  # TRPO: the same step, possibly halved
        policy = gaussian_policy_with_a_frozen_layer()
        value = ValueFunction(3, (4,)).to(DTYPE)
        agent = agent_class(policy, value, max_kl=1e-3, cg_iters=60, cg_damping=1e-3)
        stats = agent.policy_step(observations, actions, advantages)
        assert stats["step_fraction"] > 0
        torch.testing.assert_close(
            flat_parameters(policy) - start,
            stats["step_fraction"] * expected,
            rtol=1e-7,
            atol=1e-10,
        )
