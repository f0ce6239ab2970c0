"""Experiment 2: natural gradient (Fisher) vs Gauss-Newton (GGN) vs Newton (Hessian).

Three second-order methods share one loop and differ only in the curvature matrix ``C``:
``natgrad.fisher`` (exact, dense), ``natgrad.ggn`` and ``natgrad.hessian`` of the mean loss. Each
step is ``θ ← θ − (C + λI)⁻¹ ∇L`` with Levenberg–Marquardt damping (``λ`` from
:func:`natgrad.optim.trust_region.levenberg_marquardt_damping`, starting at 1e-3) and steps that
raise the loss rejected (and counted as iterations).

- Logistic regression (canonical link): ``F = E_y[H] = H = GGN`` exactly, so the three methods
  take identical steps.
- A small tanh MLP on digits (categorical): ``F = GGN`` still (the loss is convex in the
  logits and its output Hessian is ``∇²A``), but ``H`` adds the residual term
  ``Σ (p − y)ᵀ ∇²f``; it is indefinite, and Newton must be damped harder.

Reports ‖C − F‖_F/‖F‖_F at the start, the extreme eigenvalues of ``H``, iterations and wall time
to a target, rejected steps. Writes ``benchmarks/results/ng_fisher_vs_hessian.{json,png}``.

    python benchmarks/ng_fisher_vs_hessian.py
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from torch import Tensor, nn

import natgrad
from _report import environment, print_table, save_figure, save_json
from natgrad.curvature import CurvatureOperator
from natgrad.optim.trust_region import levenberg_marquardt_damping

INITIAL_DAMPING = 1e-3
SEED = 0


@dataclass
class Task:
    """A model, its data, the loss and when a run counts as converged."""

    name: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    likelihood: str
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    criterion: str
    converged: Callable[[float, float], bool]
    max_iter: int


def logistic_task() -> Task:
    generator = torch.Generator().manual_seed(SEED)
    inputs = torch.randn(500, 5, generator=generator)
    true_weight = torch.tensor([1.0, -2.0, 0.5, 0.0, 1.5])
    labels = torch.bernoulli(torch.sigmoid(inputs @ true_weight + 0.3), generator=generator)
    torch.manual_seed(SEED)
    return Task(
        "logistic regression (n=500, d=5)",
        nn.Linear(5, 1),
        inputs,
        labels.unsqueeze(-1),
        "bernoulli",
        nn.BCEWithLogitsLoss(),
        "‖grad‖ ≤ 1e-10",
        lambda loss, gradient_norm: gradient_norm <= 1e-10,
        50,
    )


def mlp_task() -> Task:
    digits = load_digits()
    inputs = torch.tensor(digits.data[:256] / 16.0)
    labels = torch.tensor(digits.target[:256])
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
    return Task(
        "digits MLP 64-8-10 (n=256)",
        model,
        inputs,
        labels,
        "categorical",
        nn.CrossEntropyLoss(),
        "loss ≤ 0.05",
        lambda loss, gradient_norm: loss <= 0.05,
        60,
    )


CurvatureFn = Callable[[Task, nn.Module], CurvatureOperator]
METHODS: dict[str, CurvatureFn] = {
    "NGD (Fisher)": lambda task, model: natgrad.fisher(
        model, task.inputs, likelihood=task.likelihood
    ),
    "Gauss-Newton (GGN)": lambda task, model: natgrad.ggn(
        model, task.inputs, task.loss_fn, task.targets
    ),
    "Newton (Hessian)": lambda task, model: natgrad.hessian(
        model, task.inputs, task.loss_fn, task.targets
    ),
}


def loss_and_gradient(task: Task, model: nn.Module) -> tuple[Tensor, Tensor]:
    model.zero_grad()
    loss = task.loss_fn(model(task.inputs), task.targets)
    loss.backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return loss.detach(), gradient


def add_to_parameters(model: nn.Module, update: Tensor) -> None:
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.add_(update[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def damped_run(task: Task, curvature_fn: CurvatureFn) -> dict:
    """Levenberg–Marquardt-damped second-order descent; one row of results and the losses."""
    model = copy.deepcopy(task.model)
    damping, rejected, losses = INITIAL_DAMPING, 0, []
    start = time.perf_counter()
    loss, gradient = loss_and_gradient(task, model)
    iterations_to_target = None
    for iteration in range(task.max_iter + 1):
        losses.append(float(loss))
        if task.converged(float(loss), float(gradient.norm())):
            iterations_to_target = iteration
            break
        if iteration == task.max_iter:
            break
        curvature = curvature_fn(task, model)
        step = -curvature.solve(gradient, damping=damping)
        quadratic = step @ curvature.mv(step) + damping * step @ step
        predicted = float(gradient @ step + 0.5 * quadratic)
        add_to_parameters(model, step)
        new_loss, new_gradient = loss_and_gradient(task, model)
        damping = levenberg_marquardt_damping(damping, float(new_loss - loss), predicted)
        if new_loss < loss:
            loss, gradient = new_loss, new_gradient
        else:
            add_to_parameters(model, -step)
            rejected += 1
    seconds = time.perf_counter() - start
    return {
        "iterations": iterations_to_target if iterations_to_target is not None else "-",
        "rejected": rejected,
        "seconds": seconds,
        "final loss": losses[-1],
        "losses": losses,
    }


def curvature_comparison(task: Task) -> dict:
    """``‖C − F‖_F/‖F‖_F`` for GGN and Hessian at the start, and the Hessian's spectrum ends."""
    fisher = METHODS["NGD (Fisher)"](task, task.model).to_dense()
    ggn = METHODS["Gauss-Newton (GGN)"](task, task.model).to_dense()
    hess = METHODS["Newton (Hessian)"](task, task.model).to_dense()
    eigenvalues = torch.linalg.eigvalsh(hess)
    norm = torch.linalg.norm(fisher)
    return {
        "task": task.name,
        "‖GGN − F‖/‖F‖": float(torch.linalg.norm(ggn - fisher) / norm),
        "‖H − F‖/‖F‖": float(torch.linalg.norm(hess - fisher) / norm),
        "min eig H": float(eigenvalues[0]),
        "max eig H": float(eigenvalues[-1]),
    }


