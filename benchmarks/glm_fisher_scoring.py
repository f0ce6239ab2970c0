"""Fisher scoring (natgrad) vs scikit-learn and statsmodels on logistic and Poisson regression.

For each problem every solver fits the same objective (scikit-learn's ``Σ nll + ½‖w‖²/C``; no
penalty where statsmodels takes part) and the script reports, side by side: iterations (and,
for natgrad's natural-gradient solvers, the number of Fisher systems set up), the best
(minimum) wall and CPU times over ``--repeats`` fits and their ratios to natgrad's Fisher
scoring, the Euclidean norm of the gradient of the mean penalised loss at the returned solution
(computed here, in numpy, for every solver alike) and the largest coefficient difference to
natgrad's Fisher scoring. The repeats are interleaved (round ``r`` fits every solver once, in
turn), so load from other processes hits all solvers alike; a slow solver is repeated only
while it has used less than 5 s. The load average before and after is saved with the results.

natgrad computes standard errors on first access of ``coef_bse_`` (one more Fisher), not in
``fit``; the row "natgrad fisher + standard errors" times ``fit`` followed by that access.
"natgrad fisher-chord" is Fisher scoring that reuses the last Fisher's Cholesky factor while the
gradient norm falls fast (see :mod:`natgrad.models.glm_solvers`). For binary logistic and
Poisson fits natgrad's Fisher-scoring directions come from a Fisher whose data Gram is formed in
float32 wherever its condition estimate (unit diagonal) is at most 1e3, else in float64;
losses, gradients and the stopping test are float64 for every solver, and the gradient norm and
coefficient differences reported here are recomputed in float64.

Problems: synthetic logistic regression (n=10,000, d=20) without and with an l2 penalty and,
unpenalised, with its columns rescaled by 1e-2 … 1e2 (the same model in another
parameterisation: Fisher scoring is invariant to it, first-order methods are not), the
digits data as a binary (even vs odd) and a 10-class problem (standardised features, l2,
C=1), and synthetic Poisson regression (n=10,000, d=20) without penalty. All libraries run on
one thread. Writes ``benchmarks/results/glm_fisher_scoring.json`` and a bar chart of the wall
times, ``benchmarks/results/glm_fisher_scoring.png``.

    python benchmarks/glm_fisher_scoring.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import numpy as np
import sklearn
import statsmodels
import statsmodels.api as sm
import torch
from scipy.special import expit, softmax
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression as SklearnLogistic
from sklearn.linear_model import PoissonRegressor
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from natgrad.models import LogisticRegression, PoissonRegression

RESULTS = Path(__file__).parent / "results" / "glm_fisher_scoring.json"
PLOT = RESULTS.with_suffix(".png")
TOL = 1e-8
TIME_BUDGET = 5.0
"""Seconds of fitting per solver and problem after which no further repeat is timed."""


@dataclass
class Problem:
    """A dataset and the objective every solver minimises."""

    name: str
    kind: str  # "logistic" or "poisson"
    X: np.ndarray
    y: np.ndarray
    C: float  # np.inf: no penalty


@dataclass
class Fit:
    """What a solver returns: coefficients ``(R, d)``, intercepts ``(R,)``, iterations and,
    for natgrad's natural-gradient solvers, Fisher systems set up."""

    coef: np.ndarray
    intercept: np.ndarray
    n_iter: int
    n_fisher: int | None = None


@dataclass
class Row:
    problem: str
    solver: str
    n_iter: int
    n_fisher: int | None
    seconds: float
    time_ratio: float
    cpu_seconds: float
    cpu_ratio: float
    gradient_norm: float
    max_coef_diff: float


def synthetic_logistic(n_samples: int, n_features: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, n_features))
    weights = rng.normal(scale=1.0 / np.sqrt(n_features), size=n_features)
    y = (rng.random(n_samples) < expit(X @ weights + 0.3)).astype(int)
    return X, y


def synthetic_poisson(n_samples: int, n_features: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, n_features))
    weights = rng.normal(scale=0.5 / np.sqrt(n_features), size=n_features)
    return X, rng.poisson(np.exp(X @ weights + 1.0)).astype(float)


