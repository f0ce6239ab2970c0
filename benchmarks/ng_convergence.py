"""Experiment 5: convergence of GD, Adam and natural gradient descent (each Fisher structure).

Two full-batch problems, every method started from the same point, in the same process:

- **logistic regression, seed 001's example done properly.** The seed draws ``X`` uniform in
  ``[0, 1]²`` (n = 100) with labels ``y = [x₁ + x₂ > 1]`` and fits ``σ(θᵀx)`` without an
  intercept. With an intercept (as it should have one) the data are linearly separable and the
  maximum-likelihood estimate does not exist (the loss decreases forever as ‖θ‖ → ∞), so we
  add an l2 penalty: ``L(θ) = mean BCE + ½ λ‖θ‖²`` with ``λ = 1e-2`` on weights and intercept.
  The penalty's curvature is ``λI``, so NGD uses damping ``λ``; at ``lr = 1`` with the dense
  Fisher this is exactly Fisher scoring (Newton) on the penalised objective. Target:
  ``L − L* ≤ 1e-8`` with ``L*`` from SciPy's L-BFGS at ``gtol = 1e-12``; float64.
- **digits MLP** 64-16-10 (tanh, 1,210 parameters) on 256 digits, categorical likelihood,
  float32. NGD uses Levenberg–Marquardt adaptive damping starting at 1e-2. Target:
  training loss ≤ 0.05.

GD and Adam take the best learning rate of a grid (fewest iterations to the target). NGD runs
``natgrad.optim.NaturalGradient`` with ``structure`` dense, diag, block, kfac, ekfac, implicit,
at ``lr = 1`` or, where that does not reach the target, the first of 0.3 and 0.1 that does.
Reported: iterations and wall time to the target, and their ratios to GD (best lr).
Writes ``benchmarks/results/ng_convergence.{json,png}``.

    python benchmarks/ng_convergence.py
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import torch
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from torch import Tensor, nn

from _report import environment, print_table, save_figure, save_json
from natgrad.optim import NaturalGradient

STRUCTURES = ("dense", "diag", "block", "kfac", "ekfac", "implicit")
NGD_LEARNING_RATES = (1.0, 0.3, 0.1)
PENALTY = 1e-2
SEED = 0


@dataclass
class Problem:
    """A full-batch training problem and the budgets of each family of methods."""

    name: str
    make_model: Callable[[], nn.Module]
    inputs: Tensor
    targets: Tensor
    likelihood: str
    loss: Callable[[nn.Module], Tensor]
    target_loss: float
    criterion: str
    ngd_options: dict
    gd_grid: tuple[float, ...]
    adam_grid: tuple[float, ...]
    first_order_max_iter: int
    ngd_max_iter: int


@dataclass
class Run:
    losses: list[float]
    seconds: list[float]  # cumulative wall time after each step
    target_loss: float

    @property
    def iterations(self) -> int | None:
        for iteration, loss in enumerate(self.losses):
            if loss <= self.target_loss:
                return iteration
        return None

    @property
    def time_to_target(self) -> float | None:
        iterations = self.iterations
        return None if iterations is None else self.seconds[iterations]


def seed_logistic_problem() -> Problem:
    generator = torch.Generator().manual_seed(SEED)
    inputs = torch.rand(100, 2, generator=generator, dtype=torch.float64)
    labels = (inputs.sum(1) > 1).to(torch.float64).unsqueeze(-1)

    def make_model() -> nn.Module:
        model = nn.Linear(2, 1).to(torch.float64)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        return model

    def loss(model: nn.Module) -> Tensor:
        data_loss = nn.functional.binary_cross_entropy_with_logits(model(inputs), labels)
        penalty = sum(p.square().sum() for p in model.parameters())
        return data_loss + 0.5 * PENALTY * penalty

    optimum = penalised_logistic_optimum(inputs.numpy(), labels.numpy().ravel())
    return Problem(
        name="seed 001 logistic (n=100, l2 λ=1e-2)",
        make_model=make_model,
        inputs=inputs,
        targets=labels,
        likelihood="bernoulli",
        loss=loss,
        target_loss=optimum + 1e-8,
        criterion="L − L* ≤ 1e-8",
        ngd_options={"damping": PENALTY},
        gd_grid=(0.5, 1.0, 2.0, 4.0, 8.0),
        adam_grid=(0.01, 0.03, 0.1, 0.3, 1.0),
        first_order_max_iter=20_000,
        ngd_max_iter=500,
    )


def penalised_logistic_optimum(inputs: np.ndarray, labels: np.ndarray) -> float:
    """``min_θ mean BCE + ½ λ‖θ‖²`` by SciPy L-BFGS (independent of torch)."""
    design = np.hstack([inputs, np.ones((len(inputs), 1))])

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        logits = design @ theta
        loss = np.mean(np.logaddexp(0.0, logits) - labels * logits)
        residual = 1.0 / (1.0 + np.exp(-logits)) - labels
        gradient = design.T @ residual / len(labels) + PENALTY * theta
        return loss + 0.5 * PENALTY * theta @ theta, gradient

    result = scipy.optimize.minimize(
        objective, np.zeros(3), jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 0}
    )
    return float(result.fun)


def digits_mlp_problem() -> Problem:
    digits = load_digits()
    inputs = torch.tensor(digits.data[:256] / 16.0, dtype=torch.float32)
    labels = torch.tensor(digits.target[:256])

    def make_model() -> nn.Module:
        torch.manual_seed(SEED)
        return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))

    def loss(model: nn.Module) -> Tensor:
        return nn.functional.cross_entropy(model(inputs), labels)

    return Problem(
        name="digits MLP 64-16-10 (n=256)",
        make_model=make_model,
        inputs=inputs,
        targets=labels,
        likelihood="categorical",
        loss=loss,
        target_loss=0.05,
        criterion="loss ≤ 0.05",
        ngd_options={"damping": 1e-2, "adaptive_damping": True},
        gd_grid=(0.1, 0.3, 1.0, 3.0),
        adam_grid=(0.003, 0.01, 0.03, 0.1),
        first_order_max_iter=5_000,
        ngd_max_iter=100,
    )


def train(problem: Problem, make_optimizer: Callable, max_iter: int) -> Run:
    """Full-batch steps until the target loss or ``max_iter``; losses before each step."""
    model = problem.make_model()
    optimizer = make_optimizer(model)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = problem.loss(model)
        loss.backward()
        return loss

    losses, seconds = [], []
    start = time.perf_counter()
    for _ in range(max_iter):
        loss = float(optimizer.step(closure).detach())
        losses.append(loss)
        seconds.append(time.perf_counter() - start)
        if loss <= problem.target_loss or not math.isfinite(loss):
            return Run(losses, seconds, problem.target_loss)
    with torch.no_grad():
        losses.append(float(problem.loss(model)))
    seconds.append(time.perf_counter() - start)
    return Run(losses, seconds, problem.target_loss)


def best_of_grid(problem: Problem, optimizer_class: type, grid: tuple[float, ...]):
    """The grid learning rate reaching the target in fewest iterations (else lowest loss).

    The chosen learning rate is run once more for the timing, after the whole grid has run.
    """

    def run_at(lr: float) -> Run:
        make = lambda model: optimizer_class(model.parameters(), lr=lr)  # noqa: E731
        return train(problem, make, problem.first_order_max_iter)

    runs = {lr: run_at(lr) for lr in grid}

    def badness(lr: float) -> tuple[float, float]:
        run = runs[lr]
        final = run.losses[-1] if math.isfinite(run.losses[-1]) else math.inf
        return (run.iterations if run.iterations is not None else math.inf, final)

    best = min(grid, key=badness)
    return best, run_at(best)


def first_successful_ngd(problem: Problem, structure: str) -> tuple[float, Run]:
    """NGD at ``lr`` 1, then 0.3, then 0.1: the first that reaches the target (else the last).

    Each configuration first takes two untimed steps on a throwaway model, so one-off costs
    (``torch.func`` warm-up) are not charged to the timed run.
    """
    for lr in NGD_LEARNING_RATES:

        def make(model: nn.Module, lr: float = lr) -> NaturalGradient:
            options = {**problem.ngd_options, "lr": lr}
            return NaturalGradient(model, problem.likelihood, structure=structure, **options)

        train(problem, make, 2)
        run = train(problem, make, problem.ngd_max_iter)
        if run.iterations is not None:
            break
    return lr, run


def run_problem(problem: Problem) -> tuple[list[dict], dict[str, Run]]:
    runs: dict[str, tuple[float, Run]] = {}
    runs["GD"] = best_of_grid(problem, torch.optim.SGD, problem.gd_grid)
    runs["Adam"] = best_of_grid(problem, torch.optim.Adam, problem.adam_grid)
    for structure in STRUCTURES:
        runs[f"NGD {structure}"] = first_successful_ngd(problem, structure)
    baseline = runs["GD"][1]
    rows = []
    for name, (lr, run) in runs.items():
        rows.append(
            {
                "problem": problem.name,
                "method": name,
                "lr": lr,
                "iterations": _or_dash(run.iterations, f">{len(run.losses) - 1}"),
                "seconds": _or_dash(run.time_to_target, f">{run.seconds[-1]:.3g}"),
                "iter. ratio to GD": _ratio(run.iterations, baseline.iterations),
                "time ratio to GD": _ratio(run.time_to_target, baseline.time_to_target),
                "final loss": run.losses[-1],
            }
        )
    return rows, {name: run for name, (_, run) in runs.items()}


def _or_dash(value: float | None, fallback: str) -> float | str:
    return fallback if value is None else value


def _ratio(value: float | None, reference: float | None) -> float | str:
    if value is None or reference is None or reference == 0:
        return "-"
    return value / reference


def plot(curves: dict[str, dict[str, Run]], optimum: float) -> Figure:
    figure = Figure(figsize=(11, 4))
    for axis, (name, runs) in zip(figure.subplots(1, 2), curves.items(), strict=True):
        floor = optimum if name.startswith("seed") else 0.0
        for method, run in runs.items():
            excess = [max(loss - floor, 1e-12) for loss in run.losses]
            axis.loglog(np.array(run.seconds) * 1e3, excess, label=method)
        axis.axhline(runs["GD"].target_loss - floor, color="k", linestyle=":")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("wall time [ms]")
        axis.set_ylabel("loss − L*" if floor else "training loss")
        axis.legend(fontsize=7)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    torch.set_num_threads(1)
    rows, curves = [], {}
    logistic = seed_logistic_problem()
    for problem in (logistic, digits_mlp_problem()):
        problem_rows, curves[problem.name] = run_problem(problem)
        rows.extend(problem_rows)
    columns = [
        "problem",
        "method",
        "lr",
        "iterations",
        "seconds",
        "iter. ratio to GD",
        "time ratio to GD",
        "final loss",
    ]
    print_table("Iterations and wall time to the target (one thread)", rows, columns)
    optimum = logistic.target_loss - 1e-8
    settings = {"penalty": PENALTY, "logistic_optimum": optimum, "seed": SEED}
    payload = {
        "environment": environment(**settings),
        "rows": rows,
        "curves": {
            problem: {method: {"losses": run.losses, "seconds": run.seconds}
                      for method, run in runs.items()}
            for problem, runs in curves.items()
        },
    }  # fmt: skip
    save_json("ng_convergence", payload)
    save_figure(plot(curves, optimum), "ng_convergence")


if __name__ == "__main__":
    main()
