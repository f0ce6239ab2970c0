"""Shampoo and AdaHessian vs Adam and SGD-momentum: an MLP on scikit-learn's digits (8×8 images).

A 64-128-10 tanh classifier (cross-entropy, minibatches of 64) is trained by each optimizer over
a small learning-rate grid, with the same seeds (initialisation, split and batch order) in the
same run. The full training loss is evaluated every ``--eval-every`` steps (not counted in wall
time). Reported per optimizer, for the learning rate with the least median steps to the target
training loss (or, if no seed reaches it, the least median final training loss): the median
over seeds of steps and training wall time to the target, and the final training loss and test
accuracy. Also measured: milliseconds per training step.

Settings: SGD with momentum 0.9; Adam with default betas; Shampoo with momentum 0.9,
``epsilon=1e-4``, preconditioners recomputed every 10 steps, layer-wise grafting onto AdaGrad
(``grafting="adagrad"``); AdaHessian with default betas, one Rademacher sample per step,
``hessian_power=1``.

Run ``OMP_NUM_THREADS=1 python benchmarks/shampoo_adahessian.py`` (about 2 minutes of CPU time on
one thread; longer on a busy machine); ``--quick`` for a smoke run. Writes
``benchmarks/results/shampoo_adahessian.{json,png}``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from _report import environment, print_table, save_figure, save_json
from natgrad.optim import AdaHessian, Shampoo

NAME = "shampoo_adahessian"
TARGET_TRAIN_LOSS = 0.02
BATCH_SIZE = 64
LR_GRIDS = {
    "sgd": [0.1, 0.3, 1.0],
    "adam": [3e-3, 1e-2, 3e-2],
    "shampoo": [0.01, 0.03, 0.1],
    "adahessian": [0.1, 0.3, 1.0],
}
SHAMPOO_OPTIONS = {"momentum": 0.9, "epsilon": 1e-4, "update_freq": 10, "grafting": "adagrad"}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))


def load_data(seed: int) -> dict[str, Tensor]:
    digits = load_digits()
    features = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    labels = torch.tensor(digits.target)
    train_x, test_x, train_y, test_y = train_test_split(
        features, labels, test_size=0.2, random_state=seed, stratify=labels
    )
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def make_optimizer(method: str, model: nn.Module, lr: float, seed: int) -> torch.optim.Optimizer:
    params = model.parameters()
    if method == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if method == "adam":
        return torch.optim.Adam(params, lr=lr)
    if method == "shampoo":
        return Shampoo(params, lr=lr, **SHAMPOO_OPTIONS)
    return AdaHessian(params, lr=lr, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, Tensor]) -> tuple[float, float]:
    """Full training loss (mean cross-entropy) and test accuracy."""
    train_loss = nn.functional.cross_entropy(model(data["train_x"]), data["train_y"])
    accuracy = (model(data["test_x"]).argmax(1) == data["test_y"]).float().mean()
    return float(train_loss), float(accuracy)


def train_step(method: str, model: nn.Module, optimizer, inputs: Tensor, targets: Tensor) -> None:
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(inputs), targets)
    loss.backward(create_graph=method == "adahessian")
    optimizer.step()


def train_run(
    method: str, lr: float, data: dict[str, Tensor], seed: int, max_steps: int, eval_every: int
) -> dict:
    torch.manual_seed(seed)
    model = mlp()
    optimizer = make_optimizer(method, model, lr, seed)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = data["train_x"], data["train_y"]
    wall, steps, curve = 0.0, 0, []
    steps_to_target = time_to_target = None
    order = torch.randperm(len(train_x), generator=generator)
    position = 0
    while steps < max_steps:
        start = time.perf_counter()
        for _ in range(eval_every):
            if position + BATCH_SIZE > len(order):
                order, position = torch.randperm(len(train_x), generator=generator), 0
            index = order[position : position + BATCH_SIZE]
            position += BATCH_SIZE
            train_step(method, model, optimizer, train_x[index], train_y[index])
            steps += 1
        wall += time.perf_counter() - start
        train_loss, accuracy = evaluate(model, data)
        curve.append((steps, wall, train_loss))
        if not math.isfinite(train_loss):
            break
        if steps_to_target is None and train_loss <= TARGET_TRAIN_LOSS:
            steps_to_target, time_to_target = steps, wall
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "steps_to_target": steps_to_target,
        "time_to_target_s": time_to_target,
        "final_train_loss": curve[-1][2],
        "test_accuracy": accuracy,
        "steps": steps,
        "wall_s": wall,
        "curve": curve,
    }


def median_or_none(values: list[float | None]) -> float | None:
    """Median over seeds; ``None`` unless every seed has a value."""
    return None if any(v is None for v in values) else statistics.median(values)


def summarise(method: str, lr: float, runs: list[dict]) -> dict:
    final_losses = [run["final_train_loss"] for run in runs]
    return {
        "method": method,
        "lr": lr,
        "seeds_at_target": sum(run["steps_to_target"] is not None for run in runs),
        "steps_to_target": median_or_none([run["steps_to_target"] for run in runs]),
        "time_to_target_s": median_or_none([run["time_to_target_s"] for run in runs]),
        "final_train_loss": statistics.median(final_losses)
        if all(math.isfinite(v) for v in final_losses)
        else float("nan"),
        "test_accuracy": statistics.median(run["test_accuracy"] for run in runs),
        "ms_per_step": 1e3 * statistics.median(run["wall_s"] / run["steps"] for run in runs),
    }


def pick_best(rows: list[dict]) -> dict:
    """Least median steps to target; otherwise the least median final training loss."""
    hit = [row for row in rows if row["steps_to_target"] is not None]
    if hit:
        return min(hit, key=lambda row: (row["steps_to_target"], row["time_to_target_s"]))
    finite = [row for row in rows if math.isfinite(row["final_train_loss"])] or rows
    return min(finite, key=lambda row: row["final_train_loss"])


def plot(best: list[dict], runs: list[dict]) -> Figure:
    figure = Figure(figsize=(9, 3.4))
    by_steps, by_time = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for row in best:
        run = next(
            r for r in runs if r["method"] == row["method"] and r["lr"] == row["lr"]
        )  # first seed
        label = f"{row['method']} (lr={row['lr']:g})"
        losses = [point[2] for point in run["curve"]]
        by_steps.plot([point[0] for point in run["curve"]], losses, label=label)
        by_time.plot([point[1] for point in run["curve"]], losses, label=label)
    for axis, xlabel in ((by_steps, "training steps"), (by_time, "training wall time (s)")):
        axis.axhline(TARGET_TRAIN_LOSS, color="grey", linestyle=":", linewidth=1)
        axis.set_yscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("training loss")
        axis.legend(fontsize=7)
    return figure


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--max-steps", type=int, default=1200)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="100 steps, one lr, one seed")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = args.seeds[:1] if args.quick else args.seeds
    max_steps = 100 if args.quick else args.max_steps
    datasets = {seed: load_data(seed) for seed in seeds}
    runs, rows, best = [], [], []
    for method, grid in LR_GRIDS.items():
        method_rows = []
        for lr in grid[1:2] if args.quick else grid:
            lr_runs = [
                train_run(method, lr, datasets[seed], seed, max_steps, args.eval_every)
                for seed in seeds
            ]
            runs.extend(lr_runs)
            method_rows.append(summarise(method, lr, lr_runs))
        rows.extend(method_rows)
        best.append(pick_best(method_rows))
    columns = [
        "method",
        "lr",
        "seeds_at_target",
        "steps_to_target",
        "time_to_target_s",
        "final_train_loss",
        "test_accuracy",
        "ms_per_step",
    ]
    title = (
        f"Digits MLP 64-128-10, target training loss {TARGET_TRAIN_LOSS:g}, "
        f"median over seeds {seeds}, {max_steps} steps of batch {BATCH_SIZE}"
    )
    print_table(f"Best learning rate per optimizer. {title}", best, columns)
    print_table("All learning rates", rows, columns)
    settings = {
        "seeds": seeds,
        "max_steps": max_steps,
        "eval_every": args.eval_every,
        "batch_size": BATCH_SIZE,
        "target_train_loss": TARGET_TRAIN_LOSS,
        "lr_grids": LR_GRIDS,
        "shampoo_options": SHAMPOO_OPTIONS,
    }
    payload = {"environment": environment(**settings), "best": best, "rows": rows, "runs": runs}
    save_json(NAME, payload)
    save_figure(plot(best, runs), NAME)
    return payload


if __name__ == "__main__":
    main()
