"""Which Fisher should K-FAC's preconditioner use on the digits classifiers?

K-FAC's whole tuning grid of ``kfac_digits.py`` (9 configurations: learning rate, momentum,
damping and damping mode) is trained with each ``fisher_type`` of ``FISHER_TYPES``, with the
benchmark's protocol otherwise (factors and inverses every 10 steps, factor EMA 0.8, KL clip
0.01, SGD-momentum under K-FAC), on training seeds 0 … ``--seeds`` − 1, each run stopped at the
target. A row gives the configuration with the fewest median steps (a miss counts as infinitely
slow), its steps per seed, and the mean seconds per training step of its runs (the exact
Fisher back-propagates the 10 columns of ``∇²A^{1/2}`` on each recording step, the
Monte-Carlo one a sampled gradient, the empirical one nothing extra).

Run ``python benchmarks/kfac_fisher_type.py`` (about 2 minutes with 1 torch thread). Writes
``benchmarks/results/kfac_fisher_type.json``.
"""

from __future__ import annotations

import argparse

import torch

import kfac_digits
from _report import environment, print_table, save_json

FISHER_TYPES = ["empirical", "mc", "exact"]
TASKS = ["mlp", "cnn"]


def fewest_steps(task_name: str, fisher_type: str, seeds: int, data: dict) -> dict:
    """K-FAC's grid with ``fisher_type``: the configuration with the fewest median steps."""
    task = next(task for task in kfac_digits.TASKS if task.name == task_name)
    best = None
    for config in kfac_digits.grid("kfac"):
        runs = [
            kfac_digits.train_run(
                task,
                config,
                data,
                seed,
                task.epochs,
                5,
                stop_at_target=True,
                fisher_type=fisher_type,
            )
            for seed in range(seeds)
        ]
        steps = [run["steps_to_target"] for run in runs]
        median = kfac_digits.median_or_none(steps)
        row = {
            "task": task_name,
            "fisher_type": fisher_type,
            "median_steps": median,
            "steps_per_seed": steps,
            "ms_per_step": 1e3
            * sum(run["wall_s"] for run in runs)
            / sum(run["steps"] for run in runs),
            "best_config": config.label(),
        }
        if best is None or _rank(row) < _rank(best):
            best = row
    return best


def _rank(row: dict) -> float:
    return float("inf") if row["median_steps"] is None else row["median_steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = kfac_digits.load_data(0)
    rows = [
        fewest_steps(task, fisher_type, args.seeds, data)
        for task in TASKS
        for fisher_type in FISHER_TYPES
    ]
    print_table(
        "K-FAC's grid with each Fisher type: fewest median steps to target",
        rows,
        ["task", "fisher_type", "median_steps", "steps_per_seed", "ms_per_step", "best_config"],
    )
    save_json("kfac_fisher_type", {"environment": environment(seeds=args.seeds), "rows": rows})


if __name__ == "__main__":
    main()
