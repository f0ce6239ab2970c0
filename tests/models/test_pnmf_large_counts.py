"""The PNMF ELBO of float32 parameters with counts of up to 1e10.

Near the optimum the ELBO's terms ``Σ y log rate``, ``Σ rate`` and ``Σ log y!`` are each about
``Σ y log y`` while their sum is about ``−½ Σ log(2π y)``: float32 sums of them lost every digit
from counts of about 1e6 (relative error 0.2 at 1e6, 1e3 at 1e10). The reference is a float64
NumPy evaluation of the same float32 parameters, with the same draws, in deviance form
``Σ [y log(a/y) − (b − y)] + Σ [y log y − y − log y!]``, whose terms do not cancel. The ELBO
must agree with it to float64 round-off of terms of size ``y log y``: within
``16 ε₆₄ Σ y (|log y| + 1)`` (the errors measured were at most 1.4 times
``ε₆₄ Σ y (|log y| + 1)``; the float32 sums' were 4e8 to 7e8 times it).
"""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import gammaln

from natgrad.models import PNMF
from natgrad.models.pnmf_counts import count_matrix
from natgrad.models.pnmf_elbo import ELBO_MODES, elbo

CPU = torch.device("cpu")
DRAWS = 20


def problem(log10_scale: float, seed: int, near_optimum: bool, shape=(20, 12, 3)):
    """Poisson counts of about ``10**log10_scale`` and float32 parameters, at the posterior
    that generated them (``near_optimum``) or at a generic point."""
    n_samples, n_features, n_components = shape
    rng = np.random.default_rng(seed)
    loadings = rng.gamma(1.0, 1.0, (n_features, n_components)) * 10**log10_scale / n_components
    factors = 0.5 * rng.standard_normal((n_samples, n_components))
    counts = rng.poisson(np.exp(factors) @ loadings.T).astype(np.float32)
    if near_optimum:
        mean, variance = factors, 1.0 / (1.0 + np.exp(factors) * loadings.sum(0))
    else:
        mean = 0.1 * rng.standard_normal((n_samples, n_components))
        variance = np.full((n_samples, n_components), 0.1)
    as32 = (torch.as_tensor(a, dtype=torch.float32) for a in (loadings, mean, variance))
    return counts, *as32


def reference_elbo(counts, loadings, mean, variance, mode: str, noise: np.ndarray) -> float:
    """float64 ELBO in deviance form (``noise`` of shape ``(S, N, L)``, unused by the bound)."""
    y = counts.astype(np.float64)
    loadings, mean, variance = (t.double().numpy() for t in (loadings, mean, variance))
    positive = y > 0
    safe = np.where(positive, y, 1.0)
    saturated = np.where(positive, y * np.log(safe), 0.0) - y - gammaln(y + 1.0)

    def log_ratio(rates):  # y log(rate / y), 0 where y = 0
        return y * np.log1p(np.where(positive, (rates - y) / safe, 0.0))

    expected_rate = np.exp(mean + variance / 2) @ loadings.T
    if mode == "lower-bound":
        likelihood = log_ratio(np.exp(mean) @ loadings.T) - (expected_rate - y)
    else:
        rates = np.exp(mean + np.sqrt(variance) * noise) @ loadings.T
        log_term = np.mean([log_ratio(r) for r in rates], axis=0)
        rate = rates.mean(0) if mode == "simple" else expected_rate
        likelihood = log_term - (rate - y)
    kl = 0.5 * (variance + mean**2 - 1.0 - np.log(variance)).sum()
    return float(likelihood.sum() + saturated.sum() - kl)


def round_off(counts: np.ndarray) -> float:
    """``16 ε₆₄ Σ y (|log y| + 1)``: float64 round-off of sums of terms of size ``y log y``."""
    y = counts.astype(np.float64)
    magnitude = y * (np.abs(np.log(np.where(y > 0, y, 1.0))) + 1.0)
    return 16 * np.finfo(np.float64).eps * float(magnitude.sum())


def float32_elbo(counts, loadings, mean, variance, mode: str, sparse: bool, seed: int) -> float:
    matrix = count_matrix(sp.csr_matrix(counts) if sparse else counts, torch.float32, CPU)
    generator = torch.Generator().manual_seed(seed)
    return float(elbo(matrix, loadings, mean, variance, mode, DRAWS, generator))


def same_noise(shape, seed: int) -> np.ndarray:
    """The draws ``ε`` that :func:`elbo` makes for float32 parameters with this seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((DRAWS, *shape), generator=generator, dtype=torch.float32).double().numpy()


@settings(max_examples=40, deadline=None)
@given(
    log10_scale=st.floats(2.0, 10.0),
    seed=st.integers(0, 2**16),
    near_optimum=st.booleans(),
    mode=st.sampled_from(ELBO_MODES),
    sparse=st.booleans(),
)
def test_float32_elbo_matches_a_float64_reference(log10_scale, seed, near_optimum, mode, sparse):
    counts, loadings, mean, variance = problem(log10_scale, seed, near_optimum)
    value = float32_elbo(counts, loadings, mean, variance, mode, sparse, seed)
    expected = reference_elbo(counts, loadings, mean, variance, mode, same_noise(mean.shape, seed))
    assert abs(value - expected) <= round_off(counts), (value, expected)


@pytest.mark.parametrize("log10_scale", [2, 6, 8, 10])
def test_log_factorial_of_float32_counts_is_summed_in_float64(log10_scale):
    counts, *_ = problem(log10_scale, seed=1, near_optimum=True)
    expected = gammaln(counts.astype(np.float64) + 1.0).sum()
    for stored in (counts, sp.csr_matrix(counts)):
        matrix = count_matrix(stored, torch.float32, CPU)
        assert matrix.log_factorial.dtype == torch.float64
        assert float(matrix.log_factorial) == pytest.approx(expected, rel=1e-13)
        assert float(matrix.take_rows(torch.arange(3)).log_factorial) == pytest.approx(
            gammaln(counts[:3].astype(np.float64) + 1.0).sum(), rel=1e-13
        )


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_fitted_float32_elbo_is_that_of_the_fitted_parameters():
    counts, *_ = problem(8.0, seed=2, near_optimum=True, shape=(30, 10, 2))
    model = PNMF(2, training_mode="natural", mode="lower-bound", max_iter=20, random_state=0)
    model.fit(counts)
    fitted = (
        torch.as_tensor(model.components_.T),
        torch.as_tensor(model.variational_mean_),
        torch.as_tensor(model.variational_variance_),
    )
    assert all(t.dtype == torch.float32 for t in fitted)
    expected = reference_elbo(counts, *fitted, "lower-bound", noise=np.empty(0))
    assert abs(model.elbo_ - expected) <= round_off(counts), (model.elbo_, expected)
