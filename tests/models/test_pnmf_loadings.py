"""PNMF's ``loadings_update="adam"`` option of natural training against autograd and the EM run."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.base import clone
from torch.optim.optimizer import register_optimizer_step_pre_hook

from natgrad.models import PNMF
from natgrad.models.pnmf import initial_loadings, initial_posterior
from natgrad.models.pnmf_counts import count_matrix
from natgrad.models.pnmf_elbo import elbo
from natgrad.models.pnmf_gradients import elbo_gradients
from natgrad.models.pnmf_training import FitSettings, FitState, fit_natural

CPU = torch.device("cpu")

# Short fits stop at max_iter on purpose; that ConvergenceWarning is tested in
# test_pnmf_user_traps.py.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def poisson_data(n_samples=60, n_features=12, n_components=2, seed=0):
    rng = np.random.default_rng(seed)
    loadings = rng.gamma(1.0, 2.0, (n_features, n_components))
    factors = rng.normal(0.0, 1.0, (n_samples, n_components))
    return rng.poisson(np.exp(factors) @ loadings.T).astype(np.float64)


def autograd_loadings_grad(counts, loadings, mean, variance, mode, n_draws, seed):
    """``∂ELBO/∂W`` by autograd through the differentiable ELBO, float64."""
    loadings = loadings.detach().clone().requires_grad_(True)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    value = elbo(counts, loadings, mean, variance, mode, n_draws, generator)
    return torch.autograd.grad(value, loadings)[0]


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("mode", ["simple", "expanded", "lower-bound"])
def test_loadings_gradient_matches_autograd_with_the_same_draws(mode, sparse):
    X = poisson_data(n_samples=6, n_features=5, n_components=3, seed=1)
    counts = count_matrix(sp.csr_matrix(X) if sparse else X, torch.float64, CPU)
    rng = np.random.default_rng(2)
    loadings = torch.as_tensor(rng.uniform(0.2, 2.0, (5, 3)))
    mean = torch.as_tensor(rng.normal(0.0, 0.7, (6, 3)))
    variance = torch.as_tensor(rng.uniform(0.05, 0.8, (6, 3)))
    result = elbo_gradients(
        counts, loadings, mean, variance, mode, 7, torch.Generator().manual_seed(4)
    )
    expected = autograd_loadings_grad(counts, loadings, mean, variance, mode, 7, seed=4)
    assert result.loadings_grad.shape == (5, 3)
    torch.testing.assert_close(result.loadings_grad, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch_size", [None, 4])
def test_adam_steps_use_the_scaled_elbo_gradient_in_w(batch_size):
    """Every Adam step on W gets ``−(N/B) ∂ELBO_batch/∂W`` at the batch's updated ``q(F)``.

    Lower-bound mode draws nothing, so the only use of the generator is the minibatch
    permutation, which the test reproduces. With 7 samples and ``B = 4`` the two minibatches
    have sizes 4 and 3, so the two scales ``N/B`` differ.
    """
    X = poisson_data(n_samples=7, n_features=5, n_components=2, seed=3)
    counts = count_matrix(X, torch.float64, CPU)
    setup = torch.Generator().manual_seed(0)
    loadings = initial_loadings(torch.as_tensor(X.mean(0)), 2, setup)
    state = FitState(
        loadings=loadings, posterior=initial_posterior(7, 2, setup, loadings.dtype, CPU)
    )
    settings = FitSettings(
        mode="lower-bound",
        n_draws=1,
        step_size=0.5,
        max_iter=1,
        tol=0.0,
        batch_size=batch_size,
        update_loadings=True,
        generator=torch.Generator().manual_seed(5),
        loadings_update="adam",
    )
    steps = []

    def record(optimizer, args, kwargs):
        parameter = optimizer.param_groups[0]["params"][0]
        steps.append((parameter.detach().clone(), parameter.grad.detach().clone()))

    handle = register_optimizer_step_pre_hook(record)
    try:
        state = fit_natural(counts, state, settings)
    finally:
        handle.remove()
    if batch_size is None:
        batches = [torch.arange(7)]
    else:
        batches = list(torch.randperm(7, generator=torch.Generator().manual_seed(5)).split(4))
    assert len(steps) == len(batches)
    for (before, used), rows in zip(steps, batches, strict=True):
        expected = autograd_loadings_grad(
            count_matrix(X[rows.numpy()], torch.float64, CPU),
            before,
            state.posterior.loc[rows],
            state.posterior.variance[rows],
            "lower-bound",
            1,
            seed=None,
        )
        torch.testing.assert_close(used, -(7 / len(rows)) * expected, rtol=1e-10, atol=1e-10)
    assert torch.all(state.loadings >= 1e-10)
    assert not torch.equal(state.loadings, loadings)


def test_natural_adam_improves_and_reaches_the_multiplicative_elbo():
    X = poisson_data(seed=2)
    kwargs = {"n_components": 2, "training_mode": "natural", "mode": "lower-bound"}
    multiplicative = PNMF(**kwargs, random_state=0).fit(X)
    adam = PNMF(**kwargs, loadings_update="adam", max_iter=3000, tol=0.0, random_state=0).fit(X)
    assert adam.elbo_history_[-1] > adam.elbo_history_[0]
    # Adam's fixed step 0.01 moves W slowly: 3000 iterations end within 0.1 % of the EM run
    # (measured: 9e-8 below it, 1.1e-3 below after 1000; the EM run, extrapolated, stopped at
    # its tolerance after 66).
    assert adam.elbo_ == pytest.approx(multiplicative.elbo_, rel=1e-3)


def test_natural_adam_minibatches_reach_the_full_batch_elbo():
    X = poisson_data(n_samples=120, seed=6)
    kwargs = {"n_components": 2, "training_mode": "natural", "mode": "lower-bound"}
    full = PNMF(**kwargs, random_state=0).fit(X)
    minibatch = PNMF(
        **kwargs, loadings_update="adam", batch_size=30, max_iter=200, tol=0.0, random_state=0
    ).fit(X)
    assert minibatch.elbo_history_[-1] > minibatch.elbo_history_[0]
    # Measured: 0.54 % below the full-batch EM run after 200 epochs.
    assert minibatch.elbo_ == pytest.approx(full.elbo_, rel=1e-2)


def test_same_seed_same_result_with_adam_loadings():
    X = poisson_data()
    kwargs = {"n_components": 2, "training_mode": "natural", "loadings_update": "adam"}
    fits = [PNMF(**kwargs, max_iter=20, random_state=3).fit(X) for _ in range(2)]
    np.testing.assert_array_equal(fits[0].components_, fits[1].components_)
    other = PNMF(**kwargs, max_iter=20, random_state=4).fit(X)
    assert not np.array_equal(fits[0].components_, other.components_)


def test_standard_training_ignores_loadings_update():
    X = poisson_data(n_samples=30)
    fits = [
        PNMF(n_components=2, loadings_update=update, max_iter=10, random_state=0).fit(X)
        for update in ("multiplicative", "adam")
    ]
    np.testing.assert_array_equal(fits[0].components_, fits[1].components_)


def test_loadings_update_is_a_parameter():
    model = PNMF(loadings_update="adam")
    assert model.get_params()["loadings_update"] == "adam"
    assert clone(model).loadings_update == "adam"
    assert model.set_params(loadings_update="multiplicative").loadings_update == "multiplicative"
    assert PNMF().get_params()["loadings_update"] == "multiplicative"


@pytest.mark.parametrize("training_mode", ["natural", "standard"])
@pytest.mark.parametrize("value", ["sgd", "Adam", None])
def test_invalid_loadings_update_raises(value, training_mode):
    model = PNMF(training_mode=training_mode, loadings_update=value)
    with pytest.raises(ValueError, match=f"loadings_update must be one of .* got {value!r}"):
        model.fit(np.ones((4, 3)))
