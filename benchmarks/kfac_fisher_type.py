"""Which Fisher should K-FAC's preconditioner use on the digits classifiers?

K-FAC's whole tuning grid of ``kfac_digits.py`` (12 configurations: learning rate, momentum,
damping, KL clip and the short-factor-memory setting) is trained with each ``fisher_type`` of
``FISHER_TYPES``, with the benchmark's protocol otherwise (factors and inverses every 10 steps,
factor EMA 0.8 and KL clip 0.01 but in the settings that change them, SGD-momentum under
K-FAC), on training seeds 0 … ``--seeds`` − 1, each run stopped at the
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
from kfac_grid_check import fewest_steps

FISHER_TYPES = ["empirical", "mc", "exact"]
TASKS = ["mlp", "cnn"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = kfac_digits.load_data(0)
    configs = kfac_digits.grid("kfac")
    rows = [
        {"fisher_type": fisher_type}
        | fewest_steps(task, configs, args.seeds, data, fisher_type=fisher_type)
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