def run() -> tuple[list[dict], list[dict]]:
    comparisons, rows = [], []
    for task in (logistic_task(), mlp_task()):
        comparisons.append(curvature_comparison(task))
        for method, curvature_fn in METHODS.items():
            result = damped_run(task, curvature_fn)
            rows.append(
                {"task": task.name, "method": method, "criterion": task.criterion, **result}
            )
    return comparisons, rows


def plot(rows: list[dict]) -> Figure:
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    figure = Figure(figsize=(10, 3.8))
    for axis, task in zip(figure.subplots(1, len(tasks)), tasks, strict=True):
        chosen = [row for row in rows if row["task"] == task]
        converged_to_optimum = task.startswith("logistic")
        floor = min(min(row["losses"]) for row in chosen) if converged_to_optimum else 0.0
        for row, style in zip(chosen, ("-o", "--s", ":^"), strict=True):
            excess = [max(loss - floor, 1e-16) for loss in row["losses"]]
            axis.semilogy(excess, style, markersize=3, label=row["method"])
        axis.set_title(task, fontsize=9)
        axis.set_xlabel("iteration (rejected steps included)")
        axis.set_ylabel("loss − best loss" if converged_to_optimum else "training loss")
        axis.legend(fontsize=8)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    comparisons, rows = run()
    print_table(
        "Curvature at the initial point",
        comparisons,
        ["task", "‖GGN − F‖/‖F‖", "‖H − F‖/‖F‖", "min eig H", "max eig H"],
    )
    print_table(
        "Iterations (incl. rejected steps) to the target",
        rows,
        ["task", "method", "criterion", "iterations", "rejected", "seconds", "final loss"],
    )
    settings = {"initial_damping": INITIAL_DAMPING, "seed": SEED, "dtype": "float64"}
    payload = {"environment": environment(**settings), "curvature": comparisons, "rows": rows}
    save_json("ng_fisher_vs_hessian", payload)
    save_figure(plot(rows), "ng_fisher_vs_hessian")


if __name__ == "__main__":
    main()
