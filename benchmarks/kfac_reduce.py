"""K-FAC-reduce against K-FAC-expand (KFC) for convolutions: the cost of building the factors
and of a training step, on the digits CNN of ``kfac_digits.py`` and on a CNN of CIFAR-10's shape.

Both approximations of a weight-shared layer's Fisher block are in natgrad
(``kfac_approx="expand" | "reduce"``, Eschenhagen et al. 2023). Expand builds a convolution's
input factor from the ``C·k_h·k_w × N·T`` patches (``T`` output positions per image), reduce
from their ``C·k_h·k_w × N`` means over the positions, which natgrad sums from the strided
windows without gathering the patches. This script measures what that saves:

- **Factor build**: one call of ``natgrad.curvature.kfac.build_kfac`` (empirical Fisher) and of
  curvlinops' ``KFACLinearOperator.compute_kronecker_factors`` with either setting, median of
  ``--repeats`` calls.
- **Step cost**: a K-FAC-preconditioned SGD-momentum step (forward, backward, factor and
  inverse updates as scheduled, preconditioning, update; empirical Fisher, factored damping)
  relative to a plain SGD-momentum step timed in the same round, with factors and inverses
  every step (1/1) and every 10 steps (10/10); median over ``--rounds`` interleaved rounds of
  ``--steps`` steps.

Models: ``digits`` is ``kfac_digits.cnn`` on 8×8 digits (batch 64); ``cifar`` is a CNN for
3×32×32 inputs (two 3×3 convolutions of 32 and 64 channels, the second strided, global average
pooling and a linear head; batch 128) on random images, since only the cost is measured.
Whether reduce needs more steps is measured by ``kfac_digits.py --tasks cnn --kfac-approx
reduce`` (BENCHMARKS.md).

Run ``python benchmarks/kfac_reduce.py`` (about 2 minutes with 1 torch thread). Writes
``benchmarks/results/kfac_reduce.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import kfac_digits
from _report import environment, print_table, save_json
from _timing import cost_rows, interleaved_costs
from natgrad.curvature.kfac import build_kfac
from natgrad.optim import KFAC

APPROXIMATIONS = ("expand", "reduce")
INTERVALS = (1, 10)


def cifar_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def problems() -> dict[str, tuple[Callable[[], nn.Module], Tensor, Tensor]]:
    """Model builder, a batch of inputs and its labels, per model name."""
    data = kfac_digits.load_data(0)
    task = next(task for task in kfac_digits.TASKS if task.name == "cnn")
    digits_inputs, digits_labels = kfac_digits.batch_of(task, data)
    generator = torch.Generator().manual_seed(0)
    cifar_inputs = torch.randn(128, 3, 32, 32, generator=generator)
    cifar_labels = torch.randint(0, 10, (128,), generator=generator)
    return {
        "digits": (kfac_digits.cnn, digits_inputs, digits_labels),
        "cifar": (cifar_cnn, cifar_inputs, cifar_labels),
    }


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def factor_builds(name: str, build, inputs: Tensor, labels: Tensor, repeats: int) -> list[dict]:
    """Milliseconds to build the factors of one batch, per library and approximation."""
    from curvlinops import KFACLinearOperator

    torch.manual_seed(0)
    model = build()
    params = list(model.parameters())
    rows = []
    for approx in APPROXIMATIONS:

        def natgrad_build(approx: str = approx) -> object:
            return build_kfac(
                model,
                inputs,
                likelihood="categorical",
                kind="empirical",
                targets=labels,
                kfac_approx=approx,
            )

        def curvlinops_build(approx: str = approx) -> None:
            KFACLinearOperator(
                model,
                nn.CrossEntropyLoss(),
                params,
                [(inputs, labels)],
                fisher_type="empirical",
                kfac_approx=approx,
                check_deterministic=False,
            ).compute_kronecker_factors()

        for library, call in (("natgrad", natgrad_build), ("curvlinops", curvlinops_build)):
            seconds = median_seconds(call, repeats)
            rows.append(
                {"model": name, "library": library, "kfac_approx": approx, "ms": 1e3 * seconds}
            )
    return rows


def kfac_step(
    model: nn.Module, inputs: Tensor, labels: Tensor, interval: int | None, **options
) -> Callable[[], None]:
    """A training step of SGD-momentum on the cross-entropy of one batch, preconditioned by
    K-FAC (empirical Fisher, factored damping 0.03, factor EMA 0.8, factors and inverses every
    ``interval`` steps; ``options`` add to or override these) unless ``interval`` is None."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    precond = None
    if interval is not None:
        settings = {"damping": 0.03, "damping_mode": "factored", "factor_decay": 0.8}
        intervals = {"factor_update_interval": interval, "inv_update_interval": interval}
        precond = KFAC(model, **(settings | intervals | options))

    def step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        if precond is not None:
            precond.step()
        optimizer.step()

    return step


def stepper(build, inputs: Tensor, labels: Tensor, approx: str | None, interval: int):
    """A training step: SGD-momentum, preconditioned by K-FAC unless ``approx`` is None."""
    torch.manual_seed(0)
    step = kfac_step(
        build(), inputs, labels, None if approx is None else interval, kfac_approx=approx
    )
    for _ in range(10):
        step()
    return step


def step_costs(name: str, build, inputs: Tensor, labels: Tensor, steps: int, rounds: int):
    """Per-step milliseconds and the ratio to SGD's step of the same round."""
    sgd = stepper(build, inputs, labels, None, 1)
    keys = [(approx, interval) for interval in INTERVALS for approx in APPROXIMATIONS]
    steppers = {key: stepper(build, inputs, labels, *key) for key in keys}
    base, costs = interleaved_costs(sgd, steppers, steps, rounds)

    def describe(key: tuple[str, int] | None) -> dict:
        if key is None:
            return {"model": name, "method": "sgd", "intervals": ""}
        approx, interval = key
        return {"model": name, "method": f"kfac {approx}", "intervals": f"{interval}/{interval}"}

    return cost_rows(base, costs, describe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="factor builds timed (default 20)")
    parser.add_argument("--steps", type=int, default=50, help="steps per timing (default 50)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    builds, costs = [], []
    for name, (build, inputs, labels) in problems().items():
        builds.extend(factor_builds(name, build, inputs, labels, args.repeats))
        costs.extend(step_costs(name, build, inputs, labels, args.steps, args.rounds))
    print_table(
        "Building the K-FAC factors of one batch (ms)",
        builds,
        ["model", "library", "kfac_approx", "ms"],
    )
    print_table(
        "Cost of a K-FAC step (empirical Fisher, factored damping) relative to SGD-momentum",
        costs,
        ["model", "method", "intervals", "ms_per_step", "x_sgd"],
    )
    save_json(
        "kfac_reduce",
        {
            "environment": environment(repeats=args.repeats, steps=args.steps, rounds=args.rounds),
            "factor_build": builds,
            "step_cost": costs,
        },
    )


if __name__ == "__main__":
    main()
