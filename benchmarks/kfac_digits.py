"""K-FAC and EKFAC vs SGD-momentum and Adam on scikit-learn's digits (8×8 images).

Three tasks, each optimizer tuned over a small learning-rate grid, same seeds, same run:

- ``mlp``: 64-128-10 ReLU classifier; target test accuracy.
- ``cnn``: two 3×3 convolutions, max-pool, linear head; target test accuracy.
- ``autoencoder``: 64-128-64-32-8-32-64-128-64 tanh autoencoder with a linear code layer and a
  Bernoulli (sigmoid cross-entropy) reconstruction loss, the Martens & Grosse (2015) task scaled to
  digits; target training loss.

K-FAC/EKFAC precondition the gradient (Monte-Carlo Fisher: one extra backward pass at targets
sampled from the model, eigenbasis damping 0.3, KL clipping 0.01, inverses every 10 steps) and
hand it to SGD with momentum 0.9. (The empirical Fisher from the loss backward alone stalls on
the autoencoder, at the loss of predicting the mean image.) For every (task, optimizer) the best
learning rate is the one reaching the target in the least wall time (or, if none reaches it, the
best final metric). Wall time counts training steps only (evaluation excluded). Also measured:
the cost of one training step relative to an SGD-momentum step, for K-FAC/EKFAC with MC and
empirical Fisher and factor/inverse updates every 1 and every 10 steps (mean over whole update
cycles, median of 5 interleaved rounds), and the time to build K-FAC factors on one batch with
natgrad, curvlinops and BackPACK.

Run ``python benchmarks/kfac_digits.py`` (about 5-8 minutes on 2 cores); ``--quick`` for a smoke
run, ``--cost-only`` for the step-cost tables alone. Writes
``benchmarks/results/kfac_digits.{json,png}`` (not with ``--quick`` or ``--cost-only``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from _report import environment, print_table, save_figure, save_json
from natgrad.optim import EKFAC, KFAC

NAME = "kfac_digits"


@dataclass
class Task:
    name: str
    build: Callable[[], nn.Module]
    loss: Callable[[Tensor, Tensor], Tensor]
    metric: str  # "test_accuracy" (higher is better) or "train_loss" (lower is better)
    target: float
    epochs: int
    batch_size: int
    image: bool = False
    reconstruct: bool = False


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 16, 10),
    )


def autoencoder() -> nn.Module:
    sizes = [64, 128, 64, 32, 8, 32, 64, 128, 64]
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if fan_out != 8 and index < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def bernoulli_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Sigmoid cross-entropy summed over pixels, mean over the batch."""
    return nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(
        logits
    )


TASKS = [
    Task("mlp", mlp, nn.functional.cross_entropy, "test_accuracy", 0.97, 20, 64),
    Task("cnn", cnn, nn.functional.cross_entropy, "test_accuracy", 0.975, 10, 64, image=True),
    Task("autoencoder", autoencoder, bernoulli_loss, "train_loss", 18.5, 25, 64, reconstruct=True),
]

LR_GRIDS = {
    "sgd": [0.03, 0.1, 0.3],
    "adam": [1e-3, 3e-3, 1e-2],
    "kfac": [0.1, 0.3, 1.0],
    "ekfac": [0.1, 0.3, 1.0],
}
PRECONDITIONER_OPTIONS = {
    "fisher_type": "mc",
    "damping": 0.3,
    "factor_decay": 0.95,
    "inv_update_interval": 10,
    "kl_clip": 1e-2,
}


def load_data(seed: int) -> dict[str, Tensor]:
    digits = load_digits()
    features = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    labels = torch.tensor(digits.target)
    train_x, test_x, train_y, test_y = train_test_split(
        features, labels, test_size=0.2, random_state=seed, stratify=labels
    )
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def make_optimizer(task: Task, method: str, model: nn.Module, lr: float, **overrides):
    """The torch.optim optimizer and the preconditioner (None for SGD/Adam); ``overrides``
    replace entries of ``PRECONDITIONER_OPTIONS``."""
    if method == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr), None
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if method == "sgd":
        return optimizer, None
    cls = KFAC if method == "kfac" else EKFAC
    likelihood = "bernoulli" if task.reconstruct else "categorical"
    generator = torch.Generator().manual_seed(0)
    options = PRECONDITIONER_OPTIONS | overrides
    return optimizer, cls(model, lr=lr, likelihood=likelihood, generator=generator, **options)


