"""The GLM fast paths: loss, means and variance roots from one exponential (against mpmath and
closed forms), and the float32 Gram for the Newton direction with its float64 fallback
(against the float64 path, statsmodels and the float64 Fisher)."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import statsmodels.api as sm
import torch

from natgrad.curvature.likelihoods import get_likelihood
from natgrad.models import LogisticRegression, PoissonRegression, glm_solvers
from natgrad.models.glm_objective import PenalisedGLMObjective

EXTREME_OUTPUTS = np.array(
    [-800.0, -710.0, -40.0, -36.5, -3.0, -1e-3, -1e-300, 0.0, 1e-300, 1e-3, 2.5, 37.0, 40, 800]
)


def scalar_objective(
    kind: str,
    outputs_or_n: int,
    inverse_C: float = 0.0,
    sample_weight: np.ndarray | None = None,
    column_scales: np.ndarray | None = None,
    seed: int = 0,
    n_features: int = 3,
) -> PenalisedGLMObjective:
    """A Bernoulli or Poisson objective on ``n`` random samples, features and an intercept."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(outputs_or_n, n_features))
    if column_scales is not None:
        features = features * column_scales
    design = torch.from_numpy(np.column_stack([features, np.ones(outputs_or_n)]))
    if kind == "bernoulli":
        targets = torch.from_numpy((rng.random(outputs_or_n) < 0.4).astype(float))
    else:
        targets = torch.from_numpy(rng.poisson(2.0, size=outputs_or_n).astype(float))
    weights = None if sample_weight is None else torch.from_numpy(sample_weight)
    basis = torch.ones(1, 1, dtype=torch.float64)
    return PenalisedGLMObjective(
        design, targets, get_likelihood(kind), basis, inverse_C, True, sample_weight=weights
    )


def exact_terms(kind: str, output: float, target: float) -> tuple[float, float, float]:
    """nll, mean and variance root of one sample, in 60-digit arithmetic."""
    with mpmath.workdps(60):
        f = mpmath.mpf(output)
        if kind == "bernoulli":
            mean, complement = 1 / (1 + mpmath.exp(-f)), 1 / (1 + mpmath.exp(f))
            nll = mpmath.log(1 + mpmath.exp(f)) - target * f
            root = mpmath.sqrt(mean * complement)
        else:
            mean = mpmath.exp(f)
            nll = mean - target * f + mpmath.loggamma(target + 1)
            root = mpmath.sqrt(mean)
        return float(nll), float(mean), float(root)


@pytest.mark.parametrize("kind", ["bernoulli", "poisson"])
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_means_and_roots_match_60_digit_arithmetic_at_extreme_outputs(kind, weighted):
    outputs = EXTREME_OUTPUTS if kind == "bernoulli" else EXTREME_OUTPUTS / 1.2  # exp finite
    n = len(outputs)
    rng = np.random.default_rng(3)
    sample_weight = rng.uniform(0.5, 2.0, size=n) if weighted else None
    objective = scalar_objective(kind, n, sample_weight=sample_weight)
    point = objective.point(torch.zeros(4, dtype=torch.float64), torch.from_numpy(outputs)[:, None])
    targets = objective.targets.numpy()
    exact = np.array([exact_terms(kind, f, y) for f, y in zip(outputs, targets, strict=True)])
    weights = np.full(n, 1.0 / n) if sample_weight is None else sample_weight / sample_weight.sum()
    with mpmath.workdps(60):
        terms = zip(weights, exact[:, 0], strict=True)
        exact_loss = float(mpmath.fsum(mpmath.mpf(w) * v for w, v in terms))
    # absolute error a few eps times the mean |f| (the terms max(f, 0) and y f cancel)
    scale = float(weights @ np.abs(outputs)) + abs(exact_loss) + 1.0
    if kind == "poisson":
        scale += float(weights @ exact[:, 1])
    assert abs(point.loss - exact_loss) <= 8 * np.finfo(float).eps * scale
    np.testing.assert_allclose(point.means, exact[:, 1], rtol=4e-16, atol=0)
    np.testing.assert_allclose(point.variance_roots, exact[:, 2], rtol=4e-16, atol=0)


