"""Where to eigendecompose a K-FAC factor that lives on a GPU: on the GPU, or on the CPU with a
round trip of the matrix and its eigenvectors.

K-FAC's eigen-basis damping and EKFAC decompose every Kronecker factor at each inverse update.
The factors of layers of ordinary width are small (tens to a few hundred rows); this script
times, for each size ``d`` and stack of ``g`` matrices of that size (the optimizer decomposes
the factors of one size in one batched call):

- ``device``: ``torch.linalg.eigh`` of the stack where it lives;
- ``cpu_round_trip``: copy to the CPU, ``torch.linalg.eigh`` there, copy the values and
  vectors back;

each the median over ``--repeats`` calls (after warm-up, the device synchronised around each
call), with the largest eigenvector residual ``‖A V − V Λ‖ / ‖A‖`` of either.

Run ``python benchmarks/eigh_device.py --device cuda`` (a few seconds). Writes
``benchmarks/results/eigh_device_<device type>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from _report import environment, print_table, save_json
from _timing import synchronize

SIZES = (9, 33, 65, 129, 257, 385, 449, 513, 1025)
STACKS = (1, 4)


def random_factor_stack(count: int, size: int, device: torch.device) -> Tensor:
    """``count`` random symmetric positive definite ``size × size`` float32 matrices
    (Gram matrices of ``2 size`` Gaussian samples, like an activation covariance)."""
    generator = torch.Generator().manual_seed(size)
    samples = torch.randn(count, 2 * size, size, generator=generator)
    return (samples.mT @ samples / (2 * size)).to(device)


def on_device(matrices: Tensor) -> tuple[Tensor, Tensor]:
    return torch.linalg.eigh(matrices)


def cpu_round_trip(matrices: Tensor) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(matrices.cpu())
    return values.to(matrices.device), vectors.to(matrices.device)


def median_seconds(
    decompose: Callable[[Tensor], tuple[Tensor, Tensor]], matrices: Tensor, repeats: int
) -> float:
    """Median wall seconds of ``decompose(matrices)``, the device synchronised around each."""
    for _ in range(3):
        decompose(matrices)
    seconds = []
    for _ in range(repeats):
        synchronize(matrices.device)
        start = time.perf_counter()
        decompose(matrices)
        synchronize(matrices.device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def residual(matrices: Tensor, values: Tensor, vectors: Tensor) -> float:
    """Largest ``‖A V − V Λ‖ / ‖A‖`` over the stack."""
    error = matrices @ vectors - vectors * values.unsqueeze(-2)
    return float((error.flatten(1).norm(dim=1) / matrices.flatten(1).norm(dim=1)).max())


def row(size: int, count: int, device: torch.device, repeats: int) -> dict:
    matrices = random_factor_stack(count, size, device)
    device_seconds = median_seconds(on_device, matrices, repeats)
    trip_seconds = median_seconds(cpu_round_trip, matrices, repeats)
    return {
        "d": size,
        "stack": count,
        "device_ms": 1e3 * device_seconds,
        "cpu_round_trip_ms": 1e3 * trip_seconds,
        "device_over_round_trip": device_seconds / trip_seconds,
        "device_residual": residual(matrices, *on_device(matrices)),
        "round_trip_residual": residual(matrices, *cpu_round_trip(matrices)),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row(size, count, args.device, args.repeats) for size in SIZES for count in STACKS]
    print_table(
        f"eigh of float32 SPD stacks on {args.device} vs a CPU round trip "
        f"({args.threads} CPU thread(s); median of {args.repeats} calls)",
        rows,
        list(rows[0]),
    )
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    save_json(
        f"eigh_device_{args.device.type}",
        {"environment": environment(device=device_name, repeats=args.repeats), "rows": rows},
    )
    return rows


if __name__ == "__main__":
    main()
