"""PNMF says when natural steps of q(F) were refused: one RefusedStepWarning per fit.

Refused steps are provoked deterministically by float32 overflow: a count of 1e25 in float32
makes the full-batch ``"lower-bound"`` natural step (no Monte-Carlo draws) non-finite for some
entries after a few iterations, while the same counts in float64 fit without refusals (the
float64 fit is the oracle that the refusals come from float32 overflow, as the message says).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from natgrad.models import PNMF, RefusedStepWarning, fit_pnmf_data_parallel

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

EXACT = {"n_components": 2, "training_mode": "natural", "mode": "lower-bound", "random_state": 0}


def overflowing_counts(dtype: type) -> np.ndarray:
    counts = np.random.default_rng(0).poisson(2.0, size=(6, 4)).astype(dtype)
    counts[0, 0] = 1e25
    return counts


def refused_step_warnings(record: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in record if issubclass(w.category, RefusedStepWarning)]


def test_refused_steps_warn_once_per_fit_naming_the_count_and_the_cause():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = PNMF(**EXACT, max_iter=5).fit(overflowing_counts(np.float32))
    refused = refused_step_warnings(record)
    assert model.n_refused_steps_ > 0
    assert len(refused) == 1
    message = str(refused[0].message)
    assert f"refused {model.n_refused_steps_} natural-gradient steps" in message
    assert "over 5 iterations" in message
    assert "not finite" in message and "float64" in message
    assert refused[0].filename == __file__  # attributed to the caller's line


def test_the_same_counts_in_float64_refuse_nothing_and_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RefusedStepWarning)
        model = PNMF(**EXACT, max_iter=5).fit(overflowing_counts(np.float64))
    assert model.n_refused_steps_ == 0
    assert np.isfinite(model.elbo_)


def test_refused_step_warning_is_a_runtime_warning_not_a_convergence_warning():
    assert issubclass(RefusedStepWarning, RuntimeWarning)
    assert not issubclass(RefusedStepWarning, ConvergenceWarning)
    with pytest.warns(RuntimeWarning, match="refused"):
        PNMF(**EXACT, max_iter=5).fit(overflowing_counts(np.float32))


@pytest.mark.parametrize(
    "params",
    [
        {"training_mode": "natural", "mode": "lower-bound"},
        {"training_mode": "natural", "mode": "expanded", "batch_size": 10},
        {"training_mode": "standard", "mode": "simple"},
    ],
)
def test_ordinary_counts_fit_and_transform_without_the_warning(params):
    rng = np.random.default_rng(1)
    X = rng.poisson(3.0, size=(20, 5)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RefusedStepWarning)
        model = PNMF(n_components=2, max_iter=20, random_state=0, **params).fit(X)
        model.transform(X)
    assert model.n_refused_steps_ == 0


def test_data_parallel_fit_in_one_process_warns_and_reports_its_refusals():
    with pytest.warns(RefusedStepWarning, match="fit_pnmf_data_parallel \\(rank 0\\)") as record:
        result = fit_pnmf_data_parallel(overflowing_counts(np.float32), 2, max_iter=5)
    assert result.n_refused > 0
    assert f"refused {result.n_refused} natural-gradient steps" in str(record[0].message)