def inputs_of(task: Task, features: Tensor) -> Tensor:
    return features.reshape(-1, 1, 8, 8) if task.image else features


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, data: dict[str, Tensor]) -> float:
    model.eval()
    try:
        if task.metric == "test_accuracy":
            logits = model(inputs_of(task, data["test_x"]))
            return float((logits.argmax(1) == data["test_y"]).float().mean())
        return float(task.loss(model(data["train_x"]), data["train_x"]))
    finally:
        model.train()


def reached(task: Task, value: float) -> bool:
    if task.metric == "test_accuracy":
        return value >= task.target
    return value <= task.target


def training_step(task: Task, model, optimizer, precond, inputs: Tensor, targets: Tensor) -> None:
    """One step: forward, (MC backward for the preconditioner), backward, precondition, update."""
    optimizer.zero_grad()
    outputs = model(inputs)
    if precond is not None and precond.fisher_type == "mc":
        precond.sample_backward(outputs)
    task.loss(outputs, targets).backward()
    if precond is not None:
        precond.step()
    optimizer.step()


def train_run(task: Task, method: str, lr: float, data: dict[str, Tensor], seed: int, epochs: int):
    torch.manual_seed(seed)
    model = task.build()
    optimizer, precond = make_optimizer(task, method, model, lr)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = data["train_x"], data["train_y"]
    wall, steps, curve = 0.0, 0, []
    time_to_target = steps_to_target = None
    diverged = False
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        start = time.perf_counter()
        for begin in range(0, len(order), task.batch_size):
            index = order[begin : begin + task.batch_size]
            inputs = inputs_of(task, train_x[index])
            targets = train_x[index] if task.reconstruct else train_y[index]
            training_step(task, model, optimizer, precond, inputs, targets)
            steps += 1
        wall += time.perf_counter() - start
        value = evaluate(task, model, data)
        curve.append((wall, steps, value))
        if not math.isfinite(value):
            diverged = True
            break
        if time_to_target is None and reached(task, value):
            time_to_target, steps_to_target = wall, steps
    if precond is not None:
        precond.remove()
    return {
        "task": task.name,
        "method": method,
        "lr": lr,
        "final": curve[-1][2],
        "best": (max if task.metric == "test_accuracy" else min)(v for _, _, v in curve),
        "time_to_target_s": time_to_target,
        "steps_to_target": steps_to_target,
        "wall_s": wall,
        "steps": steps,
        "diverged": diverged,
        "curve": curve,
    }


def pick_best(task: Task, runs: list[dict]) -> dict:
    """Least time to target; otherwise the best final metric."""
    hit = [run for run in runs if run["time_to_target_s"] is not None]
    if hit:
        return min(hit, key=lambda run: run["time_to_target_s"])
    sign = -1.0 if task.metric == "test_accuracy" else 1.0
    finite = [run for run in runs if math.isfinite(run["final"])] or runs
    return min(finite, key=lambda run: sign * run["final"])


@dataclass(frozen=True)
class CostConfig:
    """One row of the step-cost table: a method and, for K-FAC/EKFAC, the Fisher type and the
    common factor/inverse update interval."""

    method: str
    fisher_type: str | None = None
    interval: int | None = None


COST_CONFIGS = [
    CostConfig("sgd"),
    CostConfig("adam"),
    *(
        CostConfig(method, fisher_type, interval)
        for method in ("kfac", "ekfac")
        for fisher_type in ("mc", "empirical")
        for interval in (1, 10)
    ),
]


