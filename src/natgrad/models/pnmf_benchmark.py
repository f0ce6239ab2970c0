"""``natgrad bench pnmf``: standard (Adam) vs natural-gradient PNMF, and two peers.

The seed's grid (3 ELBO modes × 2 training modes; 200 × 100 Poisson counts from 5 true
components, E = 10, seed 42, at most 8000 iterations, tol 1e-4) and the same grid on the
``sklearn.datasets.load_digits`` counts (1797 × 64, 10 components). For every run it reports
iterations, the final ELBO (``elbo_``: the mode's estimator with 100 draws at the fitted
parameters), the relative Frobenius reconstruction error ``‖Y − E_q[e^F] Wᵀ‖_F / ‖Y‖_F``, wall
time, and the iterations and seconds to come within 0.1 % of the final ELBO: the first iteration
whose trailing 20-iteration mean of the per-iteration ELBO estimates is ≥ m − 0.001 |m|, with m
that trailing mean at the last iteration (the same estimator throughout, so Monte-Carlo noise
cannot make the target unreachable); "of best" uses the larger m of the standard/natural pair.
In the same run, pnmf 0.1.0 (the seed's package) and scikit-learn
``NMF(beta_loss="kullback-leibler", solver="mu")`` fit the same counts; their wall time and the
Poisson deviance of their reconstruction are compared with the time natural-gradient PNMF
(lower-bound mode) needs to reach the same deviance.

Writes ``pnmf_benchmark.json``, the tables as ``pnmf_benchmark.md``, and the seed's two plots
(``natural_gradient_comparison.png``, ``natural_gradient_elbo_comparison.png``; ``*_digits.png``
for the digits grid) under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from natgrad.models.pnmf import PNMF
from natgrad.models.pnmf_elbo import ELBO_MODES, expected_exp_factors
from natgrad.models.pnmf_training import CONVERGENCE_WINDOW, FitState

TRAINING_MODES = ("standard", "natural")


def synthetic_counts(seed: int, n_samples=200, n_features=100, n_components=5) -> np.ndarray:
    """Poisson counts ``y ~ Poisson(exp(F) Wᵀ)``, ``F ~ N(0, 1)``, ``W ~ Gamma(1, 1)``."""
    rng = np.random.default_rng(seed)
    loadings = rng.gamma(1.0, 1.0, (n_features, n_components))
    factors = rng.normal(0.0, 1.0, (n_samples, n_components))
    return rng.poisson(np.exp(factors) @ loadings.T).astype(np.float64)


def digits_counts() -> np.ndarray:
    """``load_digits`` pixel intensities (integers 0–16), 1797 × 64."""
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float64)


RATE_FLOOR = 1e-8


def poisson_deviance(counts: np.ndarray, rate: np.ndarray) -> float:
    """``2 Σ [y log(y / rate) − y + rate]`` (``0 log 0 = 0``), rates floored at ``1e-8`` (as
    pnmf 0.1.0's own likelihood does; its projected W can give zero rates at positive counts)."""
    rate = np.maximum(rate, RATE_FLOOR)
    positive = counts > 0
    log_ratio = np.zeros_like(counts)
    log_ratio[positive] = np.log(counts[positive] / rate[positive])
    return float(2.0 * (counts * log_ratio - counts + rate).sum())


def relative_error(counts: np.ndarray, rate: np.ndarray) -> float:
    """``‖Y − rate‖_F / ‖Y‖_F``."""
    return float(np.linalg.norm(counts - rate) / np.linalg.norm(counts))


def trailing_mean(values: np.ndarray, window: int = CONVERGENCE_WINDOW) -> np.ndarray:
    """Mean of the last ``window`` values at every position (fewer at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def first_reaching(smoothed: np.ndarray, target: float) -> int | None:
    """Index of the first value ``≥ target`` (``None`` if none)."""
    hits = np.flatnonzero(smoothed >= target)
    return int(hits[0]) if len(hits) else None


class _Recorder:
    """Fit callback: per-iteration wall time (its own cost excluded) and, optionally, deviance."""

    def __init__(self, counts: np.ndarray | None):
        self.counts = counts
        self.start = time.perf_counter()
        self.overhead = 0.0
        self.seconds: list[float] = []
        self.deviances: list[float] = []

    def __call__(self, iteration: int, value: float, state: FitState) -> None:
        entered = time.perf_counter()
        self.seconds.append(entered - self.start - self.overhead)
        if self.counts is not None:
            posterior = state.posterior
            activations = expected_exp_factors(posterior.loc, posterior.variance)
            rate = (activations @ state.loadings.T).cpu().numpy()
            self.deviances.append(poisson_deviance(self.counts, rate))
        self.overhead += time.perf_counter() - entered


def run_pnmf(
    counts, n_components, training_mode, mode, max_iter, args, trace_deviance=False
) -> dict:
    """Fit natgrad's PNMF once (float32 unless ``--float64``) and summarise it."""
    model = PNMF(
        n_components=n_components,
        training_mode=training_mode,
        mode=mode,
        E=args.E,
        max_iter=max_iter,
        tol=args.tol,
        learning_rate=args.standard_lr if training_mode == "standard" else None,
        random_state=args.seed,
        device="cpu",
    )
    recorder = _Recorder(counts if trace_deviance else None)
    started = time.perf_counter()
    model.fit(counts.astype(_fit_dtype(args)), callback=recorder)
    seconds = time.perf_counter() - started
    activations = np.exp(model.variational_mean_ + 0.5 * model.variational_variance_)
    rate = model.inverse_transform(activations)
    history = model.elbo_history_
    smoothed = trailing_mean(history)
    target = smoothed[-1] - 1e-3 * abs(smoothed[-1])
    reached = first_reaching(smoothed, target)
    return {
        "training_mode": training_mode,
        "mode": mode,
        "learning_rate": model.learning_rate_,
        "iterations": model.n_iter_,
        "converged": model.converged_,
        "final_elbo": model.elbo_,
        "reconstruction_error": relative_error(counts, rate),
        "deviance": poisson_deviance(counts, rate),
        "seconds": seconds,
        "iterations_to_0.1%": None if reached is None else reached + 1,
        "seconds_to_0.1%": None if reached is None else recorder.seconds[reached],
        "elbo_history": history.tolist(),
        "smoothed_history": smoothed.tolist(),
        "iteration_seconds": recorder.seconds,
        "deviance_trace": recorder.deviances,
    }


def compare_pair(standard: dict, natural: dict) -> dict:
    """ELBO improvement and speedups of the natural run over the standard run."""
    improvement = natural["final_elbo"] - standard["final_elbo"]
    best = max(natural["smoothed_history"][-1], standard["smoothed_history"][-1])
    target = best - 1e-3 * abs(best)
    to_best = {}
    for run in (standard, natural):
        index = first_reaching(np.asarray(run["smoothed_history"]), target)
        to_best[run["training_mode"]] = None if index is None else index + 1
    ratio = None
    if natural["iterations_to_0.1%"] and standard["iterations_to_0.1%"]:
        ratio = standard["iterations_to_0.1%"] / natural["iterations_to_0.1%"]
    time_ratio = None
    if natural["seconds_to_0.1%"] and standard["seconds_to_0.1%"]:
        time_ratio = standard["seconds_to_0.1%"] / natural["seconds_to_0.1%"]
    return {
        "elbo_improvement": improvement,
        "elbo_improvement_percent": 100.0 * improvement / abs(standard["final_elbo"]),
        "speedup_iterations": ratio,
        "speedup_seconds": time_ratio,
        "iterations_to_0.1%_of_best_final": to_best,
    }


def run_seed_peer(counts: np.ndarray, n_components: int, args) -> dict:
    """pnmf 0.1.0 (the seed's package) with E draws for ``--pnmf-iter`` iterations."""
    from PNMF import PNMF as SeedPNMF

    torch.manual_seed(args.seed)
    model = SeedPNMF(
        n_components=n_components, E=args.E, max_iter=args.pnmf_iter, random_state=args.seed
    )
    started = time.perf_counter()
    model.fit(counts)
    seconds = time.perf_counter() - started
    prior = model._prior
    activations = torch.exp(prior.mean + 0.5 * prior.scale.data**2).detach().cpu().numpy().T
    rate = activations @ model.components_
    return {
        "name": f"pnmf 0.1.0 (Adam, lr 0.01, {model.n_iter_} iterations)",
        "seconds": seconds,
        "deviance": poisson_deviance(counts, rate),
        "reconstruction_error": relative_error(counts, rate),
    }


def _sklearn_fit(counts: np.ndarray, n_components: int, max_iter: int, seed: int, dtype=np.float64):
    """scikit-learn KL-NMF (``solver="mu"``, ``init="nndsvda"``, default ``tol``) on ``counts``
    cast to ``dtype``; returns seconds, deviance, relative error and iterations run."""
    from sklearn.decomposition import NMF

    model = NMF(
        n_components=n_components,
        beta_loss="kullback-leibler",
        solver="mu",
        init="nndsvda",
        max_iter=max_iter,
        random_state=seed,
    )
    data = counts.astype(dtype)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        activations = model.fit_transform(data)
    seconds = time.perf_counter() - started
    rate = (activations @ model.components_).astype(np.float64)
    return seconds, poisson_deviance(counts, rate), relative_error(counts, rate), model.n_iter_


def _fit_dtype(args) -> type:
    return np.float64 if args.float64 else np.float32


def run_sklearn_peer(counts: np.ndarray, n_components: int, args) -> dict:
    """scikit-learn KL-NMF (multiplicative updates) at its defaults (tol 1e-4, at most 1000
    iterations), in the same precision as natgrad's fits."""
    seconds, deviance, error, n_iter = _sklearn_fit(
        counts, n_components, 1000, args.seed, _fit_dtype(args)
    )
    return {
        "name": f"scikit-learn NMF (KL, mu, {n_iter} iterations)",
        "seconds": seconds,
        "deviance": deviance,
        "reconstruction_error": error,
        "iterations": n_iter,
    }


def time_to_deviance(run: dict, target: float) -> float | None:
    """Seconds for a traced natgrad run to first reach a deviance ``≤ target``."""
    hits = np.flatnonzero(np.asarray(run["deviance_trace"]) <= target)
    return None if len(hits) == 0 else run["iteration_seconds"][int(hits[0])]


def compare_with_peer(natgrad_run: dict, peer: dict) -> dict:
    """Times of natgrad (from its trace) and the peer (its whole fit) to the larger final
    deviance (used for pnmf 0.1.0, which is far slower and reaches it at its last iteration)."""
    target = max(peer["deviance"], natgrad_run["deviance"]) * (1.0 + 1e-9)
    natgrad_seconds = time_to_deviance(natgrad_run, target)
    peer_seconds = peer["seconds"]
    speedup = None if not natgrad_seconds else peer_seconds / natgrad_seconds
    return {
        "target_deviance": target,
        "natgrad_seconds": natgrad_seconds,
        "peer_seconds": peer_seconds,
        "speedup": speedup,
    }


EQUAL_DEVIANCE_SLACK = 1e-3
"""Relative slack of the common deviance target of :func:`race_sklearn`."""


def _first_fit_reaching(deviance_after: Callable[[int], float], target: float, upper: int) -> int:
    """Smallest ``n ≤ upper`` with ``deviance_after(n) ≤ target`` by bisection (``upper`` must
    reach it; assumes the deviance after ``n`` iterations falls with ``n`` near the target)."""
    low, high = 0, upper
    while high - low > 1:
        middle = (low + high) // 2
        if deviance_after(middle) <= target:
            high = middle
        else:
            low = middle
    return high


def _natgrad_fit(counts: np.ndarray, n_components: int, max_iter: int, args) -> tuple:
    """Seconds and deviance of one plain natural, lower-bound fit of ``max_iter`` iterations."""
    model = PNMF(
        n_components=n_components,
        training_mode="natural",
        mode="lower-bound",
        max_iter=max_iter,
        tol=0.0,
        random_state=args.seed,
        device="cpu",
    )
    data = counts.astype(_fit_dtype(args))
    started = time.perf_counter()
    model.fit(data)
    seconds = time.perf_counter() - started
    activations = np.exp(model.variational_mean_ + 0.5 * model.variational_variance_)
    rate = model.inverse_transform(activations).astype(np.float64)
    return seconds, poisson_deviance(counts, rate)


def race_sklearn(counts: np.ndarray, n_components: int, natgrad_run: dict, peer: dict, args):
    """Wall time of natgrad and of scikit-learn to a common deviance, timed side by side.

    The target is the larger (worse) of the two final deviances — natgrad's natural,
    lower-bound fit and scikit-learn's KL-NMF, each stopped by its own default rule (tol 1e-4)
    — times ``1 + 0.001``: equal deviance means within 0.1 % of what the worse method ends at,
    so both reach it. On the digits counts that is natgrad's: PNMF's ``N(0, 1)`` prior on
    ``F = log`` activations keeps its optimum above the unregularised KL-NMF deviance, so
    scikit-learn passes through the target on its way down while natgrad has to converge to
    within 0.1 % of its own end. For each method the iteration count ``n`` that first reaches the
    target is found (natgrad from its per-iteration deviance trace, scikit-learn by bisection
    over ``max_iter`` of identical deterministic fits); then plain fits with ``max_iter = n``
    (no callback, no tracing) are timed alternately, natgrad then scikit-learn,
    ``--race-repeats`` times each, and the best of each is reported. Both fit in the same
    precision (float32 unless ``--float64``) with the same thread limit; each time is a whole
    ``fit`` (input validation, initialisation, the final ELBO evaluation for natgrad and the
    SVD-based initialisation for scikit-learn included).
    """
    target = max(natgrad_run["deviance"], peer["deviance"]) * (1.0 + EQUAL_DEVIANCE_SLACK)
    hits = np.flatnonzero(np.asarray(natgrad_run["deviance_trace"]) <= target)
    natgrad_iterations = int(hits[0]) + 1
    dtype = _fit_dtype(args)

    def sklearn_deviance(max_iter: int) -> float:
        return _sklearn_fit(counts, n_components, max_iter, args.seed, dtype)[1]

    sklearn_iterations = _first_fit_reaching(sklearn_deviance, target, peer["iterations"])
    natgrad_times, sklearn_times, deviances = [], [], {}
    for _ in range(args.race_repeats):
        seconds, natgrad_deviance = _natgrad_fit(counts, n_components, natgrad_iterations, args)
        natgrad_times.append(seconds)
        seconds, deviance, _, _ = _sklearn_fit(
            counts, n_components, sklearn_iterations, args.seed, dtype
        )
        sklearn_times.append(seconds)
        deviances = {"natgrad": natgrad_deviance, "sklearn": deviance}
    natgrad_seconds, sklearn_seconds = min(natgrad_times), min(sklearn_times)
    return {
        "target_deviance": target,
        "natgrad_iterations": natgrad_iterations,
        "sklearn_iterations": sklearn_iterations,
        "natgrad_deviance": deviances["natgrad"],
        "sklearn_deviance": deviances["sklearn"],
        "natgrad_seconds": natgrad_seconds,
        "peer_seconds": sklearn_seconds,
        "natgrad_times": natgrad_times,
        "sklearn_times": sklearn_times,
        "speedup": sklearn_seconds / natgrad_seconds,
        "natgrad_over_sklearn": natgrad_seconds / sklearn_seconds,
    }


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "not reached"
    if isinstance(value, bool):
        return str(value)
    return format(value, spec)


def format_grid_table(runs: dict, comparisons: dict) -> str:
    """The seed's results table with every cell filled."""
    header = f"{'Metric':<34}" + "".join(f"{m:>18}" for m in ELBO_MODES)
    lines = [header, "-" * len(header)]

    def row(label: str, values: Sequence[str]) -> None:
        lines.append(f"{label:<34}" + "".join(f"{v:>18}" for v in values))

    for training_mode, title in (("standard", "Standard (Adam)"), ("natural", "Natural gradient")):
        picked = [runs[(training_mode, mode)] for mode in ELBO_MODES]
        lines.append(f"{title}")
        row("  step size", [_fmt(r["learning_rate"], "g") for r in picked])
        row("  iterations", [str(r["iterations"]) for r in picked])
        row("  final ELBO", [_fmt(r["final_elbo"]) for r in picked])
        row("  reconstruction error", [_fmt(r["reconstruction_error"], ".6f") for r in picked])
        row("  wall time (s)", [_fmt(r["seconds"]) for r in picked])
        row("  iterations to 0.1% of final", [_fmt(r["iterations_to_0.1%"], "d") for r in picked])
        row("  seconds to 0.1% of final", [_fmt(r["seconds_to_0.1%"], ".3f") for r in picked])
    lines.append("Improvement (natural vs standard)")
    picked = [comparisons[mode] for mode in ELBO_MODES]
    row("  ELBO improvement", [_fmt(c["elbo_improvement"], "+.2f") for c in picked])
    row("  ELBO improvement (%)", [_fmt(c["elbo_improvement_percent"], "+.3f") for c in picked])
    row("  speedup (iterations to 0.1%)", [_fmt(c["speedup_iterations"], ".1f") for c in picked])
    row("  speedup (seconds to 0.1%)", [_fmt(c["speedup_seconds"], ".1f") for c in picked])
    row(
        "  iters to 0.1% of best, std",
        [_fmt(c["iterations_to_0.1%_of_best_final"]["standard"], "d") for c in picked],
    )
    row(
        "  iters to 0.1% of best, natural",
        [_fmt(c["iterations_to_0.1%_of_best_final"]["natural"], "d") for c in picked],
    )
    return "\n".join(lines)


def markdown_grid_table(runs: dict, comparisons: dict) -> str:
    """The seed's results table as markdown, every cell filled."""
    header = "| Metric | Simple (MC) | Expanded (Hybrid) | Lower Bound (Analytic) |"
    lines = [header, "| --- | --- | --- | --- |"]

    def row(label: str, values: Sequence[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    for training_mode, title in (
        ("standard", "Standard training"),
        ("natural", "Natural gradient"),
    ):
        picked = [runs[(training_mode, mode)] for mode in ELBO_MODES]
        steps = " / ".join(_fmt(r["learning_rate"], "g") for r in picked)
        row(f"**{title}** (step {steps})", ["", "", ""])
        row("Iterations", [str(r["iterations"]) for r in picked])
        row("Final ELBO", [_fmt(r["final_elbo"]) for r in picked])
        row("Reconstruction error", [_fmt(r["reconstruction_error"], ".6f") for r in picked])
        row("Wall time (s)", [_fmt(r["seconds"]) for r in picked])
    picked = [comparisons[mode] for mode in ELBO_MODES]
    pairs = [(runs[("standard", m)], runs[("natural", m)]) for m in ELBO_MODES]
    row("**Improvement**", ["", "", ""])
    row(
        "ELBO improvement",
        [
            f"{_fmt(c['elbo_improvement'], '+.2f')} "
            f"({_fmt(c['elbo_improvement_percent'], '+.2f')} %)"
            for c in picked
        ],
    )
    row(
        "Iterations to 0.1 %: standard / natural",
        [
            f"{_fmt(s['iterations_to_0.1%'], 'd')} / {_fmt(n['iterations_to_0.1%'], 'd')}"
            for s, n in pairs
        ],
    )
    row("Speedup factor (iterations)", [_fmt(c["speedup_iterations"], ".1f") + "×" for c in picked])
    row("Speedup factor (wall time)", [_fmt(c["speedup_seconds"], ".1f") + "×" for c in picked])
    row(
        "Iterations to 0.1 % of best: standard / natural",
        [
            " / ".join(_fmt(c["iterations_to_0.1%_of_best_final"][t], "d") for t in TRAINING_MODES)
            for c in picked
        ],
    )
    return "\n".join(lines)


def markdown_peer_table(natgrad_run: dict, peers: dict, comparisons: dict) -> str:
    """natgrad (natural, lower-bound) and the peers as a markdown table."""
    lines = [
        "| method | seconds | deviance | rel. error | time to common deviance: natgrad / peer"
        " | natgrad speedup |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| natgrad (natural, lower-bound) | {natgrad_run['seconds']:.2f} | "
        f"{natgrad_run['deviance']:.1f} | {natgrad_run['reconstruction_error']:.4f} | | |",
    ]
    for key, peer in peers.items():
        comparison = comparisons[key]
        lines.append(
            f"| {peer['name']} | {peer['seconds']:.2f} | {peer['deviance']:.1f} | "
            f"{peer['reconstruction_error']:.4f} | {_race_times(comparison)} | "
            f"{_fmt(comparison['speedup'], '.2f')}× |"
        )
    return "\n".join(lines)


def _race_times(comparison: dict) -> str:
    """``natgrad s / peer s``, with the iterations where the comparison was raced."""
    natgrad = f"{_fmt(comparison['natgrad_seconds'], '.3f')} s"
    peer = f"{_fmt(comparison['peer_seconds'], '.3f')} s"
    if "sklearn_iterations" in comparison:
        natgrad += f" ({comparison['natgrad_iterations']} it)"
        peer += f" ({comparison['sklearn_iterations']} it)"
    return f"{natgrad} / {peer}"


def format_peer_table(natgrad_run: dict, peers: dict, comparisons: dict) -> str:
    """Wall time and deviance of natgrad (natural, lower-bound) and the peers."""
    lines = [
        f"{'method':<46}{'seconds':>10}{'deviance':>14}{'rel. error':>12}",
        f"{'natgrad PNMF natural, lower-bound':<46}{natgrad_run['seconds']:>10.2f}"
        f"{natgrad_run['deviance']:>14.1f}{natgrad_run['reconstruction_error']:>12.4f}",
    ]
    for key, peer in peers.items():
        lines.append(
            f"{peer['name']:<46}{peer['seconds']:>10.2f}{peer['deviance']:>14.1f}"
            f"{peer['reconstruction_error']:>12.4f}"
        )
        comparison = comparisons[key]
        lines.append(
            f"  to deviance {comparison['target_deviance']:.1f}: natgrad / {key} "
            f"{_race_times(comparison)}, speedup {_fmt(comparison['speedup'], '.2f')}x"
        )
    return "\n".join(lines)


def plot_grid(runs: dict, out: Path, suffix: str) -> list[Path]:
    """The seed's two figures: per-mode comparison and cross-mode ELBO comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"standard": "tab:blue", "natural": "tab:red"}
    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    for column, mode in enumerate(ELBO_MODES):
        for training_mode in TRAINING_MODES:
            run = runs[(training_mode, mode)]
            history = -np.asarray(run["elbo_history"])
            iterations = np.arange(1, len(history) + 1)
            label = f"{training_mode} ({run['iterations']} it)"
            axes[0, column].loglog(iterations, history, color=colors[training_mode], label=label)
            smoothed = np.asarray(run["smoothed_history"])
            gap = smoothed - smoothed[-1]
            axes[1, column].loglog(
                iterations, np.abs(gap) + 1e-3, color=colors[training_mode], label=training_mode
            )
        axes[0, column].set_title(f"mode = {mode!r}")
        axes[0, column].set_ylabel("−ELBO")
        axes[1, column].set_ylabel("|smoothed ELBO − its final value| + 1e-3")
        axes[1, column].set_xlabel("iteration")
        axes[0, column].legend()
        axes[1, column].legend()
    figure.tight_layout()
    comparison = out / f"natural_gradient_comparison{suffix}.png"
    figure.savefig(comparison, dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for panel, training_mode in zip(axes, TRAINING_MODES, strict=True):
        for mode in ELBO_MODES:
            run = runs[(training_mode, mode)]
            history = np.asarray(run["smoothed_history"])
            panel.semilogx(np.arange(1, len(history) + 1), history, label=mode)
        panel.set_title(f"training_mode = {training_mode!r}")
        panel.set_xlabel("iteration")
        panel.set_ylabel("ELBO (20-iteration trailing mean)")
        panel.legend()
    figure.tight_layout()
    cross = out / f"natural_gradient_elbo_comparison{suffix}.png"
    figure.savefig(cross, dpi=110)
    plt.close(figure)
    return [comparison, cross]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="natgrad bench pnmf", description=__doc__)
    parser.add_argument("--datasets", default="synthetic,digits", help="comma-separated")
    parser.add_argument("--max-iter", type=int, default=8000, help="synthetic grid (seed)")
    parser.add_argument("--digits-max-iter", type=int, default=2000, help="digits grid")
    parser.add_argument("--float64", action="store_true", help="fit in float64 (default float32)")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--E", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--standard-lr", type=float, default=0.005, help="Adam (seed: 0.005)")
    parser.add_argument("--pnmf-iter", type=int, default=300, help="pnmf 0.1.0 iterations")
    parser.add_argument("--no-peers", action="store_true", help="skip pnmf 0.1.0 and sklearn")
    parser.add_argument(
        "--race-repeats", type=int, default=7, help="timed fits each, natgrad vs sklearn"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and BLAS/OpenMP threads (all methods)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="max-iter 300, pnmf-iter 30")
    return parser


def run_dataset(
    name: str, counts: np.ndarray, n_components: int, max_iter: int, args, progress
) -> dict:
    """The 3 × 2 grid and, unless ``--no-peers``, the two peers on one data set."""
    runs = {}
    for training_mode in TRAINING_MODES:
        for mode in ELBO_MODES:
            progress.set_postfix_str(f"{name}: {training_mode}, {mode}")
            trace = training_mode == "natural" and mode == "lower-bound"
            runs[(training_mode, mode)] = run_pnmf(
                counts, n_components, training_mode, mode, max_iter, args, trace_deviance=trace
            )
            progress.update()
    comparisons = {
        mode: compare_pair(runs[("standard", mode)], runs[("natural", mode)]) for mode in ELBO_MODES
    }
    peers: dict[str, dict] = {}
    peer_comparisons: dict[str, dict] = {}
    if not args.no_peers:
        progress.set_postfix_str(f"{name}: pnmf 0.1.0")
        if importlib.util.find_spec("PNMF") is not None:
            peers["pnmf"] = run_seed_peer(counts, n_components, args)
        else:
            progress.write("pnmf 0.1.0 is not installed (pip install pnmf==0.1.0); skipped")
        progress.update()
        progress.set_postfix_str(f"{name}: scikit-learn")
        peers["sklearn"] = run_sklearn_peer(counts, n_components, args)
        progress.update()
        natgrad_run = runs[("natural", "lower-bound")]
        if "pnmf" in peers:
            peer_comparisons["pnmf"] = compare_with_peer(natgrad_run, peers["pnmf"])
        progress.set_postfix_str(f"{name}: natgrad vs scikit-learn, timed side by side")
        peer_comparisons["sklearn"] = race_sklearn(
            counts, n_components, natgrad_run, peers["sklearn"], args
        )
    return {
        "shape": list(counts.shape),
        "n_components": n_components,
        "runs": runs,
        "comparisons": comparisons,
        "peers": peers,
        "peer_comparisons": peer_comparisons,
    }


def main(argv: Sequence[str]) -> int:
    """Run the benchmark; print the tables; write JSON and plots under ``--out``."""
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    args = build_parser().parse_args(list(argv))
    if args.quick:
        args.max_iter, args.pnmf_iter = min(args.max_iter, 300), min(args.pnmf_iter, 30)
        args.digits_max_iter = min(args.digits_max_iter, 300)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    loaders = {
        "synthetic": (lambda: synthetic_counts(args.seed), 5, args.max_iter),
        "digits": (digits_counts, 10, args.digits_max_iter),
    }
    names = [name.strip() for name in args.datasets.split(",") if name.strip()]
    unknown = sorted(set(names) - set(loaders))
    if unknown:
        raise SystemExit(f"unknown dataset(s) {unknown}; choose from {sorted(loaders)}")
    per_dataset = 6 + (0 if args.no_peers else 2)
    results: dict[str, Any] = {"settings": {**vars(args), "out": str(args.out)}, "datasets": {}}
    started = time.perf_counter()
    progress = tqdm(total=per_dataset * len(names), desc="natgrad bench pnmf", unit="fit")
    with progress, threadpool_limits(limits=args.threads):
        for name in names:
            load, n_components, max_iter = loaders[name]
            results["datasets"][name] = run_dataset(
                name, load(), n_components, max_iter, args, progress
            )
    total = time.perf_counter() - started
    markdown = []
    for name, result in results["datasets"].items():
        shape = "x".join(map(str, result["shape"]))
        grid_seconds = sum(run["seconds"] for run in result["runs"].values())
        markdown += [
            f"## {name}: {shape} counts, {result['n_components']} components",
            "",
            markdown_grid_table(result["runs"], result["comparisons"]),
            "",
            f"Grid wall time: {grid_seconds:.1f} s.",
            "",
        ]
        if result["peers"]:
            natgrad_run = result["runs"][("natural", "lower-bound")]
            markdown += [
                markdown_peer_table(natgrad_run, result["peers"], result["peer_comparisons"]),
                "",
            ]
        print(f"\n== {name}: {shape} counts, {result['n_components']} components ==")
        print(format_grid_table(result["runs"], result["comparisons"]))
        print(f"grid wall time: {grid_seconds:.1f} s")
        if result["peers"]:
            print()
            natgrad_run = result["runs"][("natural", "lower-bound")]
            print(format_peer_table(natgrad_run, result["peers"], result["peer_comparisons"]))
        suffix = "" if name == "synthetic" else f"_{name}"
        for path in plot_grid(result["runs"], args.out, suffix):
            print(f"wrote {path}")
        result["runs"] = {f"{t}/{m}": run for (t, m), run in result["runs"].items()}
    precision = "float64" if args.float64 else "float32"
    print(f"\ntotal wall time: {total:.1f} s (torch threads: {args.threads}, {precision})")
    markdown_path = args.out / "pnmf_benchmark.md"
    markdown_path.write_text("\n".join(markdown))
    print(f"wrote {markdown_path}")
    json_path = args.out / "pnmf_benchmark.json"
    json_path.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {json_path}")
    return 0
