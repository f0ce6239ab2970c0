"""Likelihoods at extreme natural parameters and on outputs they cannot describe.

The oracle is ``∇²A`` in closed form evaluated with 60-digit ``mpmath`` arithmetic, so it does
not share the float cancellations the likelihoods must avoid.
"""

import mpmath
import pytest
import torch

from natgrad.curvature import get_likelihood

EXTREME_LOGITS = [[50.0, 0.0, -3.0], [-50.0, -50.0, 50.0], [40.0, 40.0, -50.0], [0.0, 1.0, 2.0]]


def categorical_hessian_oracle(logits: list[list[float]]) -> torch.Tensor:
    """``diag(p) − p pᵀ`` per row, in 60-digit arithmetic."""
    with mpmath.workdps(60):
        matrices = []
        for row in logits:
            weights = [mpmath.exp(mpmath.mpf(value)) for value in row]
            probs = [weight / mpmath.fsum(weights) for weight in weights]
            matrices.append(
                [
                    [float(p * (int(i == j) - q)) for j, q in enumerate(probs)]
                    for i, p in enumerate(probs)
                ]
            )
    return torch.tensor(matrices, dtype=torch.float64)


def bernoulli_variance_oracle(logits: list[list[float]]) -> torch.Tensor:
    """``σ(f) (1 − σ(f))`` entrywise, in 60-digit arithmetic."""
    with mpmath.workdps(60):
        values = [
            [float(mpmath.exp(f) / (1 + mpmath.exp(f)) ** 2) for f in map(mpmath.mpf, row)]
            for row in logits
        ]
    return torch.tensor(values, dtype=torch.float64)


def assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Entrywise relative error below ``rtol`` (zero only where the oracle is zero)."""
    error = (actual - expected).abs()
    assert bool((error <= rtol * expected.abs()).all()), (actual, expected)


def test_categorical_hessian_keeps_relative_accuracy_at_extreme_logits() -> None:
    logits = torch.tensor(EXTREME_LOGITS, dtype=torch.float64)
    expected = categorical_hessian_oracle(EXTREME_LOGITS)
    likelihood = get_likelihood("categorical")
    assert_relatively_close(likelihood.natural_hessian(logits), expected, 1e-12)
    root = likelihood.natural_hessian_sqrt(logits)
    assert_relatively_close(root @ root.mT, expected, 1e-12)
    tangents = torch.randn(2, *logits.shape, generator=torch.Generator().manual_seed(0))
    products = likelihood.natural_hessian_product(logits, tangents.double())
    torch.testing.assert_close(
        products, (expected @ tangents.double().unsqueeze(-1)).squeeze(-1), rtol=1e-12, atol=0
    )


def test_categorical_hessian_is_psd_at_extreme_logits() -> None:
    logits = torch.tensor(EXTREME_LOGITS, dtype=torch.float32)
    hessians = get_likelihood("categorical").natural_hessian(logits).double()
    assert bool((torch.linalg.eigvalsh(hessians) >= -1e-30).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_hessian_keeps_relative_accuracy_at_extreme_logits(dtype) -> None:
    logits = torch.tensor(EXTREME_LOGITS, dtype=dtype)
    expected = bernoulli_variance_oracle(EXTREME_LOGITS)
    likelihood = get_likelihood("bernoulli")
    rtol = 10 * torch.finfo(dtype).eps
    diagonal = likelihood.natural_hessian(logits).diagonal(dim1=-2, dim2=-1)
    assert_relatively_close(diagonal.double(), expected, rtol)
    root = likelihood.natural_hessian_sqrt(logits).diagonal(dim1=-2, dim2=-1)
    assert_relatively_close(root.double().square(), expected, 3 * rtol)
    products = likelihood.natural_hessian_product(logits, torch.ones_like(logits))
    assert_relatively_close(products.double(), expected, rtol)


@pytest.mark.parametrize("outputs", [torch.zeros(4), torch.zeros(4, 1)])
def test_categorical_refuses_a_single_class(outputs) -> None:
    likelihood = get_likelihood("categorical")
    with pytest.raises(ValueError, match=r"C >= 2 logits.*\(4,( 1)?\).*bernoulli"):
        likelihood.natural_hessian_sqrt(outputs)
    with pytest.raises(ValueError, match="C >= 2 logits"):
        likelihood.sample(outputs)


@pytest.mark.parametrize(
    ("name", "bad", "what"),
    [
        ("categorical", float("nan"), "class probabilities"),
        ("categorical", float("inf"), "class probabilities"),
        ("gaussian", float("nan"), "means"),
        ("bernoulli", float("nan"), "probabilities"),
        ("poisson", 100.0, "rates"),
    ],
)
def test_sampling_from_non_finite_parameters_raises(name, bad, what) -> None:
    outputs = torch.zeros(3, 2)
    outputs[1, 0] = bad
    with pytest.raises(ValueError, match=f"{name} likelihood: cannot sample.*{what}"):
        get_likelihood(name).sample(outputs, torch.Generator().manual_seed(0))


def test_categorical_sampling_still_accepts_minus_infinity_logits() -> None:
    logits = torch.tensor([[float("-inf"), 0.0, float("-inf")]]).repeat(50, 1)
    draws = get_likelihood("categorical").sample(logits, torch.Generator().manual_seed(0))
    assert bool((draws == 1).all())


def test_categorical_never_draws_a_zero_probability_class_when_rounding_leaves_a_gap(
    monkeypatch,
) -> None:
    logits = torch.randn(5, generator=torch.Generator().manual_seed(0))
    logits = torch.cat([logits, torch.tensor([float("-inf")])]).repeat(3, 1)
    assert torch.softmax(logits, dim=-1).cumsum(dim=-1)[0, -1] < 1  # float32 rounding gap

    def largest_uniform(size, generator=None, **options) -> torch.Tensor:
        return torch.zeros(size, **options)  # the sampler draws u = 1 - rand

    monkeypatch.setattr(torch, "rand", largest_uniform)
    draws = get_likelihood("categorical").sample(logits)
    assert bool((draws == 4).all())  # the last class of positive probability
