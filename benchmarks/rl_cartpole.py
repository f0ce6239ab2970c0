"""Vanilla policy gradient vs natural policy gradient vs TRPO on CartPole-v1.

All three agents share everything but the policy step: the same tanh MLP policy (32, 32) and
value baseline, GAE(γ=0.99, λ=0.97) advantages normalised per batch, 50 full-batch Adam steps
on the value function per iteration, and batches of ``--steps`` environment steps. Policy
steps: vanilla = one Adam step (lr 1e-2) on the surrogate; NPG = ``α (F + 0.01 I)⁻¹ g`` by 10
CG iterations with ``½ αd ᵀ F αd = δ = 0.01``; TRPO = the same step, backtracked (×0.5) until
the exact mean KL ≤ δ and the surrogate improves. Each (agent, seed) pair starts from the same
initial policy and environment seed. Reports the mean undiscounted episode return of each
batch (episodes finished in it) against environment steps: mean over seeds with min/max.
Writes ``benchmarks/results/rl_cartpole.json`` and ``.png``.

    OMP_NUM_THREADS=1 python benchmarks/rl_cartpole.py [--seeds 3] [--iterations 12] [--steps 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).parent))
from _report import environment, print_table, save_figure, save_json
from natgrad.rl import NPG, TRPO, ValueFunction, VanillaPolicyGradient, make_policy, train

AGENTS = {"vanilla PG": VanillaPolicyGradient, "NPG": NPG, "TRPO": TRPO}


def run(name: str, seed: int, iterations: int, steps: int) -> dict:
    env = gym.make("CartPole-v1")
    generator = torch.Generator().manual_seed(seed)
    policy = make_policy(env, (32, 32), generator)
    value_function = ValueFunction(policy.obs_dim, (32, 32), generator)
    agent = AGENTS[name](policy, value_function)
    start = time.perf_counter()
    history = train(agent, env, iterations=iterations, steps_per_iteration=steps, random_state=seed)
    return {
        "agent": name,
        "seed": seed,
        "seconds": time.perf_counter() - start,
        "env_steps": [log.env_steps for log in history],
        "returns": [log.mean_return for log in history],
        "kl": [log.stats["kl"] for log in history],
    }


def summary_rows(runs: list[dict], checkpoints: list[int]) -> list[dict]:
    rows = []
    for name in AGENTS:
        mine = [r for r in runs if r["agent"] == name]
        returns = np.array([r["returns"] for r in mine])
        row = {"agent": name}
        for index in checkpoints:
            column = returns[:, index]
            steps = mine[0]["env_steps"][index]
            row[f"return @ {steps}"] = (
                f"{column.mean():.1f} [{column.min():.0f}, {column.max():.0f}]"
            )
        row["mean KL / update"] = float(np.mean([r["kl"] for r in mine]))
        row["seconds / run"] = float(np.mean([r["seconds"] for r in mine]))
        rows.append(row)
    return rows


def plot(runs: list[dict]) -> Figure:
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for name in AGENTS:
        mine = [r for r in runs if r["agent"] == name]
        steps = mine[0]["env_steps"]
        returns = np.array([r["returns"] for r in mine])
        axes.plot(steps, returns.mean(0), label=name)
        axes.fill_between(steps, returns.min(0), returns.max(0), alpha=0.2)
    axes.set_xlabel("environment steps")
    axes.set_ylabel("mean episode return (batch)")
    axes.set_title(f"CartPole-v1, {len(runs) // len(AGENTS)} seeds (mean, min-max)")
    axes.legend()
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    runs = [
        run(name, seed, args.iterations, args.steps)
        for seed in range(args.seeds)
        for name in AGENTS
    ]
    last = args.iterations - 1
    checkpoints = sorted({0, last // 4, last // 2, (3 * last) // 4, last})
    rows = summary_rows(runs, checkpoints)
    columns = list(rows[0])
    print_table("CartPole-v1: mean batch return (mean over seeds [min, max])", rows, columns)
    settings = {"seeds": args.seeds, "iterations": args.iterations, "steps": args.steps}
    save_json("rl_cartpole", {"environment": environment(**settings), "rows": rows, "runs": runs})
    save_figure(plot(runs), "rl_cartpole")


if __name__ == "__main__":
    main()
