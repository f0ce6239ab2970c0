"""EKFAC's eigenvalue restart at a basis refresh: the refreshed factors' K-FAC eigenvalues
mixed with the current batch's estimate (``eigenvalue_restart="kfac"``, the default) against
that estimate alone (``"batch"``, George et al.), on the digits tasks of ``kfac_digits.py``.

In ``kfac_digits.py`` factors and eigenbases are refreshed together every 10 steps, so with
``"batch"`` every eigenvalue estimate rests on one batch of 64 samples. The EKFAC winners of
that benchmark's run of 2026-11-24 05:39 (tuned with ``"batch"``; MC Fisher, factor EMA 0.8, KL
clip 0.01; learning rate, momentum, damping in ``CONFIGS``) are trained with both restarts on
training seeds 0 … ``--seeds`` − 1, each run stopped at the target; a run that misses counts as
infinitely slow in the median.

Run ``python benchmarks/ekfac_restart.py`` (about 1 minute with 1 torch thread). Writes
``benchmarks/results/ekfac_restart.json``.
"""

from __future__ import annotations

import argparse

import torch

import kfac_digits
from _report import environment, print_table, save_json

CONFIGS = {
    "mlp": kfac_digits.TrainConfig("ekfac", 0.3, momentum=0.8, damping=0.1),
    "cnn": kfac_digits.TrainConfig("ekfac", 0.1, momentum=0.8, damping=0.05),
    "autoencoder": kfac_digits.TrainConfig("ekfac", 0.1, momentum=0.8, damping=0.05),
    "autoencoder_long": kfac_digits.TrainConfig("ekfac", 1.0, momentum=0.8, damping=0.05),
    "autoencoder_full_batch": kfac_digits.TrainConfig("ekfac", 0.1, momentum=0.8, damping=0.1),
}


def compare(task_name: str, seeds: int, data: dict) -> list[dict]:
    """One row per restart: the steps and seconds to target on every seed."""
    task = next(task for task in kfac_digits.TASKS if task.name == task_name)
    every = task.eval_every or 5
    rows = []
    for restart in ("kfac", "batch"):
        runs = [
            kfac_digits.train_run(
                task,
                CONFIGS[task_name],
                data,
                seed,
                task.epochs,
                every,
                stop_at_target=True,
                eigenvalue_restart=restart,
            )
            for seed in range(seeds)
        ]
        steps = [run["steps_to_target"] for run in runs]
        reached = [value for value in steps if value is not None]
        rows.append(
            {
                "task": task_name,
                "eigenvalue_restart": restart,
                "steps_per_seed": steps,
                "median_steps": kfac_digits.median_or_none(steps),
                "max_steps": max(reached) if reached else None,
                "missed": len(steps) - len(reached),
                "median_seconds": kfac_digits.median_or_none(
                    [run["time_to_target_s"] for run in runs]
                ),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=7, help="training seeds (default 7)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = kfac_digits.load_data(0)
    rows = [row for task in CONFIGS for row in compare(task, args.seeds, data)]
    print_table(
        "EKFAC eigenvalue restart at a basis refresh (steps to target per training seed)",
        rows,
        ["task", "eigenvalue_restart", "steps_per_seed", "median_steps", "max_steps", "missed"],
    )
    save_json("ekfac_restart", {"environment": environment(seeds=args.seeds), "rows": rows})


if __name__ == "__main__":
    main()
