"""Fisher scoring on sparse X: natgrad on CSR vs natgrad on the dense copy vs scikit-learn.

A 50,000 × 300 CSR design with 2 % non-zeros (standard normal values), binary labels from a
logistic model and counts from a Poisson model on it; every fit minimises scikit-learn's
``Σ nll + ½‖w‖²/C`` with ``C = 1`` (Poisson: ``alpha = 1 / N``) to tolerance 1e-8. natgrad keeps
X sparse (the ``(D, D)`` Fisher by sparse products, the float64 Fisher: the float32 direction is
for dense X only); "dense" is the same estimator on ``X.toarray()``. scikit-learn's lbfgs and
newton-cholesky take the CSR matrix. Best wall time of ``--repeats`` interleaved rounds, one
thread everywhere; the largest coefficient difference is to natgrad on CSR.

    python benchmarks/glm_sparse.py [--repeats 3]

Writes ``benchmarks/results/glm_sparse.json``.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch
from scipy import sparse
from sklearn.base import BaseEstimator, clone
from sklearn.linear_model import LogisticRegression as SklearnLogistic
from sklearn.linear_model import PoissonRegressor
from threadpoolctl import threadpool_limits

from _report import environment, print_table, save_json
from natgrad.models import LogisticRegression, PoissonRegression

NAME = "glm_sparse"
N_SAMPLES, N_FEATURES, DENSITY, TOL = 50_000, 300, 0.02, 1e-8


def problem(seed: int = 0) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
    """The CSR design, binary labels and Poisson counts."""
    rng = np.random.default_rng(seed)
    X = sparse.random(
        N_SAMPLES,
        N_FEATURES,
        density=DENSITY,
        format="csr",
        random_state=rng,
        data_rvs=rng.standard_normal,
    )
    weights = rng.normal(size=N_FEATURES)
    scores = X @ weights
    labels = (rng.random(N_SAMPLES) < 1.0 / (1.0 + np.exp(-scores))).astype(int)
    counts = rng.poisson(np.exp(0.1 * scores)).astype(float)
    return X, labels, counts


def fits(X: sparse.csr_matrix, labels: np.ndarray, counts: np.ndarray) -> list[tuple]:
    """``(problem, solver, estimator, X, y)``: each fit is a fresh clone of ``estimator``."""
    dense = X.toarray()
    alpha = 1.0 / N_SAMPLES
    problems = [
        ("logistic", labels, LogisticRegression, SklearnLogistic, {}),
        ("poisson", counts, PoissonRegression, PoissonRegressor, {"alpha": alpha}),
    ]
    entries = []
    for name, y, natgrad_estimator, sklearn_estimator, options in problems:
        entries += [
            (name, "natgrad fisher, CSR", natgrad_estimator(tol=TOL), X, y),
            (name, "natgrad fisher, dense copy", natgrad_estimator(tol=TOL), dense, y),
            (
                name,
                "sklearn lbfgs, CSR",
                sklearn_estimator(tol=TOL, max_iter=10_000, **options),
                X,
                y,
            ),
            (
                name,
                "sklearn newton-cholesky, CSR",
                sklearn_estimator(solver="newton-cholesky", tol=TOL, **options),
                X,
                y,
            ),
        ]
    return entries


def timed(estimator: BaseEstimator, features, targets) -> tuple[float, BaseEstimator]:
    """Seconds to fit a fresh clone of ``estimator``, and the fitted clone."""
    model = clone(estimator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        model.fit(features, targets)
    return time.perf_counter() - start, model


def position(entries: list[tuple], name: str, solver: str) -> int:
    """Index of the ``(name, solver)`` entry."""
    return next(index for index, entry in enumerate(entries) if entry[:2] == (name, solver))


def run(repeats: int) -> list[dict]:
    """Best time over ``repeats`` interleaved rounds of every fit, with ratios to lbfgs."""
    entries = fits(*problem())
    best = [float("inf")] * len(entries)
    models: list[object] = [None] * len(entries)
    for _ in range(repeats):
        for index, (_, _, estimator, features, targets) in enumerate(entries):
            seconds, models[index] = timed(estimator, features, targets)
            best[index] = min(best[index], seconds)
    rows = []
    for index, (name, solver, *_) in enumerate(entries):
        reference = position(entries, name, "natgrad fisher, CSR")
        lbfgs = position(entries, name, "sklearn lbfgs, CSR")
        coef = np.ravel(models[index].coef_)
        rows.append(
            {
                "problem": name,
                "solver": solver,
                "n_iter": int(np.max(models[index].n_iter_)),
                "ms": 1e3 * best[index],
                "x_lbfgs": best[index] / best[lbfgs],
                "max_coef_diff": float(np.abs(coef - np.ravel(models[reference].coef_)).max()),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (best time)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with threadpool_limits(limits=1):
        rows = run(args.repeats)
    print_table(
        f"Sparse X ({N_SAMPLES} × {N_FEATURES}, density {DENSITY}), l2 C=1, tol {TOL}",
        rows,
        ["problem", "solver", "n_iter", "ms", "x_lbfgs", "max_coef_diff"],
    )
    payload = {
        "environment": environment(
            repeats=args.repeats,
            shape=[N_SAMPLES, N_FEATURES],
            density=DENSITY,
            load_average_before=load_before,
            load_average_after=os.getloadavg(),
        ),
        "rows": rows,
    }
    save_json(NAME, payload)
    return payload


if __name__ == "__main__":
    main()