@pytest.mark.parametrize("kind", ["bernoulli", "poisson"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("fit_intercept_value", [0.0, -0.8])
def test_intercept_only_point_equals_the_general_evaluation(kind, weighted, fit_intercept_value):
    rng = np.random.default_rng(4)
    sample_weight = rng.uniform(0.5, 2.0, size=30) if weighted else None
    objective = scalar_objective(kind, 30, inverse_C=0.5, sample_weight=sample_weight)
    params = torch.tensor([0.0, 0.0, 0.0, fit_intercept_value], dtype=torch.float64)
    shortcut = objective.point(params)
    general = objective.point(params, objective.outputs(params).detach())
    torch.testing.assert_close(shortcut.outputs, general.outputs, rtol=0, atol=0)
    assert shortcut.loss == pytest.approx(general.loss, rel=1e-14)
    np.testing.assert_allclose(shortcut.means, general.means, rtol=1e-15)
    np.testing.assert_allclose(shortcut.variance_roots, general.variance_roots, rtol=1e-15)
    torch.testing.assert_close(objective.point_fisher(shortcut), objective.fisher(params))


def test_intercept_only_shortcut_needs_a_column_of_ones():
    """A last column other than ones (fit_intercept only marks it unpenalised) is evaluated
    in full."""
    objective = scalar_objective("bernoulli", 20)
    design = objective.design.clone()
    design[:, -1] = torch.linspace(0.5, 2.0, 20, dtype=torch.float64)
    objective = PenalisedGLMObjective(
        design, objective.targets, objective.likelihood, objective.output_basis, 0.0, True
    )
    params = torch.tensor([0.0, 0.0, 0.0, 1.5], dtype=torch.float64)
    point = objective.point(params)
    torch.testing.assert_close(point.outputs, objective.outputs(params))
    mean_loss = float(objective.per_sample_nll(params).mean())
    assert point.loss == pytest.approx(mean_loss, rel=1e-14)


@pytest.mark.parametrize("kind", ["bernoulli", "poisson"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(
    "scales", [None, np.array([1e-30, 1.0, 1e30]), np.array([1e-3, 1e3]), np.ones(6)]
)
def test_low_precision_fisher_is_the_float64_fisher_to_float32_accuracy(kind, weighted, scales):
    """Entry errors relative to ``√(Fᵢᵢ Fⱼⱼ)`` stay near float32's eps at any column scale
    (columns of 1e±30 overflow or vanish in a plain float32 product) and for 3, 4 and 7 design
    columns (zero rows padded to 4 and 8 in the float32 copy)."""
    rng = np.random.default_rng(5)
    sample_weight = rng.uniform(0.5, 2.0, size=500) if weighted else None
    n_features = 3 if scales is None else len(scales)
    objective = scalar_objective(kind, 500, 2.0, sample_weight, scales, n_features=n_features)
    params = torch.from_numpy(rng.normal(scale=0.4 / np.sqrt(n_features), size=n_features + 1))
    if scales is not None:
        params[:-1] /= torch.from_numpy(scales)
    point = objective.point(params)
    matrix, column_scale = objective.low_precision_fisher(point)
    approximation = column_scale[:, None] * matrix * column_scale
    exact = objective.fisher(params).numpy()
    torch.testing.assert_close(objective.point_fisher(point).numpy(), exact)
    unit = np.sqrt(np.diag(exact))
    assert np.abs((approximation - exact) / np.outer(unit, unit)).max() <= 1e-6


def test_cholesky_factor_with_scale_solves_the_scaled_system():
    generator = torch.Generator().manual_seed(6)
    root = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    unit_part = root @ root.T + torch.eye(5, dtype=torch.float64)
    scale = torch.tensor([1e-3, 1.0, 10.0, 1e4, 0.5], dtype=torch.float64)
    fisher = scale[:, None] * unit_part * scale  # F = D A D
    lower = torch.linalg.cholesky(unit_part).numpy()
    factor = glm_solvers.CholeskyFactor(lower, (1.0 / scale).numpy())
    rhs = torch.randn(5, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(factor.solve(rhs), torch.linalg.solve(fisher, rhs))


class FactorSpy:
    """Records what :func:`glm_solvers.low_precision_factor` returned."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.results: list[bool] = []
        original = glm_solvers.low_precision_factor

        def spy(objective, point):
            factor = original(objective, point)
            self.results.append(factor is not None)
            return factor

        monkeypatch.setattr(glm_solvers, "low_precision_factor", spy)


def float64_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(glm_solvers, "MAX_LOW_PRECISION_CONDITION", 0.0)


def logistic_data(scales: np.ndarray | None, offset: float = 0.0, seed: int = 7):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(2000, 4))
    y = (rng.random(2000) < 1.0 / (1.0 + np.exp(-(X @ [0.8, -0.5, 0.3, 0.0] + 0.2)))).astype(int)
    X = X + offset
    return (X if scales is None else X * scales), y


@pytest.mark.parametrize("scales", [None, np.logspace(-2, 2, 4)])
def test_float32_direction_gives_the_float64_fit_and_statsmodels(scales, monkeypatch):
    X, y = logistic_data(scales)
    reference = sm.Logit(y, sm.add_constant(X, prepend=False)).fit(
        disp=0, method="newton", tol=1e-12, maxiter=100
    )
    with monkeypatch.context() as patch:
        spy = FactorSpy(patch)
        mixed = LogisticRegression(penalty=None).fit(X, y)
    assert spy.results and all(spy.results)  # the float32 Gram served every Fisher step
    with monkeypatch.context() as patch:
        float64_only(patch)
        exact = LogisticRegression(penalty=None).fit(X, y)
    unit = 1.0 if scales is None else scales  # compare coefficients of unit-scale columns
    np.testing.assert_allclose(mixed.coef_[0] * unit, exact.coef_[0] * unit, atol=1e-8, rtol=0)
    np.testing.assert_allclose(mixed.intercept_, exact.intercept_, atol=1e-8, rtol=0)
    np.testing.assert_allclose(mixed.coef_[0] * unit, reference.params[:4] * unit, atol=1e-6)
    np.testing.assert_allclose(mixed.coef_bse_, exact.coef_bse_, rtol=1e-10)
    assert mixed.n_iter_ == exact.n_iter_ <= 10
    assert mixed.gradient_norm_ <= 1e-8


def test_float32_direction_gives_the_float64_poisson_fit(monkeypatch):
    rng = np.random.default_rng(8)
    X = rng.normal(size=(1500, 3)) * [1e-3, 1.0, 1e3]
    y = rng.poisson(np.exp(X @ [200.0, -0.3, 2e-4] + 0.5))
    reference = sm.GLM(y, sm.add_constant(X, prepend=False), family=sm.families.Poisson()).fit(
        tol=1e-12
    )
    with monkeypatch.context() as patch:
        spy = FactorSpy(patch)
        mixed = PoissonRegression(penalty=None).fit(X, y)
    assert spy.results and all(spy.results)
    with monkeypatch.context() as patch:
        float64_only(patch)
        exact = PoissonRegression(penalty=None).fit(X, y)
    unit = np.array([1e-3, 1.0, 1e3])
    np.testing.assert_allclose(mixed.coef_ * unit, exact.coef_ * unit, atol=1e-8, rtol=0)
    np.testing.assert_allclose(mixed.coef_ * unit, reference.params[:3] * unit, atol=1e-6)
    assert mixed.n_iter_ == exact.n_iter_ <= 10


def test_nearly_collinear_columns_fall_back_to_the_float64_fisher(monkeypatch):
    """Features offset by 1e4 are nearly collinear with the intercept column: the unit-diagonal
    Fisher's condition number is about 2.5e9, far beyond float32, so the first low-precision factor
    is refused and the rest of the fit uses the float64 Fisher. Reference: statsmodels on the
    centred features (same slopes; intercept shifted by the offset times their sum)."""
    offset = 1e4
    X, y = logistic_data(None, offset=offset)
    reference = sm.Logit(y, sm.add_constant(X - offset, prepend=False)).fit(
        disp=0, method="newton", tol=1e-12, maxiter=100
    )
    slopes, centred_intercept = reference.params[:4], reference.params[4]
    with monkeypatch.context() as patch:
        spy = FactorSpy(patch)
        model = LogisticRegression(penalty=None).fit(X, y)
    assert spy.results == [False]
    np.testing.assert_allclose(model.coef_[0], slopes, atol=1e-6, rtol=0)
    centred = model.intercept_[0] + offset * model.coef_[0].sum()  # the centred fit's intercept
    assert centred == pytest.approx(centred_intercept, abs=1e-6)
    assert model.n_iter_ <= 10 and model.gradient_norm_ <= 1e-8


def test_mixed_precision_off_never_forms_a_float32_gram(monkeypatch):
    objective = scalar_objective("bernoulli", 300, inverse_C=1.0)
    spy = FactorSpy(monkeypatch)
    initial = torch.zeros(objective.n_params, dtype=torch.float64)
    exact = glm_solvers.minimise(objective, initial, "fisher", 1.0, 1e-10, 20, None, False)
    assert spy.results == []
    mixed = glm_solvers.minimise(objective, initial, "fisher", 1.0, 1e-10, 20)
    assert all(spy.results) and len(spy.results) == mixed.n_fisher
    torch.testing.assert_close(mixed.params, exact.params, rtol=0, atol=1e-10)
