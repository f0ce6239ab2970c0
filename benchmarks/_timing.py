"""Timing of training steps against a reference step, interleaved so that the machine's drift
falls on both alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable

import torch

Step = Callable[[], None]


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously to the host clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(step: Step, steps: int) -> float:
    """Mean wall seconds of ``steps`` calls of ``step``."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def interleaved_costs(
    reference: Step, steppers: dict[Hashable, Step], steps: int, rounds: int
) -> tuple[float, dict[Hashable, tuple[float, float]]]:
    """In each of ``rounds`` rounds, every stepper timed over ``steps`` steps right after the
    ``reference``. Returns the reference's median seconds per step and, per stepper, its median
    seconds per step and the median of its ratios to the reference timed just before it."""
    base: list[float] = []
    seconds: dict[Hashable, list[float]] = {key: [] for key in steppers}
    ratios: dict[Hashable, list[float]] = {key: [] for key in steppers}
    for _ in range(rounds):
        for key, step in steppers.items():
            reference_seconds = seconds_per_step(reference, steps)
            measured = seconds_per_step(step, steps)
            base.append(reference_seconds)
            seconds[key].append(measured)
            ratios[key].append(measured / reference_seconds)
    costs = {
        key: (statistics.median(seconds[key]), statistics.median(ratios[key])) for key in steppers
    }
    return statistics.median(base), costs


def cost_rows(
    base: float,
    costs: dict[Hashable, tuple[float, float]],
    describe: Callable[[Hashable | None], dict],
) -> list[dict]:
    """Table rows of :func:`interleaved_costs`' results: the reference's (``describe(None)``)
    and each stepper's (``describe(key)``), with milliseconds per step and the ratio."""
    rows = [describe(None) | {"ms_per_step": 1e3 * base, "x_sgd": 1.0}]
    for key, (seconds, ratio) in costs.items():
        rows.append(describe(key) | {"ms_per_step": 1e3 * seconds, "x_sgd": ratio})
    return rows