def step_seconds(
    task: Task, config: CostConfig, data: dict[str, Tensor], steps: int, warmup: int = 10
) -> float:
    """Mean wall seconds per training step over ``steps`` steps (a multiple of the update
    interval, so that factor and inverse updates are counted at their share)."""
    torch.manual_seed(0)
    model = task.build()
    overrides = {}
    if config.interval is not None:
        overrides = {
            "fisher_type": config.fisher_type,
            "factor_update_interval": config.interval,
            "inv_update_interval": config.interval,
        }
    optimizer, precond = make_optimizer(task, config.method, model, 0.01, **overrides)
    inputs = inputs_of(task, data["train_x"][: task.batch_size])
    targets = (
        data["train_x"][: task.batch_size]
        if task.reconstruct
        else data["train_y"][: task.batch_size]
    )
    for _ in range(warmup):
        training_step(task, model, optimizer, precond, inputs, targets)
    start = time.perf_counter()
    for _ in range(steps):
        training_step(task, model, optimizer, precond, inputs, targets)
    seconds = (time.perf_counter() - start) / steps
    if precond is not None:
        precond.remove()
    return seconds


def step_costs(task: Task, data: dict[str, Tensor], steps: int, rounds: int) -> list[dict]:
    """Per-step cost of every ``COST_CONFIGS`` entry, relative to SGD-momentum.

    The configurations are timed in turn, ``rounds`` times over; each reports the median over
    rounds of its mean seconds per step, so that a load burst on a shared machine hits all
    configurations alike.
    """
    timings: dict[CostConfig, list[float]] = {config: [] for config in COST_CONFIGS}
    for _ in range(rounds):
        for config in COST_CONFIGS:
            timings[config].append(step_seconds(task, config, data, steps))
    medians = {config: sorted(values)[len(values) // 2] for config, values in timings.items()}
    sgd = medians[CostConfig("sgd")]
    return [
        {
            "task": task.name,
            "method": config.method,
            "fisher_type": config.fisher_type or "",
            "interval": config.interval or "",
            "ms_per_step": 1e3 * seconds,
            "x_sgd": seconds / sgd,
        }
        for config, seconds in medians.items()
    ]


def factor_cost(task: Task, data: dict[str, Tensor], repeats: int) -> list[dict]:
    """Seconds to build K-FAC factors (empirical Fisher) on one batch, per library."""
    torch.manual_seed(0)
    model = task.build()
    inputs = inputs_of(task, data["train_x"][: task.batch_size])
    targets = (
        data["train_x"][: task.batch_size]
        if task.reconstruct
        else data["train_y"][: task.batch_size]
    )
    builders: dict[str, Callable[[], None]] = {}
    from natgrad.curvature.kfac import build_kfac

    likelihood = "bernoulli" if task.reconstruct else "categorical"
    builders["natgrad build_kfac"] = lambda: build_kfac(
        model, inputs, likelihood=likelihood, kind="empirical", targets=targets
    )
    try:
        from curvlinops import KFACLinearOperator

        loss_func = (
            nn.BCEWithLogitsLoss(reduction="sum") if task.reconstruct else nn.CrossEntropyLoss()
        )
        params = [p for p in model.parameters() if p.requires_grad]

        def curvlinops_factors() -> None:
            operator = KFACLinearOperator(
                model,
                loss_func,
                params,
                [(inputs, targets)],
                fisher_type="empirical",
                check_deterministic=False,
            )
            operator.compute_kronecker_factors()

        builders["curvlinops KFACLinearOperator"] = curvlinops_factors
    except ImportError:
        pass
    builders["backpack KFAC (MC, 1 sample)"] = backpack_builder(task, model, inputs, targets)
    rows = []
    for library, build in builders.items():
        try:
            build()
            start = time.perf_counter()
            for _ in range(repeats):
                build()
            rows.append(
                {
                    "task": task.name,
                    "library": library,
                    "seconds": (time.perf_counter() - start) / repeats,
                }
            )
        except Exception as error:  # a peer library may not support the model
            rows.append(
                {
                    "task": task.name,
                    "library": library,
                    "seconds": float("nan"),
                    "error": repr(error),
                }
            )
    return rows


def backpack_builder(task: Task, model: nn.Module, inputs: Tensor, targets: Tensor):
    """BackPACK's KFAC extension (one MC sample) on a deep copy of ``model``."""
    import copy

    from backpack import backpack, extend
    from backpack.extensions import KFAC as BackpackKFAC

    extended = extend(copy.deepcopy(model))
    loss_func = extend(
        nn.BCEWithLogitsLoss(reduction="sum") if task.reconstruct else nn.CrossEntropyLoss()
    )

    def build() -> None:
        extended.zero_grad()
        with backpack(BackpackKFAC(mc_samples=1)):
            loss_func(extended(inputs), targets).backward()

    return build


def plot(best_runs: list[dict], tasks: list[Task]) -> Figure:
    figure = Figure(figsize=(4 * len(tasks), 3.4))
    for axis_index, task in enumerate(tasks):
        axis = figure.add_subplot(1, len(tasks), axis_index + 1)
        for run in (run for run in best_runs if run["task"] == task.name):
            times = [point[0] for point in run["curve"]]
            values = [point[2] for point in run["curve"]]
            axis.plot(times, values, label=f"{run['method']} (lr={run['lr']:g})")
        axis.axhline(task.target, color="grey", linestyle=":", linewidth=1)
        axis.set_title(task.name)
        axis.set_xlabel("training wall time (s)")
        axis.set_ylabel(task.metric.replace("_", " "))
        if task.metric == "train_loss":
            axis.set_yscale("log")
        axis.legend(fontsize=7)
    return figure


def targets_text(tasks: list[Task]) -> str:
    return ", ".join(f"{task.name} {task.metric} {task.target:g}" for task in tasks)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="a few epochs, one lr per method")
    parser.add_argument("--tasks", nargs="*", default=[task.name for task in TASKS])
    parser.add_argument(
        "--cost-steps", type=int, default=100, help="steps per step-cost timing (default 100)"
    )
    parser.add_argument(
        "--cost-only", action="store_true", help="only the step-cost table (no training runs)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data(args.seed)
    tasks = [task for task in TASKS if task.name in args.tasks]
    all_runs, best_runs, cost_rows, factor_rows = [], [], [], []
    for task in tasks:
        epochs = 2 if args.quick else task.epochs
        for method, grid in ({} if args.cost_only else LR_GRIDS).items():
            lrs = grid[1:2] if args.quick else grid
            runs = [train_run(task, method, lr, data, args.seed, epochs) for lr in lrs]
            all_runs.extend(runs)
            best = pick_best(task, runs)
            best_runs.append(best)
        if args.quick:
            cost_rows.extend(step_costs(task, data, steps=10, rounds=1))
        else:
            cost_rows.extend(step_costs(task, data, steps=args.cost_steps, rounds=5))
        factor_rows.extend(factor_cost(task, data, 3 if args.quick else 20))

    columns = [
        "task",
        "method",
        "lr",
        "final",
        "best",
        "time_to_target_s",
        "steps_to_target",
        "wall_s",
        "steps",
    ]
    print_table(
        "Best learning rate per optimizer (targets: " + targets_text(tasks) + ")",
        best_runs,
        columns,
    )
    print_table("All runs", all_runs, [*columns, "diverged"])
    print_table(
        "Cost of one training step (mean over whole update cycles; factor and inverse updates "
        "every `interval` steps)",
        cost_rows,
        ["task", "method", "fisher_type", "interval", "ms_per_step", "x_sgd"],
    )
    print_table(
        "K-FAC factors on one batch (empirical Fisher)", factor_rows, ["task", "library", "seconds"]
    )
    payload = {
        "environment": environment(
            seed=args.seed, quick=args.quick, preconditioner=PRECONDITIONER_OPTIONS
        ),
        "targets": {task.name: {"metric": task.metric, "target": task.target} for task in tasks},
        "best": best_runs,
        "runs": all_runs,
        "step_cost": cost_rows,
        "factor_cost": factor_rows,
    }
    if not (args.quick or args.cost_only):
        save_json(NAME, payload)
        save_figure(plot(best_runs, tasks), NAME)
    return payload


if __name__ == "__main__":
    main()
