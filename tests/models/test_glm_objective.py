"""The GLM objective's gradient and Fisher against brute-force torch.func oracles in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import gammaln
from torch.func import grad, hessian, jacrev

from natgrad.curvature.likelihoods import get_likelihood
from natgrad.models.glm_objective import (
    PenalisedGLMObjective,
    mean_log_factorial,
    sum_to_zero_basis,
)

N_SAMPLES, N_FEATURES = 13, 3


def make_objective(kind: str, inverse_C: float, fit_intercept: bool) -> PenalisedGLMObjective:
    generator = torch.Generator().manual_seed(0)
    design = torch.randn(N_SAMPLES, N_FEATURES, generator=generator, dtype=torch.float64)
    if fit_intercept:
        design = torch.cat([design, torch.ones(N_SAMPLES, 1, dtype=torch.float64)], dim=1)
    if kind == "bernoulli":
        targets = torch.randint(0, 2, (N_SAMPLES,), generator=generator).double()
        basis = torch.ones(1, 1, dtype=torch.float64)
    elif kind == "categorical":
        targets = torch.randint(0, 4, (N_SAMPLES,), generator=generator)
        basis = sum_to_zero_basis(4)
    else:
        targets = torch.randint(0, 6, (N_SAMPLES,), generator=generator).double()
        basis = torch.ones(1, 1, dtype=torch.float64)
    likelihood = get_likelihood(kind)
    return PenalisedGLMObjective(design, targets, likelihood, basis, inverse_C, fit_intercept)


def random_params(objective: PenalisedGLMObjective) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return 0.5 * torch.randn(objective.n_params, generator=generator, dtype=torch.float64)


CASES = [
    (kind, inverse_C, fit_intercept)
    for kind in ("bernoulli", "categorical", "poisson")
    for inverse_C in (0.0, 2.0)
    for fit_intercept in (True, False)
]


def test_sum_to_zero_basis_is_orthonormal_and_centred():
    basis = sum_to_zero_basis(5)
    assert basis.shape == (5, 4)
    torch.testing.assert_close(basis.T @ basis, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(basis.sum(0), torch.zeros(4, dtype=torch.float64))


def test_sum_to_zero_basis_rejects_one_class():
    with pytest.raises(ValueError, match="n_classes"):
        sum_to_zero_basis(1)


@pytest.mark.parametrize(("kind", "inverse_C", "fit_intercept"), CASES)
def test_fisher_equals_mean_jacobian_sandwich_plus_penalty(kind, inverse_C, fit_intercept):
    objective = make_objective(kind, inverse_C, fit_intercept)
    params = random_params(objective)
    outputs = objective.outputs(params)
    jacobian = jacrev(objective.outputs)(params)  # (N, C, D·P)
    output_fisher = objective.likelihood.natural_hessian(outputs)
    data_fisher = torch.einsum("nca,ncd,ndb->ab", jacobian, output_fisher, jacobian) / N_SAMPLES
    penalty_hessian = hessian(objective.penalty)(params)
    torch.testing.assert_close(objective.fisher(params), data_fisher + penalty_hessian)


@pytest.mark.parametrize(("kind", "inverse_C", "fit_intercept"), CASES)
def test_fisher_equals_hessian_for_canonical_link(kind, inverse_C, fit_intercept):
    objective = make_objective(kind, inverse_C, fit_intercept)
    params = random_params(objective)

    def mean_loss(point):
        return objective.per_sample_nll(point).mean() + objective.penalty(point)

    torch.testing.assert_close(objective.fisher(params), hessian(mean_loss)(params))


@pytest.mark.parametrize(("kind", "inverse_C", "fit_intercept"), CASES)
def test_fisher_and_loss_at_equal_outputs_match_autograd(kind, inverse_C, fit_intercept):
    """At ``Θ = 0`` (and an intercept-only ``Θ``) every output is equal: the shortcut paths."""
    objective = make_objective(kind, inverse_C, fit_intercept)

    def mean_loss(point):
        return objective.per_sample_nll(point).mean() + objective.penalty(point)

    intercept_only = torch.zeros(objective.n_params, dtype=torch.float64)
    if fit_intercept:
        intercept_only[-objective.n_columns :] = 0.7
    for params in (torch.zeros(objective.n_params, dtype=torch.float64), intercept_only):
        point = objective.point(params)
        torch.testing.assert_close(point.outputs, objective.outputs(params))
        assert point.loss == pytest.approx(float(mean_loss(params)), rel=1e-14)
        torch.testing.assert_close(objective.fisher(params), hessian(mean_loss)(params))


@pytest.mark.parametrize(("kind", "inverse_C", "fit_intercept"), CASES)
def test_gradient_matches_closed_form(kind, inverse_C, fit_intercept):
    objective = make_objective(kind, inverse_C, fit_intercept)
    params = random_params(objective)
    outputs = objective.outputs(params)
    if kind == "categorical":
        residual = torch.softmax(outputs, 1) - torch.nn.functional.one_hot(objective.targets, 4)
    elif kind == "bernoulli":
        residual = torch.sigmoid(outputs) - objective.targets[:, None]
    else:
        residual = outputs.exp() - objective.targets[:, None]
    weight_gradient = objective.design.T @ residual / N_SAMPLES  # (D, C)
    expected = (weight_gradient @ objective.output_basis).reshape(-1)
    penalised_rows = torch.ones(objective.n_rows, dtype=torch.float64)
    if fit_intercept:
        penalised_rows[-1] = 0.0
    mask = penalised_rows.repeat_interleave(objective.n_columns)
    expected = expected + inverse_C / N_SAMPLES * mask * params
    loss, gradient = objective.loss_and_gradient(params)
    torch.testing.assert_close(gradient, expected)
    expected_loss = objective.likelihood.nll(outputs, objective.targets).mean()
    expected_loss += 0.5 * inverse_C / N_SAMPLES * (mask * params.square()).sum()
    assert loss == pytest.approx(float(expected_loss), rel=1e-14)


@pytest.mark.parametrize(
    "counts",
    [
        [float(k % 9) for k in range(30)],  # small integers: the table
        [1.0, 1.0, 3.0],
        [0.0, 0.0],
        [0.0, 1.0, 2.0, 7.0, 3.0],  # larger than the number of counts: lgamma
        [2.5, 1.0, 0.5],
        [1e6, 2.0],
    ],
)
def test_mean_log_factorial_equals_lgamma(counts):
    values = np.asarray(counts)
    expected = float(np.mean(gammaln(values + 1.0)))
    assert mean_log_factorial(values) == pytest.approx(expected, rel=1e-13, abs=1e-15)


def test_loss_is_inf_not_nan_on_overflow():
    objective = make_objective("poisson", 0.0, True)
    params = torch.full((objective.n_params,), 1e3, dtype=torch.float64)
    assert objective.loss_and_gradient(params)[0] == float("inf")


@pytest.mark.parametrize(("kind", "inverse_C", "fit_intercept"), CASES)
def test_closed_form_gradient_matches_autograd(kind, inverse_C, fit_intercept):
    objective = make_objective(kind, inverse_C, fit_intercept)
    params = random_params(objective)

    def mean_loss(point: torch.Tensor) -> torch.Tensor:
        return objective.per_sample_nll(point).mean() + objective.penalty(point)

    torch.testing.assert_close(objective.loss_and_gradient(params)[1], grad(mean_loss)(params))


@pytest.mark.parametrize(("kind", "inverse_C", "fit_intercept"), CASES)
def test_point_and_fisher_from_given_outputs_match_fresh_evaluation(kind, inverse_C, fit_intercept):
    objective = make_objective(kind, inverse_C, fit_intercept)
    params = random_params(objective)
    outputs = objective.outputs(params)
    point = objective.point(params)
    torch.testing.assert_close(point.outputs, outputs)
    torch.testing.assert_close(objective.outputs_no_grad(params), outputs)
    assert point.loss == pytest.approx(objective.loss_and_gradient(params)[0], rel=1e-14)
    torch.testing.assert_close(objective.fisher(params, outputs), objective.fisher(params))


@pytest.mark.parametrize("inverse_C", [0.0, 2.0])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_softmax_fisher_product_matches_dense_fisher(inverse_C, fit_intercept):
    objective = make_objective("categorical", inverse_C, fit_intercept)
    params = random_params(objective)
    vectors = torch.randn(objective.n_params, 5, dtype=torch.float64)
    product = objective.fisher_product(objective.outputs(params))
    products = torch.stack([product(vector) for vector in vectors.T], dim=1)
    torch.testing.assert_close(products, objective.fisher(params) @ vectors)


def test_kronecker_preconditioner_is_the_exact_inverse_when_all_samples_share_one_fisher():
    """At ``Θ = 0`` every softmax is uniform, so without an intercept ``M = F`` exactly."""
    objective = make_objective("categorical", 2.0, False)
    params = torch.zeros(objective.n_params, dtype=torch.float64)
    fisher = objective.fisher(params)
    apply = objective.kronecker_preconditioner(objective.outputs(params))
    vectors = torch.randn(objective.n_params, 4, dtype=torch.float64)
    applied = torch.stack([apply(vector) for vector in (fisher @ vectors).T], dim=1)
    torch.testing.assert_close(applied, vectors)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_kronecker_preconditioner_is_symmetric_positive_definite(fit_intercept):
    objective = make_objective("categorical", 0.0, fit_intercept)
    apply = objective.kronecker_preconditioner(objective.outputs(random_params(objective)))
    matrix = torch.stack([apply(column) for column in torch.eye(objective.n_params).double()])
    torch.testing.assert_close(matrix, matrix.T)
    assert float(torch.linalg.eigvalsh(matrix).min()) > 0.0