def problems() -> list[Problem]:
    X_logistic, y_logistic = synthetic_logistic(10_000, 20, seed=0)
    digits = load_digits()
    X_digits = StandardScaler().fit_transform(digits.data)
    X_poisson, y_poisson = synthetic_poisson(10_000, 20, seed=1)
    column_scales = np.logspace(-2, 2, X_logistic.shape[1])
    return [
        Problem("logistic n=10000 d=20, no penalty", "logistic", X_logistic, y_logistic, np.inf),
        Problem("logistic n=10000 d=20, l2 C=1", "logistic", X_logistic, y_logistic, 1.0),
        Problem(
            "same, columns scaled 1e-2..1e2",
            "logistic",
            X_logistic * column_scales,
            y_logistic,
            np.inf,
        ),
        Problem("digits even/odd, l2 C=1", "logistic", X_digits, digits.target % 2, 1.0),
        Problem("digits 10 classes, l2 C=1", "logistic", X_digits, digits.target, 1.0),
        Problem("poisson n=10000 d=20, no penalty", "poisson", X_poisson, y_poisson, np.inf),
    ]


def mean_gradient_norm(problem: Problem, fit: Fit) -> float:
    """Norm of the gradient of ``(Σ nll + ½‖w‖²/C) / N`` over coefficients and intercepts."""
    X, y, n_samples = problem.X, problem.y, len(problem.y)
    scores = X @ fit.coef.T + fit.intercept
    if problem.kind == "poisson":
        residual = np.exp(scores) - y[:, None]
    elif fit.coef.shape[0] == 1:
        residual = expit(scores) - y[:, None]
    else:
        residual = softmax(scores, axis=1) - np.eye(fit.coef.shape[0])[y]
    coef_gradient = residual.T @ X / n_samples + fit.coef / (problem.C * n_samples)
    return float(np.linalg.norm(np.concatenate([coef_gradient.ravel(), residual.mean(0)])))


def natgrad_solver(
    solver: str, standard_errors: bool = False, **options
) -> Callable[[Problem], Fit]:
    """natgrad's estimator with ``solver``; ``standard_errors`` also computes ``coef_bse_``."""

    def fit(problem: Problem) -> Fit:
        penalty = None if np.isinf(problem.C) else "l2"
        estimator = LogisticRegression if problem.kind == "logistic" else PoissonRegression
        model = estimator(penalty=penalty, C=problem.C, solver=solver, **options)
        model.fit(problem.X, problem.y)
        if standard_errors:
            _ = model.coef_bse_
        n_fisher = model.n_fisher_ if solver != "gd" else None
        coef, intercept = np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_)
        return Fit(coef, intercept, model.n_iter_, n_fisher)

    return fit


def sklearn_solver(solver: str) -> Callable[[Problem], Fit]:
    def fit(problem: Problem) -> Fit:
        if problem.kind == "logistic":
            model = SklearnLogistic(C=problem.C, solver=solver, tol=TOL, max_iter=10_000)
        else:
            alpha = 0.0 if np.isinf(problem.C) else 1.0 / (problem.C * len(problem.y))
            model = PoissonRegressor(alpha=alpha, solver=solver, tol=TOL, max_iter=10_000)
        model.fit(problem.X, problem.y)
        n_iter = int(np.max(model.n_iter_))
        return Fit(np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_), n_iter)

    return fit


def statsmodels_newton(problem: Problem) -> Fit:
    exog = sm.add_constant(problem.X, prepend=False)
    if problem.kind == "logistic":
        result = sm.Logit(problem.y, exog).fit(disp=0, method="newton", tol=1e-10, maxiter=100)
        n_iter = result.mle_retvals["iterations"]
    else:
        family = sm.families.Poisson()
        result = sm.GLM(problem.y, exog, family=family).fit(tol=1e-10, maxiter=100)
        n_iter = result.fit_history["iteration"]
    return Fit(result.params[None, :-1], result.params[-1:], int(n_iter))


def solvers_for(problem: Problem) -> dict[str, Callable[[Problem], Fit]]:
    solvers = {
        "natgrad fisher": natgrad_solver("fisher", tol=TOL),
        "natgrad fisher + standard errors": natgrad_solver("fisher", standard_errors=True, tol=TOL),
        "natgrad fisher-chord": natgrad_solver("fisher-chord", tol=TOL),
        "natgrad ngd lr=0.5": natgrad_solver("ngd", learning_rate=0.5, tol=TOL),
        "natgrad gd (max 1000 it)": natgrad_solver("gd", tol=TOL, max_iter=1000),
        "sklearn lbfgs": sklearn_solver("lbfgs"),
        "sklearn newton-cholesky": sklearn_solver("newton-cholesky"),
    }
    if np.isinf(problem.C):
        solvers["statsmodels newton"] = statsmodels_newton
    return solvers


def timed_fit(solver: Callable[[Problem], Fit], problem: Problem) -> tuple[Fit, float, float]:
    """One fit, its wall time and its CPU time (this process) in seconds."""
    start, cpu_start = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = solver(problem)
    return fit, time.perf_counter() - start, time.process_time() - cpu_start


