"""xNES vs SNES vs (1+1)-ES vs random search: evaluations to reach f ≤ 1e-8.

Functions (natgrad.es.objectives): sphere, ellipsoid (condition 1e6) and Rosenbrock in
d = 5, 10, 20, minimum 0. Every method starts at x0 = (3, …, 3) (Rosenbrock: x0 = 0) with
σ₀ = 1 and stops at f ≤ 1e-8 or after ``--budget-per-dim`` · d evaluations. xNES and SNES
use the papers' default population sizes and learning rates. Baselines (here, not in the
library): the (1+1)-ES with the 1/5th success rule (σ ← σ·exp((𝟙[success] − 1/5)/√(d+1))),
and pure random search drawing N(x0, 3²I). Reports, per (function, d, method), the success
rate over seeds, the median evaluations of the successful runs and the median best value.
Writes ``benchmarks/results/es_functions.json`` and ``.png``.

    OMP_NUM_THREADS=1 python benchmarks/es_functions.py [--seeds 2] [--budget-per-dim 3000]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

sys.path.insert(0, str(Path(__file__).parent))
from _report import environment, print_table, save_figure, save_json
from natgrad.es import ellipsoid, minimize, rosenbrock, sphere

TARGET = 1e-8
FUNCTIONS = {"sphere": sphere, "ellipsoid": ellipsoid, "rosenbrock": rosenbrock}
DIMENSIONS = (5, 10, 20)
METHODS = ("xNES", "SNES", "(1+1)-ES", "random search")


def start_point(name: str, dim: int) -> torch.Tensor:
    return (
        torch.zeros(dim, dtype=torch.float64)
        if name == "rosenbrock"
        else torch.full((dim,), 3.0, dtype=torch.float64)
    )


def one_plus_one_es(f, x0: torch.Tensor, budget: int, generator: torch.Generator) -> tuple:
    """(1+1)-ES with the 1/5th success rule; returns (best value, evaluations)."""
    dim = x0.numel()
    parent, parent_value, sigma = x0.clone(), float(f(x0)), 1.0
    evaluations = 1
    while evaluations < budget and parent_value > TARGET:
        child = parent + sigma * torch.randn(dim, generator=generator, dtype=x0.dtype)
        child_value = float(f(child))
        evaluations += 1
        success = child_value <= parent_value
        if success:
            parent, parent_value = child, child_value
        sigma *= math.exp((float(success) - 0.2) / math.sqrt(dim + 1))
    return parent_value, evaluations


def random_search(f, x0: torch.Tensor, budget: int, generator: torch.Generator) -> tuple:
    """Best of ``budget`` draws from N(x0, 3²I), in chunks; returns (best value, evaluations)."""
    best, evaluations = math.inf, 0
    while evaluations < budget and best > TARGET:
        chunk = min(1000, budget - evaluations)
        samples = x0 + 3.0 * torch.randn(chunk, x0.numel(), generator=generator, dtype=x0.dtype)
        values = f(samples)
        hits = torch.nonzero(values <= TARGET).flatten()
        if hits.numel():
            return float(values[hits[0]]), evaluations + int(hits[0]) + 1
        best = min(best, float(values.min()))
        evaluations += chunk
    return best, evaluations


def run(method: str, name: str, dim: int, seed: int, budget: int) -> dict:
    f, x0 = FUNCTIONS[name], start_point(name, dim)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    if method in ("xNES", "SNES"):
        result = minimize(
            f,
            x0,
            method=method.lower(),
            target=TARGET,
            max_evaluations=budget,
            random_state=generator,
            vectorized=True,
        )
        best, evaluations = result.fun, result.evaluations
    elif method == "(1+1)-ES":
        best, evaluations = one_plus_one_es(f, x0, budget, generator)
    else:
        best, evaluations = random_search(f, x0, budget, generator)
    return {
        "method": method,
        "function": name,
        "dim": dim,
        "seed": seed,
        "best": best,
        "evaluations": evaluations,
        "success": best <= TARGET,
        "seconds": time.perf_counter() - start,
    }


def summary(runs: list[dict]) -> list[dict]:
    rows = []
    for name in FUNCTIONS:
        for dim in DIMENSIONS:
            for method in METHODS:
                mine = [
                    r for r in runs if (r["method"], r["function"], r["dim"]) == (method, name, dim)
                ]
                successes = [r["evaluations"] for r in mine if r["success"]]
                rows.append(
                    {
                        "function": name,
                        "d": dim,
                        "method": method,
                        "success": f"{len(successes)}/{len(mine)}",
                        "median evals to 1e-8": float(np.median(successes))
                        if successes
                        else math.nan,
                        "median best f": float(np.median([r["best"] for r in mine])),
                        "seconds / run": float(np.mean([r["seconds"] for r in mine])),
                    }
                )
    return rows


def plot(rows: list[dict], budget_per_dim: int) -> Figure:
    figure = Figure(figsize=(11, 3.5))
    for axes, name in zip(figure.subplots(1, len(FUNCTIONS)), FUNCTIONS, strict=True):
        for method in METHODS:
            mine = [r for r in rows if (r["function"], r["method"]) == (name, method)]
            axes.plot(
                [r["d"] for r in mine],
                [r["median evals to 1e-8"] for r in mine],
                "o-",
                label=method,
            )
        axes.plot(DIMENSIONS, [budget_per_dim * d for d in DIMENSIONS], "k:", label="budget")
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xticks(DIMENSIONS, [str(d) for d in DIMENSIONS])
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.set_xlabel("d")
        axes.set_title(name)
    figure.axes[0].set_ylabel("median evaluations to f ≤ 1e-8")
    figure.axes[0].legend(fontsize=7)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--budget-per-dim", type=int, default=3000)
    args = parser.parse_args()
    runs = [
        run(method, name, dim, seed, args.budget_per_dim * dim)
        for name in FUNCTIONS
        for dim in DIMENSIONS
        for method in METHODS
        for seed in range(args.seeds)
    ]
    rows = summary(runs)
    print_table("Evaluations to f ≤ 1e-8 (median over successful seeds)", rows, list(rows[0]))
    settings = {"seeds": args.seeds, "budget_per_dim": args.budget_per_dim, "target": TARGET}
    save_json("es_functions", {"environment": environment(**settings), "rows": rows, "runs": runs})
    save_figure(plot(rows, args.budget_per_dim), "es_functions")


if __name__ == "__main__":
    main()
