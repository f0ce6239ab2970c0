"""Do the tuning grids of ``kfac_digits.py`` hold a method back? Two checks.

1. **K-FAC's KL clip.** K-FAC's grid varies the learning rate, momentum, damping and damping
   mode with the KL clip fixed at ``κ = 0.01`` (0.1 in two settings). Where the clip binds, the
   step is ``sqrt(κ / |g · Δ|) Δ`` whatever the learning rate, so κ, not the learning rate,
   sets the step size. K-FAC's whole grid is trained with each clip of ``KL_CLIPS`` (``None``: no
   clipping), which replaces the clip of its ``SHORT_FACTOR_MEMORY`` setting too.
2. **Adam's learning rate.** Adam's classifier winners sit at the top of its grid (lr 0.03).
   Adam's settings of ``(β1, β2)`` are trained with the learning rates ``ADAM_LRS`` above it.

Every run uses the benchmark's protocol (MC Fisher, factors and inverses every 10 steps, factor
EMA 0.8 but in the short-memory setting, SGD-momentum under K-FAC), training seeds 0 …
``--seeds`` − 1 and stops at the target; a row gives the configuration with the fewest median
steps (a miss counts as infinitely slow) and its steps per seed.

Run ``python benchmarks/kfac_grid_check.py`` (about 10 minutes with 1 torch thread). Writes
``benchmarks/results/kfac_grid_check.json``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

import kfac_digits
from _report import environment, print_table, save_json

KL_CLIPS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, None]
KL_CLIP_TASKS = ["mlp", "cnn", "autoencoder"]
ADAM_LRS = [0.05, 0.1]
ADAM_TASKS = ["mlp", "cnn"]


def fewest_steps(
    task_name: str, configs: list[kfac_digits.TrainConfig], seeds: int, data: dict, **options
) -> dict:
    """Train every configuration on every seed (``options`` override the preconditioner's);
    the one with the fewest median steps to the target, and its mean milliseconds per step."""
    task = next(task for task in kfac_digits.TASKS if task.name == task_name)
    every = task.eval_every or 5
    best = None
    for config in configs:
        runs = [
            kfac_digits.train_run(
                task, config, data, seed, task.epochs, every, stop_at_target=True, **options
            )
            for seed in range(seeds)
        ]
        steps = [run["steps_to_target"] for run in runs]
        row = {
            "task": task_name,
            "best_config": config.label(),
            "steps_per_seed": steps,
            "median_steps": kfac_digits.median_or_none(steps),
            "ms_per_step": 1e3
            * sum(run["wall_s"] for run in runs)
            / sum(run["steps"] for run in runs),
        }
        if best is None or _rank(row) < _rank(best):
            best = row
    return best


def _rank(row: dict) -> float:
    return float("inf") if row["median_steps"] is None else row["median_steps"]


def kl_clip_rows(seeds: int, data: dict) -> list[dict]:
    """K-FAC's grid with each KL clip (the grid's own clips dropped from its points, so that a
    row's ``best_config`` names the point without the clip it did not train with)."""
    unclipped = [replace(config, kl_clip=None) for config in kfac_digits.grid("kfac")]
    return [
        {"kl_clip": "off" if kl_clip is None else kl_clip}
        | fewest_steps(task, unclipped, seeds, data, kl_clip=kl_clip)
        for task in KL_CLIP_TASKS
        for kl_clip in KL_CLIPS
    ]


def adam_rows(seeds: int, data: dict) -> list[dict]:
    """Adam's settings at each learning rate above its grid."""
    return [
        {"lr": lr}
        | fewest_steps(
            task,
            [
                kfac_digits.TrainConfig("adam", lr, **options)
                for options in kfac_digits.SECOND_GRIDS["adam"]
            ],
            seeds,
            data,
        )
        for task in ADAM_TASKS
        for lr in ADAM_LRS
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = kfac_digits.load_data(0)
    kl_clips = kl_clip_rows(args.seeds, data)
    print_table(
        "K-FAC's grid with each KL clip: fewest median steps to target",
        kl_clips,
        ["task", "kl_clip", "median_steps", "steps_per_seed", "best_config"],
    )
    adam = adam_rows(args.seeds, data)
    print_table(
        "Adam above its grid's learning rates: fewest median steps to target",
        adam,
        ["task", "lr", "median_steps", "steps_per_seed", "best_config"],
    )
    save_json(
        "kfac_grid_check",
        {"environment": environment(seeds=args.seeds), "kl_clip": kl_clips, "adam": adam},
    )


if __name__ == "__main__":
    main()
