"""Experiment 4: how good are the structured Fisher approximations on an MLP?

A tanh MLP 64-32-10 (2,410 parameters) is trained for a few Adam steps on 300 digits (so the
Fisher is not the one at initialisation), then the exact Fisher ``F`` (``structure="dense"``,
``kind="exact"``, the mean over the 300 points) is compared with every structure of
``natgrad.fisher``: ``diag``, ``block`` (one dense block per parameter tensor), ``kfac``,
``ekfac`` and ``implicit`` (matrix-free, conjugate-gradient solves), plus the dense Monte-Carlo
(one sampled label per point) and empirical Fisher. Reported per approximation ``C``:

- the relative Frobenius error ``‖C − F‖_F / ‖F‖_F``;
- the angle between ``(C + λI)⁻¹ g`` and the exact damped natural gradient ``(F + λI)⁻¹ g`` of
  the mean cross-entropy gradient ``g``, for λ ∈ {1e-4, 1e-3, 1e-2, 1e-1};
- build and solve times (single thread).

Writes ``benchmarks/results/ng_approximation_quality.{json,png}``.

    python benchmarks/ng_approximation_quality.py
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from torch import Tensor, nn

import natgrad
from _report import environment, print_table, save_figure, save_json

DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1)
APPROXIMATIONS = {
    "dense (exact)": {"structure": "dense"},
    "diag": {"structure": "diag"},
    "block": {"structure": "block"},
    "kfac": {"structure": "kfac"},
    "ekfac": {"structure": "ekfac"},
    "implicit (CG)": {"structure": "implicit"},
    "dense, MC 1 sample": {"structure": "dense", "kind": "mc"},
    "dense, empirical": {"structure": "dense", "kind": "empirical"},
}
NUM_SAMPLES = 300
WARMUP_STEPS = 50
SEED = 0


def trained_mlp(inputs: Tensor, labels: Tensor) -> nn.Module:
    """The 64-32-10 tanh MLP after ``WARMUP_STEPS`` full-batch Adam steps (lr 1e-2)."""
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(WARMUP_STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model


def angle_degrees(first: Tensor, second: Tensor) -> float:
    cosine = torch.dot(first, second) / (first.norm() * second.norm())
    return math.degrees(math.acos(float(cosine.clamp(-1.0, 1.0))))


def evaluate(model: nn.Module, inputs: Tensor, labels: Tensor) -> tuple[list[dict], float]:
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(inputs), labels)
    loss.backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    exact = natgrad.fisher(model, inputs, likelihood="categorical").to_dense()
    exact_norm = torch.linalg.norm(exact)
    exact_directions = {
        damping: torch.linalg.solve(exact + damping * torch.eye(len(exact)), gradient)
        for damping in DAMPINGS
    }
    rows = []
    for name, options in APPROXIMATIONS.items():
        start = time.perf_counter()
        curvature = natgrad.fisher(
            model,
            inputs,
            likelihood="categorical",
            targets=labels,
            generator=torch.Generator().manual_seed(SEED),
            **options,
        )
        build_seconds = time.perf_counter() - start
        row = {
            "approximation": name,
            "rel. Frobenius error": float(
                torch.linalg.norm(curvature.to_dense() - exact) / exact_norm
            ),
        }
        start = time.perf_counter()
        for damping in DAMPINGS:
            direction = curvature.solve(gradient, damping=damping)
            row[f"angle λ={damping:g}"] = angle_degrees(direction, exact_directions[damping])
        row["build s"] = build_seconds
        row["solve s (per λ)"] = (time.perf_counter() - start) / len(DAMPINGS)
        rows.append(row)
    return rows, float(loss.detach())


def plot(rows: list[dict]) -> Figure:
    figure = Figure(figsize=(11, 4))
    errors, angles = figure.subplots(1, 2)
    names = [row["approximation"] for row in rows]
    errors.barh(names, [max(row["rel. Frobenius error"], 1e-17) for row in rows])
    errors.set_xscale("log")
    errors.set_xlabel("‖C − F‖_F / ‖F‖_F")
    errors.invert_yaxis()
    for row in rows:
        values = [row[f"angle λ={damping:g}"] for damping in DAMPINGS]
        angles.semilogx(DAMPINGS, values, marker="o", label=row["approximation"])
    angles.set_xlabel("damping λ")
    angles.set_ylabel("angle to exact (F + λI)⁻¹g  [degrees]")
    angles.legend(fontsize=7)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    digits = load_digits()
    inputs = torch.tensor(digits.data[:NUM_SAMPLES] / 16.0)
    labels = torch.tensor(digits.target[:NUM_SAMPLES])
    model = trained_mlp(inputs, labels)
    rows, loss = evaluate(model, inputs, labels)
    columns = [
        "approximation",
        "rel. Frobenius error",
        *[f"angle λ={damping:g}" for damping in DAMPINGS],
        "build s",
        "solve s (per λ)",
    ]
    print(f"MLP 64-32-10 on {NUM_SAMPLES} digits after {WARMUP_STEPS} Adam steps, loss {loss:.4f}")
    print_table("Fisher approximations vs the exact Fisher (angles in degrees)", rows, columns)
    settings = {
        "num_samples": NUM_SAMPLES,
        "warmup_steps": WARMUP_STEPS,
        "loss": loss,
        "dampings": DAMPINGS,
        "seed": SEED,
        "dtype": "float64",
    }
    save_json("ng_approximation_quality", {"environment": environment(**settings), "rows": rows})
    save_figure(plot(rows), "ng_approximation_quality")


if __name__ == "__main__":
    main()
