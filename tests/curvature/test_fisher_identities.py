"""Fisher = expected Hessian = GGN: exact for canonical-link GLMs, only in expectation for an MLP.

Oracle: ``torch.func.hessian`` of the mean negative log-likelihood over the flat parameters, in
float64, with the NLLs written out here (``A(f) − tᵀf`` up to constants, ``A`` the
log-partition). Those NLLs accept soft targets ``t``; they are affine in ``t``, so the Hessian
averaged over ``y ~ p(y | f)`` is the Hessian at ``t = E[y] = ∇A(f)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as functional
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, hessian

import natgrad

LIKELIHOODS = ("bernoulli", "categorical", "poisson", "gaussian")
OUTPUTS = {"bernoulli": 1, "categorical": 4, "poisson": 1, "gaussian": 2}


pytestmark = pytest.mark.usefixtures("float64_default")


def _soft_nll(likelihood: str, natural: Tensor, targets: Tensor) -> Tensor:
    """Per-sample ``A(f) − tᵀf`` (up to a constant in ``f``), shape ``(N,)``."""
    if likelihood == "categorical":
        log_partition = torch.logsumexp(natural, dim=-1)
    elif likelihood == "bernoulli":
        log_partition = functional.softplus(natural).sum(-1)
    elif likelihood == "poisson":
        log_partition = natural.exp().sum(-1)
    else:
        log_partition = 0.5 * natural.square().sum(-1)
    return log_partition - (targets * natural).sum(-1)


def _expected_targets(likelihood: str, natural: Tensor) -> Tensor:
    """``E[y] = ∇A(f)`` (one-hot mean for the categorical), shape ``(N, C)``."""
    if likelihood == "categorical":
        return torch.softmax(natural, dim=-1)
    if likelihood == "bernoulli":
        return torch.sigmoid(natural)
    if likelihood == "poisson":
        return natural.exp()
    return natural


def _sampled_targets(likelihood: str, natural: Tensor, generator: torch.Generator) -> Tensor:
    """Observed-looking targets in soft form, shape ``(N, C)``."""
    mean = _expected_targets(likelihood, natural)
    if likelihood == "categorical":
        labels = torch.multinomial(mean, 1, generator=generator).squeeze(-1)
        return functional.one_hot(labels, natural.shape[-1]).to(natural.dtype)
    if likelihood == "bernoulli":
        return torch.bernoulli(mean, generator=generator)
    if likelihood == "poisson":
        return torch.poisson(mean, generator=generator)
    return mean + torch.randn(mean.shape, generator=generator)


def _hessian_of_mean_nll(model: nn.Module, inputs: Tensor, likelihood: str, targets: Tensor):
    """``∇²_θ 1/N Σₙ nll(f(xₙ; θ), tₙ)`` over the flat parameters, shape ``(P, P)``."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def mean_nll(vector: Tensor) -> Tensor:
        pieces = torch.split(vector, [s.numel() for s in shapes])
        params = {n: piece.reshape(s) for n, piece, s in zip(names, pieces, shapes, strict=True)}
        natural = functional_call(model, params, (inputs,))
        return _soft_nll(likelihood, natural, targets).mean()

    return hessian(mean_nll)(flat)


def _setup(likelihood: str, seed: int, hidden: int | None):
    torch.manual_seed(seed)
    outputs = OUTPUTS[likelihood]
    if hidden is None:
        model = nn.Linear(3, outputs)
    else:
        model = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, outputs))
    scale = 0.4 if likelihood == "poisson" else 1.0
    inputs = scale * torch.randn(7, 3, generator=torch.Generator().manual_seed(seed + 1))
    return model, inputs


def _library_targets(likelihood: str, soft_targets: Tensor) -> Tensor:
    return soft_targets.argmax(-1) if likelihood == "categorical" else soft_targets


def _mean_loss(likelihood: str):
    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        if likelihood == "categorical":
            targets = functional.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
        return _soft_nll(likelihood, outputs, targets).mean()

    return loss


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_canonical_glm_fisher_equals_hessian_and_ggn(likelihood, seed):
    model, inputs = _setup(likelihood, seed, hidden=None)
    with torch.no_grad():
        natural = model(inputs)
    targets = _sampled_targets(likelihood, natural, torch.Generator().manual_seed(seed + 2))
    reference = _hessian_of_mean_nll(model, inputs, likelihood, targets)
    fisher = natgrad.fisher(model, inputs, likelihood=likelihood).to_dense()
    library_targets = _library_targets(likelihood, targets)
    ggn = natgrad.ggn(model, inputs, _mean_loss(likelihood), library_targets).to_dense()
    hess = natgrad.hessian(model, inputs, _mean_loss(likelihood), library_targets).to_dense()
    torch.testing.assert_close(fisher, reference, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ggn, reference, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(hess, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_mlp_fisher_equals_expected_hessian_and_ggn_but_not_hessian(likelihood):
    model, inputs = _setup(likelihood, seed=3, hidden=4)
    with torch.no_grad():
        natural = model(inputs)
    fisher = natgrad.fisher(model, inputs, likelihood=likelihood).to_dense()
    expected_hessian = _hessian_of_mean_nll(
        model, inputs, likelihood, _expected_targets(likelihood, natural)
    )
    torch.testing.assert_close(fisher, expected_hessian, rtol=1e-9, atol=1e-12)

    targets = _sampled_targets(likelihood, natural, torch.Generator().manual_seed(4))
    library_targets = _library_targets(likelihood, targets)
    ggn = natgrad.ggn(model, inputs, _mean_loss(likelihood), library_targets).to_dense()
    torch.testing.assert_close(ggn, fisher, rtol=1e-9, atol=1e-12)
    observed_hessian = _hessian_of_mean_nll(model, inputs, likelihood, targets)
    relative_gap = torch.linalg.norm(observed_hessian - fisher) / torch.linalg.norm(fisher)
    assert relative_gap > 1e-2
