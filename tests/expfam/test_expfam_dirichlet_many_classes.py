"""Dirichlet over many classes: solves with its diagonal-plus-rank-one Fisher stay ``O(K)``.

A dense ``K × K`` Fisher per Newton step made ``from_mean`` take minutes at ``K = 10⁴``; the
oracles are the known concentration and a dense NumPy solve with SciPy's trigamma.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import torch

from natgrad.expfam import Dirichlet, mean_parameter_gradient

CLASSES = 2000


def dense_fisher(concentration: np.ndarray) -> np.ndarray:
    """``diag(ψ′(α)) − ψ′(α₀) 11ᵀ`` with SciPy's trigamma."""
    trigamma = scipy.special.polygamma(1, concentration)
    return np.diag(trigamma) - scipy.special.polygamma(1, concentration.sum())


def test_many_classes_never_form_the_dense_fisher(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(0)
    concentration = 0.05 + 5.0 * torch.rand(CLASSES, generator=generator, dtype=torch.float64)
    weights = torch.randn(CLASSES, generator=generator, dtype=torch.float64)
    mean = Dirichlet(concentration).mean_params

    def dense_is_refused(cls, *theta):
        raise AssertionError(f"dense {CLASSES}×{CLASSES} Fisher formed")

    monkeypatch.setattr(Dirichlet, "_fisher_from_natural", classmethod(dense_is_refused))
    recovered = Dirichlet.from_mean(*mean).concentration
    torch.testing.assert_close(recovered, concentration, rtol=1e-10, atol=0)
    natural = (concentration - 1.0,)
    (gradient,) = mean_parameter_gradient(lambda theta: (theta * weights).sum(), Dirichlet, natural)
    expected = np.linalg.solve(dense_fisher(concentration.numpy()), weights.numpy())
    # F is ill-conditioned (α₀ ≈ 5000): both solves carry ~1e-10 relative error.
    scale = np.abs(expected).max()
    np.testing.assert_allclose(gradient.numpy(), expected, rtol=1e-7, atol=1e-9 * scale)


def test_singular_structured_solve_is_nan_and_the_newton_step_falls_back() -> None:
    """At ``α = 10¹⁷`` the Sherman–Morrison denominator rounds to zero: NaN, never garbage."""
    concentration = torch.tensor([[1e17, 1e17], [1.0, 2.0]], dtype=torch.float64)
    theta = (concentration - 1.0,)
    rhs = torch.tensor([[1.0, -0.5], [1.0, -0.5]], dtype=torch.float64)
    solution = Dirichlet._fisher_solve(theta, rhs)
    assert solution[0].isnan().all()
    expected = np.linalg.solve(dense_fisher(concentration[1].numpy()), rhs[1].numpy())
    # torch.polygamma(1, x) is accurate to ~5e-10 relative for x in [1, 10] (SciPy to 1e-16).
    np.testing.assert_allclose(solution[1].numpy(), expected, rtol=1e-8)
    with pytest.raises(RuntimeError, match="Fisher F\\(θ\\) is singular"):
        mean_parameter_gradient(lambda t: (t * rhs[0]).sum(), Dirichlet, (theta[0][0],))
