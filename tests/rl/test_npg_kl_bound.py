"""NPG and TRPO keep the EXACT mean KL of a step bounded, also where the quadratic model fails.

With ``cg_damping=0`` and fewer states than parameters the Fisher is singular, and the full NPG
step, scaled by the quadratic model ``½ sᵀFs = δ``, used to have an exact KL of 10 to 300 for
``δ = 0.01``. The oracle is the closed-form KL over the batch, computed in float64 with NumPy
from the policies' probabilities (categorical) or means and standard deviations (Gaussian).
"""

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import rel_entr

from natgrad.rl import (
    NPG,
    TRPO,
    CategoricalMLPPolicy,
    GaussianMLPPolicy,
    RolloutCollector,
    ValueFunction,
    make_policy,
)
from natgrad.rl.policy_fisher import flat_parameters
from natgrad.rl.policy_gradient import normalized

DTYPE = torch.float64
MAX_KL = 0.01


def numpy_outputs(policy, observations):
    """What the KL oracle needs, as float64 NumPy arrays: probabilities, or (mean, std)."""
    with torch.no_grad():
        if isinstance(policy, CategoricalMLPPolicy):
            return (torch.softmax(policy.logits(observations), dim=-1).numpy(),)
        mean = policy.mean(observations).numpy()
        return mean, np.broadcast_to(np.exp(policy.log_std.numpy()), mean.shape)


def oracle_mean_kl(old, new):
    """``1/T Σₜ KL(π_old(·|sₜ) ‖ π_new(·|sₜ))`` in closed form (NumPy, float64)."""
    if len(old) == 1:
        return float(rel_entr(old[0], new[0]).sum(axis=-1).mean())
    (mean_old, std_old), (mean_new, std_new) = old, new
    per_dim = (
        np.log(std_new / std_old)
        + (std_old**2 + (mean_old - mean_new) ** 2) / (2.0 * std_new**2)
        - 0.5
    )
    return float(per_dim.sum(axis=-1).mean())


def synthetic_step(agent_class, kind, seed, states, **options):
    """One policy step on random states, actions of the policy and random advantages."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "categorical":
        policy = CategoricalMLPPolicy(4, 3, (16,), generator).to(DTYPE)
    else:
        policy = GaussianMLPPolicy(4, 2, (16,), generator=generator).to(DTYPE)
    agent = agent_class(policy, ValueFunction(4, (4,), generator).to(DTYPE), **options)
    observations = torch.randn(states, 4, generator=generator, dtype=DTYPE)
    actions = policy.sample(observations, generator)
    advantages = torch.randn(states, generator=generator, dtype=DTYPE)
    before = numpy_outputs(policy, observations)
    start = flat_parameters(policy)
    stats = agent.policy_step(observations, actions, advantages)
    return stats, oracle_mean_kl(before, numpy_outputs(policy, observations)), start, policy


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["categorical", "gaussian"]),
    seed=st.integers(0, 2**16),
    states=st.integers(5, 40),
    cg_damping=st.sampled_from([0.0, 1e-6, 1e-2]),
)
def test_an_npg_step_has_an_exact_kl_within_the_tolerance(kind, seed, states, cg_damping):
    stats, kl, start, policy = synthetic_step(
        NPG, kind, seed, states, max_kl=MAX_KL, cg_damping=cg_damping, cg_iters=50
    )
    assert kl <= 2.0 * MAX_KL * (1 + 1e-9)
    assert stats["kl"] == pytest.approx(kl, rel=1e-7, abs=1e-15)
    if stats["accepted"] == 0.0:
        assert torch.equal(flat_parameters(policy), start)


@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_an_undamped_npg_step_is_shrunk_to_the_tolerance(kind):
    """The case that used to step to a KL of 10 to 300: it is now halved until within 2δ."""
    stats, kl, _, _ = synthetic_step(NPG, kind, 0, 20, max_kl=MAX_KL, cg_damping=0.0, cg_iters=50)
    assert stats["accepted"] == 1.0 and stats["step_fraction"] < 1.0
    assert 0.0 < kl <= 2.0 * MAX_KL
    assert stats["kl"] == pytest.approx(kl, rel=1e-7)


@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_a_tight_tolerance_is_honoured(kind):
    _, kl, _, _ = synthetic_step(
        NPG, kind, 1, 20, max_kl=MAX_KL, cg_damping=0.0, cg_iters=50, kl_tolerance=1.0
    )
    assert kl <= MAX_KL


@pytest.mark.parametrize("agent_class", [NPG, TRPO])
def test_the_first_undamped_step_on_cartpole_stays_in_the_trust_region(agent_class):
    """The reported case: CartPole, 50 states, a (32, 32) policy, cg_damping=0."""
    env = gym.make("CartPole-v1")
    generator = torch.Generator().manual_seed(0)
    policy = make_policy(env, (32, 32), generator).to(DTYPE)
    value_function = ValueFunction(policy.obs_dim, (32, 32), generator).to(DTYPE)
    agent = agent_class(policy, value_function, max_kl=MAX_KL, cg_damping=0.0, cg_iters=50)
    batch = RolloutCollector(env, 0).collect(policy, 50)
    advantages = normalized(agent.advantages(batch)[0])
    before = numpy_outputs(policy, batch.observations)
    stats = agent.policy_step(batch.observations, batch.actions, advantages)
    kl = oracle_mean_kl(before, numpy_outputs(policy, batch.observations))
    bound = MAX_KL if agent_class is TRPO else 2.0 * MAX_KL
    assert kl <= bound
    assert stats["kl"] == pytest.approx(kl, rel=1e-7, abs=1e-15)


def test_trpo_accepts_only_steps_within_the_exact_radius():
    for seed in range(4):
        stats, kl, start, policy = synthetic_step(
            TRPO, "gaussian", seed, 20, max_kl=MAX_KL, cg_damping=0.0, cg_iters=50
        )
        assert kl <= MAX_KL
        if stats["accepted"] == 0.0:
            assert torch.equal(flat_parameters(policy), start)


def test_kl_tolerance_is_checked():
    policy = CategoricalMLPPolicy(4, 2, (4,))
    value_function = ValueFunction(4, (4,))
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="kl_tolerance"):
            NPG(policy, value_function, kl_tolerance=bad)
    with pytest.raises(TypeError, match="kl_tolerance"):
        TRPO(policy, value_function, kl_tolerance=2.0)
