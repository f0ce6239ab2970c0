"""NPG's trust-region step and TRPO's line search against dense float64 oracles."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad, vmap

import natgrad
from natgrad.rl import (
    NPG,
    TRPO,
    CategoricalMLPPolicy,
    GaussianMLPPolicy,
    ValueFunction,
    VanillaPolicyGradient,
)

DTYPE = torch.float64
NUM_STATES = 12


def batch(policy, seed):
    generator = torch.Generator().manual_seed(seed)
    observations = torch.randn(NUM_STATES, 3, generator=generator, dtype=DTYPE)
    actions = policy.sample(observations, generator)
    advantages = torch.randn(NUM_STATES, generator=generator, dtype=DTYPE)
    return observations, actions, advantages


def categorical_policy(seed):
    generator = torch.Generator().manual_seed(seed)
    policy = CategoricalMLPPolicy(3, 3, hidden_sizes=(4,), generator=generator).to(DTYPE)
    with torch.no_grad():
        policy.logits[-1].weight.normal_(generator=generator)
    return policy


def gaussian_policy(seed):
    generator = torch.Generator().manual_seed(seed)
    policy = GaussianMLPPolicy(3, 2, hidden_sizes=(4,), generator=generator).to(DTYPE)
    with torch.no_grad():
        policy.mean[-1].weight.normal_(generator=generator)
    return policy


def value_function():
    return ValueFunction(3, (4,), torch.Generator().manual_seed(0)).to(DTYPE)


def flat(policy):
    return torch.cat([p.detach().reshape(-1) for p in policy.parameters()])


def per_sample_gradient(policy, observations, actions, advantages):
    """``1/T Σₜ Âₜ ∇ log π(aₜ|sₜ)`` from per-sample ``torch.func`` gradients."""
    params = {k: v.detach() for k, v in policy.named_parameters()}

    def log_prob(params, observation, action):
        outputs = functional_call(policy, params, (observation.unsqueeze(0),))
        return policy.distribution_from(outputs).log_prob(action.unsqueeze(0))[0]

    grads = vmap(grad(log_prob), in_dims=(None, 0, 0))(params, observations, actions)
    rows = torch.cat([g.reshape(NUM_STATES, -1) for g in grads.values()], dim=1)
    return advantages @ rows / NUM_STATES


@pytest.mark.parametrize("damping", [1e-3, 0.1])
def test_npg_step_is_damped_natural_gradient_on_the_quadratic_kl_boundary(damping):
    policy = categorical_policy(seed=0)
    observations, actions, advantages = batch(policy, seed=1)
    size = flat(policy).numel()
    agent = NPG(policy, value_function(), max_kl=0.02, cg_iters=3 * size, cg_damping=damping)
    step, gradient, _ = agent.natural_step(observations, actions, advantages)

    fisher = natgrad.fisher(
        policy.logits, observations, likelihood="categorical", structure="dense"
    ).to_dense()
    torch.testing.assert_close(
        gradient, per_sample_gradient(policy, observations, actions, advantages)
    )
    direction = torch.linalg.solve(fisher + damping * torch.eye(size, dtype=DTYPE), gradient)
    scale = math.sqrt(2 * 0.02 / float(direction @ fisher @ direction))
    torch.testing.assert_close(step, scale * direction, rtol=1e-6, atol=1e-9)
    assert 0.5 * float(step @ fisher @ step) == pytest.approx(0.02, rel=1e-9)


def torch_kl(policy, observations, old_outputs):
    with torch.no_grad():
        new = policy.distribution(observations)
        old = policy.distribution_from(old_outputs)
        return float(torch.distributions.kl_divergence(old, new).mean())


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    max_kl=st.sampled_from([1e-3, 1e-2, 0.1, 1.0]),
    gaussian=st.booleans(),
)
def test_trpo_accepted_step_has_exact_kl_within_delta_and_improves(seed, max_kl, gaussian):
    policy = gaussian_policy(seed) if gaussian else categorical_policy(seed)
    observations, actions, advantages = batch(policy, seed + 1)
    with torch.no_grad():
        old_outputs = tuple(t.clone() for t in policy(observations))
        old_log_probs = policy.log_prob(observations, actions)
    before = flat(policy)
    agent = TRPO(policy, value_function(), max_kl=max_kl, cg_iters=20)
    stats = agent.policy_step(observations, actions, advantages)
    assert stats["accepted"] == 1.0
    kl = torch_kl(policy, observations, old_outputs)
    assert 0 < kl <= max_kl
    assert stats["kl"] == pytest.approx(kl, rel=1e-9)
    with torch.no_grad():
        ratio = torch.exp(policy.log_prob(observations, actions) - old_log_probs)
    assert float((ratio * advantages).mean()) > float(advantages.mean())
    assert not torch.equal(flat(policy), before)


def test_trpo_backtracks_when_the_full_step_violates_the_kl_bound():
    policy = categorical_policy(seed=3)
    observations, actions, advantages = batch(policy, seed=4)
    with torch.no_grad():
        old_outputs = tuple(t.clone() for t in policy(observations))
    start = flat(policy)
    agent = TRPO(policy, value_function(), max_kl=0.5, cg_iters=20)
    step, _, _ = agent.natural_step(observations, actions, advantages)
    natgrad.rl.policy_fisher.set_flat_parameters(policy, start + step)
    full_step_kl = torch_kl(policy, observations, old_outputs)
    natgrad.rl.policy_fisher.set_flat_parameters(policy, start)
    assert full_step_kl > 0.5
    stats = agent.policy_step(observations, actions, advantages)
    assert stats["step_fraction"] < 1.0
    assert torch_kl(policy, observations, old_outputs) <= 0.5


def test_trpo_refuses_when_no_backtracked_step_satisfies_the_kl_bound():
    """Same batch as above, one try only: the full step's exact KL exceeds δ, so nothing is
    accepted and the parameters are restored bit for bit."""
    policy = categorical_policy(seed=3)
    observations, actions, advantages = batch(policy, seed=4)
    start = flat(policy)
    agent = TRPO(policy, value_function(), max_kl=0.5, cg_iters=20, max_backtracks=1)
    stats = agent.policy_step(observations, actions, advantages)
    assert stats == {
        "kl": 0.0,
        "accepted": 0.0,
        "step_fraction": 0.0,
        "surrogate": float(advantages.mean()),
    }
    assert torch.equal(flat(policy), start)


@pytest.mark.parametrize("agent_class", [NPG, TRPO, VanillaPolicyGradient])
def test_a_column_of_advantages_is_refused_and_the_policy_left_alone(agent_class):
    """``(T, 1)`` advantages would broadcast to a ``(T, T)`` objective and a wrong step."""
    policy = categorical_policy(seed=7)
    observations, actions, advantages = batch(policy, seed=8)
    before = flat(policy)
    agent = agent_class(policy, value_function())
    with pytest.raises(ValueError, match=rf"advantages must have shape \({NUM_STATES},\)"):
        agent.policy_step(observations, actions, advantages[:, None])
    assert torch.equal(flat(policy), before)


@pytest.mark.parametrize("agent_class", [NPG, TRPO])
def test_zero_advantages_refuse_the_step(agent_class):
    policy = categorical_policy(seed=5)
    observations, actions, _ = batch(policy, seed=6)
    before = flat(policy)
    stats = agent_class(policy, value_function()).policy_step(
        observations, actions, torch.zeros(NUM_STATES, dtype=DTYPE)
    )
    assert stats["accepted"] == 0.0
    assert torch.equal(flat(policy), before)


def test_npg_refuses_a_step_that_overflows_the_policy():
    """A huge trust region overflows exp(log σ): the KL is not finite, the step is undone."""
    policy = gaussian_policy(seed=5)
    observations, actions, advantages = batch(policy, seed=6)
    before = flat(policy)
    stats = NPG(policy, value_function(), max_kl=1e300).policy_step(
        observations, actions, advantages
    )
    assert stats["accepted"] == 0.0
    assert torch.equal(flat(policy), before)


def test_agents_reject_bad_arguments():
    policy = categorical_policy(seed=0)
    with pytest.raises(ValueError, match="max_kl"):
        NPG(policy, value_function(), max_kl=0.0)
    with pytest.raises(ValueError, match="cg_iters"):
        NPG(policy, value_function(), cg_iters=0)
    with pytest.raises(ValueError, match="cg_damping"):
        NPG(policy, value_function(), cg_damping=float("nan"))
    with pytest.raises(ValueError, match="backtrack_ratio"):
        TRPO(policy, value_function(), backtrack_ratio=1.0)
    with pytest.raises(ValueError, match="gae_lambda"):
        NPG(policy, value_function(), gae_lambda=2.0)
    with pytest.raises(ValueError, match="lr"):
        VanillaPolicyGradient(policy, value_function(), lr=-1.0)
    with pytest.raises(TypeError, match="policy"):
        NPG(torch.nn.Linear(3, 3), value_function())
    with pytest.raises(TypeError, match="value_function"):
        NPG(policy, torch.nn.Linear(3, 1))