def interleaved_best_times(
    solvers: dict[str, Callable[[Problem], Fit]], problem: Problem, repeats: int
) -> dict[str, tuple[Fit, float, float]]:
    """Each solver's last fit and best wall and CPU times over ``repeats`` interleaved rounds.

    Round ``r`` fits every solver once, in turn; a solver sits out the remaining rounds once
    its fits have taken ``TIME_BUDGET`` seconds. Every fit runs on one thread, so its CPU time
    is its wall time less the time other processes held the core.
    """
    fits: dict[str, Fit] = {}
    seconds: dict[str, list[float]] = {name: [] for name in solvers}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in solvers}
    for _ in range(repeats):
        for name, solver in solvers.items():
            if sum(seconds[name]) < TIME_BUDGET:
                fits[name], elapsed, cpu_elapsed = timed_fit(solver, problem)
                seconds[name].append(elapsed)
                cpu_seconds[name].append(cpu_elapsed)
    return {name: (fits[name], min(seconds[name]), min(cpu_seconds[name])) for name in solvers}


def run(repeats: int) -> list[Row]:
    rows = []
    for problem in problems():
        results = interleaved_best_times(solvers_for(problem), problem, repeats)
        reference, reference_seconds, reference_cpu = results["natgrad fisher"]
        for name, (fit, seconds, cpu_seconds) in results.items():
            coef_diff = float(np.max(np.abs(fit.coef - reference.coef)))
            rows.append(
                Row(
                    problem.name,
                    name,
                    fit.n_iter,
                    fit.n_fisher,
                    seconds,
                    seconds / reference_seconds,
                    cpu_seconds,
                    cpu_seconds / reference_cpu,
                    mean_gradient_norm(problem, fit),
                    coef_diff,
                )
            )
            print_row(rows[-1])
    return rows


def print_row(row: Row) -> None:
    n_fisher = "" if row.n_fisher is None else str(row.n_fisher)
    print(
        f"{row.problem:36s} {row.solver:34s} {row.n_iter:6d} {n_fisher:>7s} "
        f"{row.seconds * 1e3:10.1f} {row.time_ratio:8.2f} {row.cpu_seconds * 1e3:9.1f} "
        f"{row.cpu_ratio:8.2f} {row.gradient_norm:12.2e} "
        f"{row.max_coef_diff:12.2e}",
        flush=True,
    )


def plot(rows: list[Row]) -> None:
    """Grouped bars of wall time (log scale), one group per problem, one bar per solver."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problem_names = list(dict.fromkeys(row.problem for row in rows))
    solver_names = list(dict.fromkeys(row.solver for row in rows))
    width = 0.8 / len(solver_names)
    figure, axes = plt.subplots(figsize=(11, 4.5))
    for index, solver in enumerate(solver_names):
        positions, seconds = [], []
        for group, problem in enumerate(problem_names):
            for row in rows:
                if row.problem == problem and row.solver == solver:
                    positions.append(group + index * width)
                    seconds.append(row.seconds)
        axes.bar(positions, seconds, width=width, label=solver)
    axes.set_xticks(np.arange(len(problem_names)) + 0.4 - width / 2)
    axes.set_xticklabels(problem_names, rotation=12, fontsize=8)
    axes.set_yscale("log")
    axes.set_ylabel("wall time per fit (s, best of repeats)")
    axes.set_title("GLM fits: natgrad Fisher scoring vs scikit-learn and statsmodels (1 thread)")
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(PLOT, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed fits per solver (best)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"{'problem':36s} {'solver':34s} {'iters':>6s} {'fishers':>7s} {'time ms':>10s} "
        f"{'ratio':>8s} {'cpu ms':>9s} {'ratio':>8s} {'|grad| mean':>12s} {'max|Δcoef|':>12s}"
    )
    load_before = os.getloadavg()
    with threadpool_limits(limits=1):
        rows = run(args.repeats)
    load_after = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    environment = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "statsmodels": statsmodels.__version__,
        "machine": platform.machine(),
        "threads": 1,
        "repeats": args.repeats,
        "tol": TOL,
        "load_average_1_5_15_min_before": load_before,
        "load_average_1_5_15_min_after": load_after,
        "cpu_count": os.cpu_count(),
    }
    payload = {"environment": environment, "rows": [asdict(row) for row in rows]}
    RESULTS.write_text(json.dumps(payload, indent=2))
    plot(rows)
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    print(f"wrote {RESULTS} and {PLOT}")


if __name__ == "__main__":
    main()
