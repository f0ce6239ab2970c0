"""Likelihoods: ∇²A, its square root, sampling and the NLL against independent oracles."""

import pytest
import torch
from brute_force import DTYPE, LIKELIHOOD_NAMES, log_partition
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import distributions
from torch.func import grad, hessian, vmap

from natgrad.curvature import get_likelihood
from natgrad.curvature.likelihoods import Likelihood

SAMPLE_DRAWS = 20_000


def natural_parameters(seed: int, samples: int = 4, outputs: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(samples, outputs, generator=generator, dtype=DTYPE)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(LIKELIHOOD_NAMES))
def test_natural_hessian_is_the_hessian_of_the_log_partition(seed: int, name: str) -> None:
    outputs = natural_parameters(seed)
    expected = vmap(hessian(lambda f: log_partition(name, f)))(outputs)
    likelihood = get_likelihood(name)
    torch.testing.assert_close(likelihood.natural_hessian(outputs), expected)
    root = likelihood.natural_hessian_sqrt(outputs)
    assert root.shape == (4, 3, 3)
    torch.testing.assert_close(root @ root.transpose(-1, -2), expected)


@pytest.mark.parametrize("name", LIKELIHOOD_NAMES)
def test_sample_mean_is_the_gradient_of_the_log_partition(name: str) -> None:
    outputs = natural_parameters(0, samples=2) * 0.5
    mean = vmap(grad(lambda f: log_partition(name, f)))(outputs)
    likelihood = get_likelihood(name)
    generator = torch.Generator().manual_seed(0)
    draws = likelihood.sample(outputs.repeat(SAMPLE_DRAWS, 1), generator)
    if name == "categorical":
        draws = torch.nn.functional.one_hot(draws, 3).to(DTYPE)
    draws = draws.reshape(SAMPLE_DRAWS, *outputs.shape)
    variance = torch.diagonal(likelihood.natural_hessian(outputs), dim1=-2, dim2=-1)
    standard_error = (variance / SAMPLE_DRAWS).sqrt()
    assert ((draws.mean(0) - mean).abs() < 5 * standard_error).all()


def test_categorical_sample_frequencies_match_scipy_chisquare() -> None:
    from scipy.stats import chisquare

    logits = torch.tensor([[0.3, -1.2, float("-inf"), 2.0, 0.0]], dtype=torch.float32)
    probs = torch.softmax(logits.double(), dim=-1)[0]
    generator = torch.Generator().manual_seed(3)
    draws = get_likelihood("categorical").sample(logits.repeat(SAMPLE_DRAWS, 1), generator)
    counts = torch.bincount(draws, minlength=5).double()
    assert counts[2] == 0  # a class of probability zero is never drawn
    support = probs > 0
    expected = (probs[support] * SAMPLE_DRAWS).numpy()
    assert (
        chisquare(counts[support].numpy(), expected * (SAMPLE_DRAWS / expected.sum())).pvalue > 1e-3
    )
    same = get_likelihood("categorical").sample(logits, torch.Generator().manual_seed(5))
    again = get_likelihood("categorical").sample(logits, torch.Generator().manual_seed(5))
    assert torch.equal(same, again)


def torch_distribution(name: str, outputs: torch.Tensor) -> distributions.Distribution:
    if name == "categorical":
        return distributions.Categorical(logits=outputs)
    if name == "gaussian":
        return distributions.Independent(distributions.Normal(outputs, 1.0), 1)
    if name == "bernoulli":
        return distributions.Independent(distributions.Bernoulli(logits=outputs), 1)
    return distributions.Independent(distributions.Poisson(outputs.exp()), 1)


@pytest.mark.parametrize("name", LIKELIHOOD_NAMES)
def test_nll_is_minus_the_torch_log_prob(name: str) -> None:
    outputs = natural_parameters(1)
    likelihood = get_likelihood(name)
    targets = likelihood.sample(outputs, torch.Generator().manual_seed(2))
    expected = -torch_distribution(name, outputs).log_prob(targets)
    torch.testing.assert_close(likelihood.nll(outputs, targets), expected)


