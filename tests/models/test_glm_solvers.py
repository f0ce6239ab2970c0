"""The GLM solvers' linear algebra: CG Fisher solves for the softmax, fallbacks, line search,
chord steps."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.special import softmax

from natgrad.curvature.likelihoods import get_likelihood
from natgrad.linalg import CGInfo, damped_solve
from natgrad.models import LogisticRegression, glm_solvers
from natgrad.models.glm_objective import GLMPoint, PenalisedGLMObjective, sum_to_zero_basis


def softmax_objective(inverse_C: float, seed: int = 0) -> PenalisedGLMObjective:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(120, 3)) * np.array([1.0, 3.0, 0.2])
    design = torch.from_numpy(np.column_stack([features, np.ones(120)]))
    probs = softmax(features @ rng.normal(scale=0.5, size=(3, 4)), axis=1)
    labels = torch.as_tensor([rng.choice(4, p=row) for row in probs])
    likelihood = get_likelihood("categorical")
    return PenalisedGLMObjective(design, labels, likelihood, sum_to_zero_basis(4), inverse_C, True)


def refuse_cg(*args, **kwargs):
    """A CG stand-in that never converges, so the dense fallback must be taken."""
    return torch.full_like(args[1], float("nan")), CGInfo(0, float("inf"), False)


@pytest.mark.parametrize("inverse_C", [0.0, 1.0])
@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_softmax_direction_meets_the_cg_forcing_residual(inverse_C, scale):
    objective = softmax_objective(inverse_C)
    generator = torch.Generator().manual_seed(2)
    params = 0.3 * torch.randn(objective.n_params, generator=generator, dtype=torch.float64)
    point = objective.point(params)
    gradient = scale * objective.gradient(point)
    direction = glm_solvers.natural_direction(objective, point, gradient)
    residual = torch.linalg.vector_norm(objective.fisher(params) @ direction - gradient)
    norm = float(torch.linalg.vector_norm(gradient))
    assert float(residual) <= min(glm_solvers.CG_FORCING, math.sqrt(norm)) * norm * (1 + 1e-8)
    exact = torch.linalg.solve(objective.fisher(params), gradient)
    relative = torch.linalg.vector_norm(direction - exact) / torch.linalg.vector_norm(exact)
    assert float(relative) < 0.5


def test_unconverged_cg_falls_back_to_the_dense_solve(monkeypatch):
    objective = softmax_objective(1.0)
    point = objective.point(torch.zeros(objective.n_params, dtype=torch.float64))
    gradient = objective.gradient(point)
    monkeypatch.setattr(glm_solvers, "cg", refuse_cg)
    direction = glm_solvers.natural_direction(objective, point, gradient)
    torch.testing.assert_close(
        direction, torch.linalg.solve(objective.fisher(point.params), gradient)
    )


class FixedFisherObjective:
    """Stands in for a scalar-likelihood objective whose Fisher is ``fisher`` everywhere."""

    n_columns = 1

    def __init__(self, fisher: torch.Tensor) -> None:
        self._fisher = fisher

    def point_fisher(self, point):
        return self._fisher


def test_singular_fisher_has_no_factor_and_is_clamped_like_damped_solve():
    vectors = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    singular = vectors.T @ vectors  # rank 2 of 3
    rhs = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    assert glm_solvers.cholesky_factor(singular) is None
    point = GLMPoint(torch.zeros(3, dtype=torch.float64), torch.zeros(1, 1), 0.0)
    objective = FixedFisherObjective(singular)
    direction, factor = glm_solvers.natural_direction_and_factor(objective, point, rhs)
    assert factor is None
    assert bool(torch.isfinite(direction).all())
    torch.testing.assert_close(direction, damped_solve(singular, rhs))


def test_cholesky_factor_solves_like_torch():
    generator = torch.Generator().manual_seed(4)
    root = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    fisher = root @ root.T + 0.1 * torch.eye(6, dtype=torch.float64)
    rhs = torch.randn(6, generator=generator, dtype=torch.float64)
    factor = glm_solvers.cholesky_factor(fisher)
    torch.testing.assert_close(torch.from_numpy(factor.lower), torch.linalg.cholesky(fisher))
    torch.testing.assert_close(factor.solve(rhs), torch.linalg.solve(fisher, rhs))


def bernoulli_objective(inverse_C: float, seed: int = 5) -> PenalisedGLMObjective:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(400, 3))
    design = torch.from_numpy(np.column_stack([features, np.ones(400)]))
    probs = 1.0 / (1.0 + np.exp(-(features @ np.array([1.0, -0.5, 0.3]) + 0.2)))
    labels = torch.from_numpy((rng.random(400) < probs).astype(float))
    basis = torch.ones(1, 1, dtype=torch.float64)
    return PenalisedGLMObjective(
        design, labels, get_likelihood("bernoulli"), basis, inverse_C, True
    )


@pytest.mark.parametrize("inverse_C", [0.0, 1.0])
def test_chord_steps_reuse_the_factor_and_reach_the_fisher_optimum(inverse_C):
    objective = bernoulli_objective(inverse_C)
    initial = torch.zeros(objective.n_params, dtype=torch.float64)
    fisher = glm_solvers.minimise(objective, initial, "fisher", 1.0, 1e-10, 50)
    chord = glm_solvers.minimise(objective, initial, "fisher-chord", 1.0, 1e-10, 50)
    assert fisher.status == chord.status == "converged"
    assert fisher.n_fisher == fisher.n_iter
    assert chord.n_fisher < chord.n_iter
    # the optimum: a zero gradient, recomputed here in closed form (numpy)
    design, labels = objective.design.numpy(), objective.targets.numpy()
    residual = 1.0 / (1.0 + np.exp(-design @ chord.params.numpy())) - labels
    gradient = design.T @ residual / len(labels) + objective.penalty_diagonal.numpy() * (
        chord.params.numpy()
    )
    assert np.linalg.norm(gradient) <= 1e-10
    torch.testing.assert_close(chord.params, fisher.params, rtol=0, atol=1e-9)


def test_a_chord_step_without_decrease_is_retried_with_a_fresh_fisher(monkeypatch):
    """Refusing every chord step must leave exactly the Fisher-scoring iterates."""
    objective = bernoulli_objective(0.0)
    initial = torch.zeros(objective.n_params, dtype=torch.float64)
    fresh_directions = []
    factorise = glm_solvers.natural_direction_and_factor
    line_search = glm_solvers.backtrack

    def recording_factorise(*args, **kwargs):
        direction, factor = factorise(*args, **kwargs)
        fresh_directions.append(direction)
        return direction, factor

    refused = []

    def refusing_chords(objective, point, gradient, direction, first_step):
        if not any(direction is fresh for fresh in fresh_directions):
            refused.append(direction)
            return None
        return line_search(objective, point, gradient, direction, first_step)

    reference = glm_solvers.minimise(objective, initial, "fisher", 1.0, 1e-10, 50)
    monkeypatch.setattr(glm_solvers, "natural_direction_and_factor", recording_factorise)
    monkeypatch.setattr(glm_solvers, "backtrack", refusing_chords)
    chord = glm_solvers.minimise(objective, initial, "fisher-chord", 1.0, 1e-10, 50)
    assert chord.status == "converged" and len(refused) > 0
    assert chord.n_iter == chord.n_fisher == reference.n_iter
    torch.testing.assert_close(chord.params, reference.params, rtol=0, atol=0)


@pytest.mark.parametrize("inverse_C", [0.0, 1.0])
def test_line_search_outputs_stay_those_of_the_parameters(inverse_C):
    """Trial outputs are updated as ``f − t X̃ d Bᵀ``; they must not drift from ``X̃ Θ Bᵀ``."""
    objective = softmax_objective(inverse_C)
    initial = torch.zeros(objective.n_params, dtype=torch.float64)
    result = glm_solvers.minimise(objective, initial, "ngd", 0.5, 1e-10, 200)
    assert result.status == "converged"
    torch.testing.assert_close(result.outputs, objective.outputs(result.params), rtol=0, atol=1e-12)


@pytest.mark.parametrize("C", [np.inf, 1.0, 0.05])
def test_cg_and_dense_fisher_scoring_reach_the_same_multinomial_fit(C, monkeypatch):
    objective = softmax_objective(0.0, seed=3)
    X, y = objective.design[:, :-1].numpy(), objective.targets.numpy()
    penalty = None if np.isinf(C) else "l2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_cg = LogisticRegression(penalty=penalty, C=C, tol=1e-10).fit(X, y)
        monkeypatch.setattr(glm_solvers, "cg", refuse_cg)
        dense = LogisticRegression(penalty=penalty, C=C, tol=1e-10).fit(X, y)
    np.testing.assert_allclose(with_cg.coef_, dense.coef_, rtol=0, atol=1e-8)
    np.testing.assert_allclose(with_cg.intercept_, dense.intercept_, rtol=0, atol=1e-8)
    np.testing.assert_allclose(with_cg.covariance_, dense.covariance_, rtol=1e-7, atol=0)
    assert with_cg.n_iter_ <= dense.n_iter_ + 2
