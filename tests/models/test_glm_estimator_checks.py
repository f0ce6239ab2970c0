"""scikit-learn's estimator checks for the GLM estimators (all of them apply and pass)."""

from __future__ import annotations

from sklearn.utils.estimator_checks import parametrize_with_checks

from natgrad.models import LogisticRegression, PoissonRegression


@parametrize_with_checks(
    [LogisticRegression(), PoissonRegression(), LogisticRegression(penalty="l2", solver="ngd")]
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
