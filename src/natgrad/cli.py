"""The ``natgrad`` command line: ``natgrad info`` and ``natgrad bench NAME``."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from collections.abc import Callable, Sequence

import torch

import natgrad

_COMPONENTS = {
    "expfam": "exponential families (natural <-> mean parameters, Fisher, KL)",
    "curvature": "Fisher / GGN / Hessian operators: dense, diag, block, kfac, ekfac, implicit",
    "linalg": "damped solves, conjugate gradients, Kronecker helpers",
    "optim": "torch.optim optimizers and preconditioners",
    "models": "scikit-learn estimators (PNMF, GLMs by Fisher scoring)",
    "distributed": "torch.distributed reductions of curvature statistics",
    "rl": "natural policy gradient and TRPO on gymnasium",
    "es": "natural evolution strategies (xNES, SNES)",
}


def _info(_: argparse.Namespace) -> int:
    print(f"natgrad {natgrad.__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}")
    cuda = torch.cuda.is_available()
    print(f"devices: cpu{' cuda' if cuda else ''}  threads: {torch.get_num_threads()}")
    print("components:")
    for name, what in _COMPONENTS.items():
        try:
            module = importlib.import_module(f"natgrad.{name}")
            public = ", ".join(getattr(module, "__all__", [])) or "-"
            print(f"  {name:<12} {what}\n  {'':<12} {public}")
        except ImportError as error:
            print(f"  {name:<12} unavailable ({error})")
    return 0


def _benchmarks() -> dict[str, Callable[[Sequence[str]], int]]:
    """Benchmarks runnable as ``natgrad bench NAME``; each takes its own argv."""
    found: dict[str, Callable[[Sequence[str]], int]] = {}
    for name, module_name in (("pnmf", "natgrad.models.pnmf_benchmark"),):
        try:
            found[name] = importlib.import_module(module_name).main
        except ImportError:
            continue
    return found


def _bench(args: argparse.Namespace) -> int:
    available = _benchmarks()
    if args.name not in available:
        known = ", ".join(sorted(available)) or "none"
        raise SystemExit(f"natgrad bench: unknown benchmark {args.name!r} (available: {known})")
    return available[args.name](args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``natgrad`` command."""
    parser = argparse.ArgumentParser(prog="natgrad", description=__doc__)
    parser.add_argument("--version", action="version", version=f"natgrad {natgrad.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print the version and what is available")
    info.set_defaults(handler=_info)
    bench = commands.add_parser("bench", help="run a benchmark (e.g. `natgrad bench pnmf`)")
    bench.add_argument("name", help="benchmark name")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``natgrad`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
