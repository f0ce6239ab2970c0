"""Per-call time of the exponential families' log_prob, entropy, kl, fisher and mean_params.

For every family of :mod:`natgrad.expfam`, batch sizes 1, 1000 and 100000 and float32 and
float64, each function is timed against its ``torch.distributions`` equivalent where one exists
(``fisher`` and ``mean_params`` have none; the Poisson has no entropy): both are timed in
alternation, ``--rounds`` times, and the medians of the times and of the ratios natgrad/torch
are reported. One torch thread, timed by the CPU time of the calling thread
(``time.thread_time``), which the other processes of a shared machine disturb far less than
the wall time. The parameters are log-uniform over a few decades, so that the
branches of the families (Stirling's form from concentration 10, the series of ``φ`` for nearby
distributions) are all taken; ``q`` is ``p`` with each parameter scaled by ``e^{U(−½, ½)}``, so
that about half of the KL terms are nearby, and the points of ``log_prob`` are samples of ``p``.

``--baseline results.json`` (a run of this script, e.g. on the previous source through
``PYTHONPATH``) adds its times and the speed-up, taken as the ratio of the two runs' ratios to
torch (which cancels the drift of a shared machine between the runs).

Usage: ``python benchmarks/expfam_speed.py [--sizes 1 1000 100000] [--dtypes float32 float64]
[--functions kl ...] [--rounds 5] [--name expfam_speed] [--baseline before.json]
[--results-dir DIR]``. Writes
``<results-dir>/<name>.{md,json}`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from _report import RESULTS_DIR, environment, markdown_table, print_table
from natgrad.expfam import (
    Bernoulli,
    Beta,
    Categorical,
    Dirichlet,
    Gamma,
    Gaussian,
    MultivariateGaussian,
    Poisson,
)

FUNCTIONS = ("log_prob", "entropy", "kl", "fisher", "mean_params")
#: Seconds of calls per timed measurement (at least one call).
MEASUREMENT_SECONDS = 0.02
CLASSES = 3
DIMENSION = 3

Call = Callable[[], object]


def _log_uniform(generator: torch.Generator, shape, low: float, high: float, dtype) -> torch.Tensor:
    exponent = low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)
    return (10.0**exponent).to(dtype)


def _perturbed(generator: torch.Generator, value: torch.Tensor) -> torch.Tensor:
    factor = torch.exp(torch.rand(value.shape, generator=generator, dtype=torch.float64) - 0.5)
    return value * factor.to(value.dtype)


def _pairs(size: int, dtype: torch.dtype, generator: torch.Generator) -> dict[str, tuple]:
    """Per family: ``(p, q)`` of batch shape ``(size,)``."""

    def scales(*shape: int, low: float = -1.0, high: float = 3.0) -> torch.Tensor:
        return _log_uniform(generator, (size, *shape), low, high, dtype)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn((size, *shape), generator=generator, dtype=torch.float64).to(dtype)

    concentration, rate = scales(), scales(low=-1.0, high=1.0)
    a, b, alphas = scales(), scales(), scales(CLASSES)
    loc, scale, rates = normal(), scales(low=-1.0, high=1.0), scales(low=-1.0, high=2.0)
    logits, class_logits = 3.0 * normal(), 3.0 * normal(CLASSES)
    factor = normal(DIMENSION, DIMENSION)
    covariance = factor @ factor.transpose(-1, -2) + torch.eye(DIMENSION, dtype=dtype)
    step = 0.3 * normal(DIMENSION, DIMENSION)
    other_covariance = covariance + step @ step.transpose(-1, -2)
    vector_loc = normal(DIMENSION)
    return {
        "Gaussian": (
            Gaussian(loc, scale),
            Gaussian(loc + 0.3 * normal(), _perturbed(generator, scale)),
        ),
        "MultivariateGaussian": (
            MultivariateGaussian(vector_loc, covariance),
            MultivariateGaussian(vector_loc + 0.3 * normal(DIMENSION), other_covariance),
        ),
        "Bernoulli": (Bernoulli(logits=logits), Bernoulli(logits=logits + 0.5 * normal())),
        "Categorical": (
            Categorical(logits=class_logits),
            Categorical(logits=class_logits + 0.5 * normal(CLASSES)),
        ),
        "Poisson": (Poisson(rates), Poisson(_perturbed(generator, rates))),
        "Gamma": (
            Gamma(concentration, rate),
            Gamma(_perturbed(generator, concentration), _perturbed(generator, rate)),
        ),
        "Beta": (Beta(a, b), Beta(_perturbed(generator, a), _perturbed(generator, b))),
        "Dirichlet": (Dirichlet(alphas), Dirichlet(_perturbed(generator, alphas))),
    }


def _calls(p, q, generator: torch.Generator) -> dict[str, tuple[Call, Call | None]]:
    """Per function: the natgrad call and the ``torch.distributions`` one (or ``None``)."""
    torch_p, torch_q = p.to_torch(), q.to_torch()
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    x = torch_p.sample()
    if isinstance(p, Gamma | Beta | Dirichlet):
        x = x.clamp(min=torch.finfo(x.dtype).tiny)
    if isinstance(p, Beta):
        x = x.clamp(max=1.0 - torch.finfo(x.dtype).eps)
    torch_entropy = None if isinstance(p, Poisson) else torch_p.entropy
    return {
        "log_prob": (lambda: p.log_prob(x), lambda: torch_p.log_prob(x)),
        "entropy": (p.entropy, torch_entropy),
        "kl": (lambda: p.kl(q), lambda: torch.distributions.kl_divergence(torch_p, torch_q)),
        "fisher": (p.fisher, None),
        "mean_params": (lambda: p.mean_params, None),
    }


def _seconds(call: Call, repeats: int) -> float:
    start = time.thread_time()
    for _ in range(repeats):
        call()
    return (time.thread_time() - start) / repeats


def _repeats(call: Call) -> int:
    """Calls per measurement: enough for ``MEASUREMENT_SECONDS`` (after a warm-up call)."""
    call()
    once = _seconds(call, 1)
    return max(1, int(MEASUREMENT_SECONDS / max(once, 1e-7)))


def time_pair(natgrad: Call, reference: Call | None, rounds: int) -> dict[str, float | None]:
    """Median microseconds per call of both, measured alternately, and the median ratio."""
    natgrad_repeats = _repeats(natgrad)
    reference_repeats = _repeats(reference) if reference is not None else 0
    ours, theirs, ratios = [], [], []
    for _ in range(rounds):
        ours.append(_seconds(natgrad, natgrad_repeats))
        if reference is not None:
            theirs.append(_seconds(reference, reference_repeats))
            ratios.append(ours[-1] / theirs[-1])
    return {
        "natgrad_us": 1e6 * statistics.median(ours),
        "torch_us": 1e6 * statistics.median(theirs) if theirs else None,
        "x_torch": statistics.median(ratios) if ratios else None,
    }


def measure(
    sizes: list[int], dtypes: list[torch.dtype], rounds: int, functions: list[str] | None = None
) -> list[dict]:
    """One row per family, function (all, or those in ``functions``), size and dtype."""
    rows = []
    for dtype in dtypes:
        for size in sizes:
            generator = torch.Generator().manual_seed(size)
            for family, (p, q) in _pairs(size, dtype, generator).items():
                for function, (ours, theirs) in _calls(p, q, generator).items():
                    if functions is not None and function not in functions:
                        continue
                    timing = time_pair(ours, theirs, rounds)
                    row = {"family": family, "function": function, "size": size}
                    rows.append(row | {"dtype": str(dtype).removeprefix("torch.")} | timing)
                print(f"{dtype} {size}: {family} done", file=sys.stderr, flush=True)
    return rows


def _key(row: dict) -> tuple:
    return row["family"], row["function"], row["size"], row["dtype"]


def add_baseline(rows: list[dict], baseline_path: Path) -> None:
    """Add the baseline's ``before_us`` and ``speedup`` (ratio of the ratios to torch where
    both have one, else of the times) to each row."""
    before = {_key(row): row for row in json.loads(baseline_path.read_text())["rows"]}
    for row in rows:
        old = before.get(_key(row))
        row["before_us"] = old["natgrad_us"] if old else None
        if old is None:
            row["speedup"] = None
        elif row["x_torch"] is not None and old["x_torch"] is not None:
            row["speedup"] = old["x_torch"] / row["x_torch"]
        else:
            row["speedup"] = old["natgrad_us"] / row["natgrad_us"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 1000, 100000])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--functions", nargs="+", choices=FUNCTIONS, default=None)
    parser.add_argument("--name", default="expfam_speed")
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dtypes = [getattr(torch, name) for name in args.dtypes]
    rows = measure(args.sizes, dtypes, args.rounds, args.functions)
    columns = ["family", "function", "size", "dtype", "natgrad_us", "torch_us", "x_torch"]
    if args.baseline is not None:
        add_baseline(rows, args.baseline)
        columns += ["before_us", "speedup"]
    title = "Exponential families: microseconds per call (median), natgrad / torch.distributions"
    print_table(title, rows, columns)
    settings = {
        "sizes": args.sizes,
        "dtypes": args.dtypes,
        "rounds": args.rounds,
        "functions": args.functions or list(FUNCTIONS),
    }
    payload = {"environment": environment(**settings), "rows": rows}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.name}.json").write_text(json.dumps(payload, indent=2))
    markdown = args.results_dir / f"{args.name}.md"
    markdown.write_text(f"# {title}\n\n{markdown_table(rows, columns)}\n")
    print(f"wrote {markdown} and {args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
