"""Data-parallel PNMF: 2 gloo processes on loopback equal one process on the same data."""

import numpy as np
import pytest

from distributed_helpers import run_on_processes
from natgrad.models import PNMF
from natgrad.models.pnmf_distributed import DataParallelFit, fit_pnmf_data_parallel

# Short fits stop at max_iter on purpose; that ConvergenceWarning is tested in
# test_pnmf_user_traps.py.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

SPLIT = 23  # uneven shards: rows [0, 23) on rank 0, [23, 60) on rank 1
SETTINGS = {"mode": "lower-bound", "max_iter": 60, "tol": 0.0, "random_state": 5}


def counts() -> np.ndarray:
    rng = np.random.default_rng(0)
    rate = np.exp(rng.normal(size=(60, 2))) @ rng.gamma(1.0, 2.0, (9, 2)).T
    return rng.poisson(rate).astype(np.float64)


def worker(rank: int, world_size: int, settings: dict) -> DataParallelFit:
    rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    return fit_pnmf_data_parallel(counts()[rows], 2, **settings)


@pytest.fixture(scope="module", params=["multiplicative", "adam"])
def settings(request) -> dict:
    return {**SETTINGS, "loadings_update": request.param}


@pytest.fixture(scope="module")
def two_process_fits(tmp_path_factory, settings):
    # spawn, not the default fork: keeps the launcher's spawn path (fresh interpreters that exit
    # through interpreter shutdown) under test
    workdir = tmp_path_factory.mktemp("pnmf_ddp")
    return run_on_processes(worker, (settings,), workdir=workdir, start_method="spawn")


def test_two_processes_equal_one_process(two_process_fits, settings):
    single = fit_pnmf_data_parallel(counts(), 2, **settings)
    first, second = two_process_fits
    assert (first.row_offset, second.row_offset) == (0, SPLIT)
    for fit in two_process_fits:
        np.testing.assert_allclose(fit.components, single.components, rtol=1e-9)
        np.testing.assert_allclose(fit.elbo_history, single.elbo_history, rtol=1e-11)
    means = np.concatenate([first.variational_mean, second.variational_mean])
    variances = np.concatenate([first.variational_variance, second.variational_variance])
    np.testing.assert_allclose(means, single.variational_mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(variances, single.variational_variance, rtol=1e-9)


def test_one_process_equals_the_estimator(settings):
    """On the CPU, where the data-parallel fit runs (the estimator's "auto" picks CUDA)."""
    single = fit_pnmf_data_parallel(counts(), 2, **settings)
    estimator = PNMF(n_components=2, training_mode="natural", device="cpu", **settings)
    estimator.fit(counts())
    np.testing.assert_allclose(single.components, estimator.components_, rtol=1e-12)
    np.testing.assert_allclose(single.elbo_history, estimator.elbo_history_, rtol=1e-12)


def test_unknown_loadings_update_is_refused():
    with pytest.raises(ValueError, match="'sgd'"):
        fit_pnmf_data_parallel(counts(), 2, loadings_update="sgd")
