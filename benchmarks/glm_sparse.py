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
from collections.abc import Callable

import numpy as np
import torch
from scipy import sparse
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
    """``(problem, solver, fit)`` triples; ``fit()`` returns the fitted estimator."""
    dense = X.toarray()
    alpha = 1.0 / N_SAMPLES
    return [
        ("logistic", "natgrad fisher, CSR", lambda: LogisticRegression(tol=TOL).fit(X, labels)),
        (
            "logistic",
            "natgrad fisher, dense copy",
            lambda: LogisticRegression(tol=TOL).fit(dense, labels),
        ),
        (
            "logistic",
            "sklearn lbfgs, CSR",
            lambda: SklearnLogistic(tol=TOL, max_iter=10_000).fit(X, labels),
        ),
        (
            "logistic",
            "sklearn newton-cholesky, CSR",
            lambda: SklearnLogistic(solver="newton-cholesky", tol=TOL).fit(X, labels),
        ),
        ("poisson", "natgrad fisher, CSR", lambda: PoissonRegression(tol=TOL).fit(X, counts)),
        (
            "poisson",
            "natgrad fisher, dense copy",
            lambda: PoissonRegression(tol=TOL).fit(dense, counts),
        ),
        (
            "poisson",
            "sklearn lbfgs, CSR",
            lambda: PoissonRegressor(alpha=alpha, tol=TOL, max_iter=10_000).fit(X, counts),
        ),
        (
            "poisson",
            "sklearn newton-cholesky, CSR",
            lambda: PoissonRegressor(alpha=alpha, solver="newton-cholesky", tol=TOL).fit(X, counts),
        ),
    ]


def timed(fit: Callable[[], object]) -> tuple[float, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        model = fit()
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
        for index, (_, _, fit) in enumerate(entries):
            seconds, models[index] = timed(fit)
            best[index] = min(best[index], seconds)
    rows = []
    for index, (name, solver, _) in enumerate(entries):
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
