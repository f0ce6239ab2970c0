"""The KL-Hessian policy Fisher against dense float64 oracles."""

import pytest
import torch
from torch.func import functional_call, jacrev, vmap

import natgrad
from natgrad.rl import CategoricalMLPPolicy, GaussianMLPPolicy, mean_kl, policy_kl_fisher

DTYPE = torch.float64


def tiny_observations(num_states, obs_dim, seed):
    return torch.randn(num_states, obs_dim, generator=torch.Generator().manual_seed(seed)).to(DTYPE)


def categorical_policy(seed=0):
    generator = torch.Generator().manual_seed(seed)
    policy = CategoricalMLPPolicy(3, 4, hidden_sizes=(5,), generator=generator).to(DTYPE)
    with torch.no_grad():  # move away from the near-uniform initial logits
        policy.logits[-1].weight.normal_(generator=generator)
    return policy


def gaussian_policy(seed=0):
    generator = torch.Generator().manual_seed(seed)
    policy = GaussianMLPPolicy(3, 2, hidden_sizes=(4,), log_std_init=-0.3, generator=generator)
    policy = policy.to(DTYPE)
    with torch.no_grad():
        policy.mean[-1].weight.normal_(generator=generator)
        policy.log_std.copy_(torch.tensor([-0.3, 0.4]))
    return policy


def score_outer_product_fisher(policy, observations):
    """``1/N Σₙ Σₐ π(a|sₙ) ∇log π(a|sₙ) ∇log π(a|sₙ)ᵀ`` by enumerating the actions."""
    params = {k: v.detach() for k, v in policy.named_parameters()}

    def log_probs(flat_params, observation):
        return functional_call(policy, flat_params, (observation.unsqueeze(0),))[0][0]

    jacobians = vmap(jacrev(log_probs), in_dims=(None, 0))(params, observations)
    rows = torch.cat([j.reshape(*j.shape[:2], -1) for j in jacobians.values()], dim=-1)
    probs = policy(observations)[0].detach().exp()
    return torch.einsum("na,nap,naq->pq", probs, rows, rows) / observations.shape[0]


def test_categorical_fisher_matches_natgrad_dense_and_score_outer_product():
    policy = categorical_policy()
    observations = tiny_observations(7, 3, seed=1)
    fisher = policy_kl_fisher(policy, observations).to_dense()
    builder = natgrad.fisher(
        policy.logits, observations, likelihood="categorical", kind="exact", structure="dense"
    ).to_dense()
    torch.testing.assert_close(fisher, builder, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fisher, score_outer_product_fisher(policy, observations))


def test_gaussian_fisher_matches_closed_form():
    """``F = [2I, 0; 0, 1/N Σₙ Jₙᵀ diag(σ⁻²) Jₙ]`` over (log σ, mean-network parameters)."""
    policy = gaussian_policy()
    observations = tiny_observations(6, 3, seed=2)
    mean_params = {k: v.detach() for k, v in policy.mean.named_parameters()}

    def mean_of(params, observation):
        return functional_call(policy.mean, params, (observation.unsqueeze(0),))[0]

    jacobians = vmap(jacrev(mean_of), in_dims=(None, 0))(mean_params, observations)
    rows = torch.cat([j.reshape(*j.shape[:2], -1) for j in jacobians.values()], dim=-1)
    precision = torch.exp(-2 * policy.log_std.detach())
    mean_block = torch.einsum("nap,a,naq->pq", rows, precision, rows) / observations.shape[0]
    expected = torch.block_diag(2 * torch.eye(2, dtype=DTYPE), mean_block)
    fisher = policy_kl_fisher(policy, observations).to_dense()
    torch.testing.assert_close(fisher, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make_policy", [categorical_policy, gaussian_policy])
def test_fisher_is_hessian_of_exact_mean_kl(make_policy):
    policy = make_policy()
    observations = tiny_observations(5, 3, seed=3)
    with torch.no_grad():
        old_outputs = policy(observations)
    names = [k for k, _ in policy.named_parameters()]
    shapes = [p.shape for p in policy.parameters()]
    point = torch.cat([p.detach().reshape(-1) for p in policy.parameters()])

    def kl_of(flat):
        pieces = torch.split(flat, [s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        outputs = functional_call(policy, params, (observations,))
        return policy.kl_divergence(old_outputs, outputs).mean()

    hessian = torch.func.hessian(kl_of)(point)
    fisher = policy_kl_fisher(policy, observations)
    vector = torch.randn(point.numel(), generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    torch.testing.assert_close(fisher.mv(vector), hessian @ vector)
    with torch.no_grad():
        assert float(mean_kl(policy, observations, old_outputs)) == 0.0


def test_closed_form_kl_matches_torch_distributions():
    for policy in (categorical_policy(), gaussian_policy()):
        observations = tiny_observations(4, 3, seed=5)
        with torch.no_grad():
            old = policy(observations)
            for p in policy.parameters():
                p.add_(0.1)
            new = policy(observations)
        expected = torch.distributions.kl_divergence(
            policy.distribution_from(old), policy.distribution_from(new)
        )
        torch.testing.assert_close(policy.kl_divergence(old, new), expected)


def test_policy_fisher_rejects_bad_input():
    policy = categorical_policy()
    with pytest.raises(TypeError, match="policy"):
        policy_kl_fisher(torch.nn.Linear(3, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        policy_kl_fisher(policy, torch.full((2, 3), float("nan"), dtype=DTYPE))
    with pytest.raises(ValueError, match="shape"):
        policy_kl_fisher(policy, torch.zeros(2, 5, dtype=DTYPE))
