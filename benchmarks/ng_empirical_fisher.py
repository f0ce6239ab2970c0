"""Experiment 3: the empirical Fisher is not the Fisher (Kunstner et al., 2019).

The empirical Fisher ``F̂ = 1/N Σₙ ∇ℓₙ ∇ℓₙᵀ`` uses the observed targets in place of samples from
the model. On the two simple problems of Kunstner, Hennig & Balles (2019, "Limitations of the
empirical Fisher approximation for natural gradient descent"):

- linear regression ``y = 2x + 1 + 0.5 ε`` (unit-variance Gaussian likelihood, parameters
  slope and bias): the Fisher ``F = 1/N Σ x̃x̃ᵀ`` is the Hessian, so NGD with ``lr = 1`` lands on
  the optimum in one step; ``F̂ = 1/N Σ rₙ² x̃x̃ᵀ`` weights points by their squared residual, so
  its direction is distorted far from the optimum and near it ``F̂ ≈ 0.5² F`` (the noise
  variance), so the step is four times too long;
- logistic regression in 2-D with an intercept, labels from a noisy linear rule (well-specified:
  near the optimum ``F̂ ≈ F``) and from a noisy cubic rule (misspecified: ``F̂ ≠ F`` even there).

Each problem is run from the same start by NGD with the exact Fisher (``lr = 1``), NGD with the
empirical Fisher (``lr = 1`` and the best ``lr`` of a grid) and gradient descent (best ``lr`` of
the grid), all with ``natgrad.optim.NaturalGradient`` / ``torch.optim.SGD`` and damping 1e-8.
Reported: iterations to ``loss − loss* ≤ 1e-8`` and the angle between the empirical-Fisher
(and GD) direction and the exact natural-gradient direction at the start and along the run.
The plot shows the three direction fields of the linear regression and the loss curves.
Writes ``benchmarks/results/ng_empirical_fisher.{json,png}``.

    python benchmarks/ng_empirical_fisher.py
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

import natgrad
from _report import environment, print_table, save_figure, save_json
from natgrad.optim import NaturalGradient

DAMPING = 1e-8
MAX_ITER = 200
TOLERANCE = 1e-8
LR_GRID = tuple(2.0**k for k in range(-4, 3))
SEED = 0


@dataclass
class Problem:
    """A one-layer model with start point, data, likelihood and mean loss."""

    name: str
    inputs: Tensor
    targets: Tensor
    likelihood: str
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    start: Tensor  # (weight..., bias)

    def model(self, parameters: Tensor | None = None) -> nn.Linear:
        values = self.start if parameters is None else parameters
        model = nn.Linear(self.inputs.shape[1], 1)
        with torch.no_grad():
            model.weight.copy_(values[:-1].reshape(1, -1))
            model.bias.copy_(values[-1:])
        return model

    def loss(self, model: nn.Module) -> Tensor:
        return self.loss_fn(model(self.inputs), self.targets)


def linear_regression() -> Problem:
    generator = torch.Generator().manual_seed(SEED)
    inputs = 2.0 + torch.randn(100, 1, generator=generator)
    targets = 2.0 * inputs + 1.0 + 0.5 * torch.randn(100, 1, generator=generator)

    def half_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * (outputs - targets).square().mean()

    start = torch.tensor([-2.0, -3.0])
    return Problem("linear regression", inputs, targets, "gaussian", half_squared_error, start)


def logistic_regression(misspecified: bool) -> Problem:
    """Labels from a noisy linear rule, or (``misspecified``) from a noisy cubic one."""
    generator = torch.Generator().manual_seed(SEED + 1)
    inputs = torch.randn(100, 2, generator=generator)
    if misspecified:
        logits = 4.0 * inputs[:, 0] ** 3 - 2.0 * inputs[:, 1] + 1.0
    else:
        logits = inputs @ torch.tensor([2.0, -1.0]) + 0.5
    labels = torch.bernoulli(torch.sigmoid(logits), generator=generator).unsqueeze(-1)
    name = "logistic, misspecified (cubic truth)" if misspecified else "logistic, well-specified"
    start = torch.tensor([-1.0, 1.0, 0.0])
    return Problem(name, inputs, labels, "bernoulli", nn.BCEWithLogitsLoss(), start)


def angle_degrees(first: Tensor, second: Tensor) -> float:
    cosine = torch.dot(first, second) / (first.norm() * second.norm())
    return math.degrees(math.acos(float(cosine.clamp(-1.0, 1.0))))


def direction(problem: Problem, parameters: Tensor, kind: str) -> Tensor:
    """``(F + λI)⁻¹ ∇L`` (``kind`` "exact"/"empirical") or ``∇L`` (``kind`` "gd"), flat."""
    model = problem.model(parameters)
    loss = problem.loss(model)
    gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, model.parameters())])
    if kind == "gd":
        return gradient
    curvature = natgrad.fisher(
        model, problem.inputs, likelihood=problem.likelihood, kind=kind, targets=problem.targets
    )
    return curvature.solve(gradient, damping=DAMPING)


def flat_parameters(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run_method(problem: Problem, method: str, lr: float) -> list[float]:
    """Losses ``L(θ_t)`` for ``t = 0..MAX_ITER`` (stops early on a non-finite loss)."""
    model = problem.model()
    if method == "GD":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        kind = "exact" if method == "NGD exact F" else "empirical"
        optimizer = NaturalGradient(model, problem.likelihood, lr=lr, kind=kind, damping=DAMPING)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = problem.loss(model)
        loss.backward()
        return loss

    losses = []
    for _ in range(MAX_ITER):
        if method == "GD":
            loss = float(optimizer.step(closure).detach())
        else:
            loss = float(optimizer.step(closure, targets=problem.targets).detach())
        losses.append(loss)
        if not math.isfinite(loss) or loss > 1e6:
            return losses
    losses.append(float(problem.loss(model).detach()))
    return losses


def iterations_to_target(losses: list[float], optimum: float) -> int | None:
    for iteration, loss in enumerate(losses):
        if loss - optimum <= TOLERANCE:
            return iteration
    return None


def best_learning_rate(problem: Problem, method: str, optimum: float) -> tuple[float, list[float]]:
    """The grid ``lr`` reaching the target first (else the lowest final loss) and its losses."""
    runs = {lr: run_method(problem, method, lr) for lr in LR_GRID}

    def badness(lr: float) -> tuple[float, float]:
        reached = iterations_to_target(runs[lr], optimum)
        final = runs[lr][-1] if math.isfinite(runs[lr][-1]) else math.inf
        return (reached if reached is not None else math.inf, final)

    best = min(LR_GRID, key=badness)
    return best, runs[best]


def path_angles(problem: Problem, lr: float) -> list[float]:
    """Angles (degrees) between the EF and exact NGD directions, first 30 EF steps."""
    parameters, angles = problem.start.clone(), []
    for _ in range(30):
        empirical = direction(problem, parameters, "empirical")
        exact = direction(problem, parameters, "exact")
        if exact.norm() < 1e-10:
            break
        angles.append(angle_degrees(empirical, exact))
        parameters = parameters - lr * empirical
    return angles


def run_problem(problem: Problem) -> tuple[list[dict], dict[str, list[float]]]:
    exact_losses = run_method(problem, "NGD exact F", 1.0)
    optimum = min(exact_losses)
    runs = {"NGD exact F (lr=1)": (1.0, exact_losses)}
    runs["NGD empirical F (lr=1)"] = (1.0, run_method(problem, "NGD empirical F", 1.0))
    runs["NGD empirical F (best lr)"] = best_learning_rate(problem, "NGD empirical F", optimum)
    runs["GD (best lr)"] = best_learning_rate(problem, "GD", optimum)
    exact_start = direction(problem, problem.start, "exact")
    rows = []
    for name, (lr, losses) in runs.items():
        kind = "gd" if name.startswith("GD") else ("exact" if "exact" in name else "empirical")
        along = path_angles(problem, lr) if kind == "empirical" else []
        reached = iterations_to_target(losses, optimum)
        rows.append(
            {
                "problem": problem.name,
                "method": name,
                "lr": lr,
                "iterations": reached if reached is not None else f">{MAX_ITER}",
                "final excess loss": losses[-1] - optimum,
                "angle to NGD at start (deg)": angle_degrees(
                    direction(problem, problem.start, kind), exact_start
                ),
                "median angle, first 30 steps (deg)": float(np.median(along)) if along else "-",
            }
        )
    return rows, {name: [loss - optimum for loss in losses] for name, (_, losses) in runs.items()}


def direction_field(problem: Problem, axis, kind: str, title: str) -> None:
    optimum_model = problem.model()
    optimizer = NaturalGradient(optimum_model, problem.likelihood, lr=1.0, damping=DAMPING)
    for _ in range(3):
        optimizer.step(lambda: _backward(problem, optimum_model, optimizer))
    optimum = flat_parameters(optimum_model)
    slopes = np.linspace(-3.0, 5.0, 13)
    biases = np.linspace(-5.0, 5.0, 13)
    arrows = np.zeros((len(biases), len(slopes), 2))
    for i, bias in enumerate(biases):
        for j, slope in enumerate(slopes):
            step = -direction(problem, torch.tensor([slope, bias]), kind)
            arrows[i, j] = (step / step.norm()).numpy()
    axis.quiver(slopes, biases, arrows[..., 0], arrows[..., 1], angles="xy", width=0.004)
    axis.plot(*optimum.numpy(), "r*", markersize=10)
    axis.set_title(title, fontsize=9)
    axis.set_xlabel("slope")
    axis.set_ylabel("bias")


def _backward(problem: Problem, model: nn.Module, optimizer: torch.optim.Optimizer) -> Tensor:
    optimizer.zero_grad()
    loss = problem.loss(model)
    loss.backward()
    return loss


def plot(curves: dict[str, dict[str, list[float]]]) -> Figure:
    figure = Figure(figsize=(13, 7.5))
    axes = figure.subplots(2, 3).ravel()
    regression = linear_regression()
    for axis, (kind, title) in zip(
        axes[:3],
        (
            ("gd", "gradient"),
            ("exact", "natural gradient (Fisher)"),
            ("empirical", "empirical Fisher"),
        ),
        strict=True,
    ):
        direction_field(regression, axis, kind, f"linear regression: {title} directions")
    for axis, (name, runs) in zip(axes[3:], curves.items(), strict=True):
        for method, excess in runs.items():
            axis.semilogy([max(value, 1e-16) for value in excess], label=method)
        axis.set_title(f"{name}: loss − loss*", fontsize=9)
        axis.set_xlabel("iteration")
        axis.set_ylim(1e-16, None)
        axis.legend(fontsize=7)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    rows, curves = [], {}
    problems = (linear_regression(), logistic_regression(False), logistic_regression(True))
    for problem in problems:
        problem_rows, curves[problem.name] = run_problem(problem)
        rows.extend(problem_rows)
    columns = [
        "problem",
        "method",
        "lr",
        "iterations",
        "final excess loss",
        "angle to NGD at start (deg)",
        "median angle, first 30 steps (deg)",
    ]
    print_table(f"Iterations to loss − loss* ≤ {TOLERANCE:g} (max {MAX_ITER})", rows, columns)
    settings = {"damping": DAMPING, "max_iter": MAX_ITER, "lr_grid": LR_GRID, "seed": SEED}
    save_json("ng_empirical_fisher", {"environment": environment(**settings), "rows": rows})
    save_figure(plot(curves), "ng_empirical_fisher")


if __name__ == "__main__":
    main()