def test_get_likelihood_accepts_instances_and_rejects_unknown_names() -> None:
    likelihood = get_likelihood("poisson")
    assert isinstance(likelihood, Likelihood)
    assert get_likelihood(likelihood) is likelihood
    with pytest.raises(ValueError, match="unknown likelihood 'student'"):
        get_likelihood("student")


def test_scalar_outputs_are_read_as_one_column() -> None:
    outputs = torch.tensor([0.0, 1.0], dtype=DTYPE)
    likelihood = get_likelihood("bernoulli")
    assert likelihood.natural_hessian(outputs).shape == (2, 1, 1)
    with pytest.raises(ValueError, match="do not match"):
        likelihood.nll(outputs, torch.zeros(3, dtype=DTYPE))


@pytest.mark.parametrize("name", LIKELIHOOD_NAMES)
def test_nll_gradient_matches_autograd_of_the_nll(name: str) -> None:
    """The closed-form ``∇A(f) − T(y)`` against autograd of ``nll`` and the base-class default."""
    likelihood = get_likelihood(name)
    generator = torch.Generator().manual_seed(5)
    outputs = torch.randn(7, 3, generator=generator, dtype=DTYPE)
    targets = likelihood.sample(outputs, generator)
    leaf = outputs.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(likelihood.nll(leaf, targets).sum(), leaf)
    torch.testing.assert_close(likelihood.nll_gradient(outputs, targets), expected)
    torch.testing.assert_close(Likelihood.nll_gradient(likelihood, outputs, targets), expected)


@pytest.mark.parametrize("name", LIKELIHOOD_NAMES)
def test_nll_gradient_is_zero_in_expectation(name: str) -> None:
    """``E_y[∇A(f) − T(y)] = 0``: the mean of the closed form over many sampled targets."""
    likelihood = get_likelihood(name)
    generator = torch.Generator().manual_seed(6)
    outputs = 0.5 * torch.randn(1, 3, generator=generator, dtype=DTYPE).expand(20_000, 3)
    targets = likelihood.sample(outputs, generator)
    mean_gradient = likelihood.nll_gradient(outputs, targets).mean(0)
    torch.testing.assert_close(mean_gradient, torch.zeros(3, dtype=DTYPE), atol=0.05, rtol=0)


def test_categorical_nll_gradient_rejects_misshaped_targets() -> None:
    likelihood = get_likelihood("categorical")
    with pytest.raises(ValueError, match="targets must have shape"):
        likelihood.nll_gradient(torch.zeros(4, 3), torch.zeros(4, 3))


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    name=st.sampled_from(LIKELIHOOD_NAMES),
    leading=st.sampled_from([(), (2,), (2, 3)]),
)
def test_natural_hessian_product_is_the_hessian_times_the_tangent(
    seed: int, name: str, leading: tuple[int, ...]
) -> None:
    outputs = natural_parameters(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    tangents = torch.randn(*leading, *outputs.shape, generator=generator, dtype=DTYPE)
    hessians = vmap(hessian(lambda f: log_partition(name, f)))(outputs)
    expected = torch.einsum("ncd,...nd->...nc", hessians, tangents)
    product = get_likelihood(name).natural_hessian_product(outputs, tangents)
    assert product.shape == tangents.shape
    torch.testing.assert_close(product, expected)


@pytest.mark.parametrize("name", ["gaussian", "bernoulli", "poisson"])
def test_natural_hessian_product_of_scalar_outputs(name: str) -> None:
    outputs = torch.tensor([0.3, -1.2, 2.0], dtype=DTYPE)
    tangents = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]], dtype=DTYPE)
    hessians = get_likelihood(name).natural_hessian(outputs)[:, 0, 0]
    product = get_likelihood(name).natural_hessian_product(outputs, tangents)
    torch.testing.assert_close(product, hessians * tangents)
