"""Cost of curvature: natgrad vs curvlinops vs BackPACK on an MLP and a small CNN (issue 2).

For each model, on the same data, in the same process and float32, with the same thread count,
warm-up and repetitions, the script times

- one gradient (forward + backward of the mean cross-entropy, ``torch.autograd.grad``);
- one Fisher-vector product: natgrad ``fisher(structure="implicit").mv`` (operator built once,
  and built + one product), natgrad ``ggn(structure="implicit").mv``, curvlinops
  ``GGNLinearOperator @ v`` (each product re-runs the forward pass);
- the diagonal Fisher, exact and Monte Carlo (one sampled label per input): natgrad
  ``structure="diag"`` vs BackPACK ``DiagGGNExact`` / ``DiagGGNMC`` (curvlinops has no exact
  diagonal, only stochastic estimators);
- K-FAC factors, exact and Monte Carlo: natgrad ``structure="kfac"`` vs curvlinops
  ``KFACLinearOperator`` (``FisherType.TYPE2`` / ``MC``) vs BackPACK ``KFLR`` / ``KFAC``;
- EKFAC (exact): natgrad ``structure="ekfac"`` vs curvlinops ``EKFACLinearOperator``.

Conventions are matched so that every library computes the same matrix: the categorical
Fisher is the GGN of ``nn.CrossEntropyLoss(reduction="mean")`` (the MEAN over data points),
curvlinops folds the bias into the input factor (``separate_weight_and_bias=False``) and uses
KFAC-expand for convolutions, as natgrad does. BackPACK's K-FAC for ``Conv2d`` is another
approximation (``G`` from location-summed output gradients, ``A`` without the ``1/T`` of KFC;
see ``backpack/extensions/secondorder/hbp/convnd.py``), so only its ``Linear`` layers are
compared; its bias factor is not compared either (weight block only). Before timing is
trusted the results are compared: the relative Frobenius error of each peer's result to
natgrad's (Fisher-vector product and EKFAC product on a fixed random vector, diagonal, and per
layer the Kronecker product ``G ⊗ A``, worst layer). Monte-Carlo rows are compared with
natgrad's *exact* result, so their error is sampling noise of the same size for every library.

Times are medians over ``--repeats`` interleaved rounds (every method once per round, so load
from other processes on the machine hits all methods alike; a method faster than 50 ms is
called several times in a row and the mean per call taken, as ``timeit`` does) after
``--warmup`` calls each, at ``torch.set_num_threads(t)`` for each ``t`` of ``--threads`` (2 by
default). Ratios: to one gradient of the same model and thread count, and to the fastest peer
(curvlinops or BackPACK) for the same quantity; a peer whose result is not finite is flagged
and not counted as a peer. Writes ``benchmarks/results/curvature_cost.json``.

    python benchmarks/curvature_cost.py [--repeats 5] [--warmup 1] [--threads 2 [1 ...]]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import backpack
import torch
from backpack import extend
from backpack.extensions import KFAC as BackpackKFAC
from backpack.extensions import KFLR, DiagGGNExact, DiagGGNMC
from curvlinops import (
    EKFACLinearOperator,
    FisherType,
    GGNLinearOperator,
    KFACLinearOperator,
)
from sklearn.datasets import load_digits
from torch import Tensor, nn

import natgrad
from _report import environment, print_table, save_json

NAME = "curvature_cost"
BATCH = 256
PEERS = ("curvlinops", "BackPACK")
COLUMNS = (
    "quantity",
    "library",
    "call",
    "median ms",
    "x gradient",
    "x fastest peer",
    "rel. err.",
    "note",
)
MIN_SAMPLE_SECONDS = 0.05
"""A timing sample of a fast method repeats it until it lasts at least this long."""
CONV_NOTE = "Linear layer only (conv: other convention)"
KroneckerFactors = list[tuple[Tensor, Tensor] | None]
"""Per layer ``(G, A)``, ``A`` with or without the folded bias row/column; ``None`` for a layer
whose factors follow another convention and are not compared."""


@dataclass
class Problem:
    """A model, its inputs and labels, and the random vector products are taken with."""

    name: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    vector: Tensor

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())


@dataclass
class Method:
    """One timed call: ``run()`` computes the quantity, ``result(output)`` makes it comparable.

    ``reference`` names the quantity whose natgrad result this one is compared with (the exact
    one for Monte-Carlo rows); ``None`` for rows that are not compared.
    """

    quantity: str
    library: str
    call: str
    run: Callable[[], Any]
    result: Callable[[Any], Any] | None = None
    reference: str | None = None
    note: str = ""


# -- problems ------------------------------------------------------------------------------------
def digits_batch() -> tuple[Tensor, Tensor]:
    """The first ``BATCH`` digits: pixels scaled to [0, 1], shape ``(BATCH, 64)``, and labels."""
    digits = load_digits()
    inputs = torch.tensor(digits.data[:BATCH], dtype=torch.float32) / 16.0
    return inputs, torch.tensor(digits.target[:BATCH], dtype=torch.long)


def make_problems(seed: int = 0) -> list[Problem]:
    """MLP 64-256-256-10 on flat digits and a Conv-ReLU-Conv-ReLU-Linear CNN on 1×8×8 digits."""
    inputs, targets = digits_batch()
    torch.manual_seed(seed)
    mlp = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )
    problems = []
    for name, model, batch in (
        ("MLP 64-256-256-10", mlp, inputs),
        ("CNN conv16-conv32-linear", cnn, inputs.reshape(-1, 1, 8, 8)),
    ):
        size = sum(param.numel() for param in model.parameters())
        vector = torch.randn(size, generator=torch.Generator().manual_seed(seed))
        problems.append(Problem(name, model, batch, targets, vector))
    return problems


# -- comparison ----------------------------------------------------------------------------------
def relative_error(value: Tensor, reference: Tensor) -> float:
    """``‖value − reference‖_F / ‖reference‖_F``, in float64."""
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm())


def kronecker_relative_error(value: KroneckerFactors, reference: KroneckerFactors) -> float:
    """Worst layer's ``‖G⊗A − G'⊗A'‖_F / ‖G'⊗A'‖_F`` on the weight block, without forming it.

    With ``ΔG = G − G'`` and ``ΔA = A − A'``, ``G⊗A − G'⊗A' = ΔG⊗A + G'⊗ΔA``, whose squared
    norm ``‖ΔG‖²‖A‖² + ‖G'‖²‖ΔA‖² + 2⟨ΔG, G'⟩⟨A, ΔA⟩`` has no cancellation (uses
    ``⟨X⊗Y, U⊗V⟩ = ⟨X, U⟩⟨Y, V⟩``). When only one side has the bias folded into ``A``, both are
    cut to the weight block ``A[:d, :d]``. Layers that ``value`` marks ``None`` are skipped.
    """
    errors = []
    for pair, (g_ref, a_ref) in zip(value, reference, strict=True):
        if pair is None:
            continue
        g, a = pair
        size = min(a.shape[0], a_ref.shape[0])
        g, a, g_ref, a_ref = (m.double() for m in (g, a[:size, :size], g_ref, a_ref[:size, :size]))
        dg, da = g - g_ref, a - a_ref
        error_sq = (
            dg.square().sum() * a.square().sum()
            + g_ref.square().sum() * da.square().sum()
            + 2 * (dg * g_ref).sum() * (a * da).sum()
        )
        ref_sq = g_ref.square().sum() * a_ref.square().sum()
        errors.append(float(error_sq.clamp_min(0).sqrt() / ref_sq.sqrt()))
    return max(errors)


def compare(value: Any, reference: Any) -> float:
    if isinstance(value, Tensor):
        return relative_error(value, reference)
    return kronecker_relative_error(value, reference)


# -- natgrad -------------------------------------------------------------------------------------
def natgrad_methods(problem: Problem) -> list[Method]:
    model, inputs, targets, vector = problem.model, problem.inputs, problem.targets, problem.vector

    def fisher(structure: str, kind: str = "exact") -> Any:
        generator = torch.Generator().manual_seed(0) if kind == "mc" else None
        return natgrad.fisher(
            model,
            inputs,
            likelihood="categorical",
            kind=kind,
            structure=structure,
            generator=generator,
        )

    implicit = fisher("implicit")
    implicit_ggn = natgrad.ggn(model, inputs, nn.CrossEntropyLoss(), targets, structure="implicit")

    def factors(operator: Any) -> KroneckerFactors:
        return list(zip(operator.output_factors, operator.input_factors, strict=True))

    return [
        Method(
            "Fisher-vector product",
            "natgrad",
            "fisher(implicit).mv (built once)",
            lambda: implicit.mv(vector),
            lambda out: out,
            "Fisher-vector product",
        ),
        Method(
            "Fisher-vector product",
            "natgrad",
            "fisher(implicit) build + mv",
            lambda: fisher("implicit").mv(vector),
        ),
        Method(
            "Fisher-vector product",
            "natgrad",
            "ggn(implicit, CE).mv (built once)",
            lambda: implicit_ggn.mv(vector),
            lambda out: out,
            "Fisher-vector product",
        ),
        Method(
            "diag (exact)",
            "natgrad",
            'fisher(structure="diag")',
            lambda: fisher("diag"),
            lambda out: out.diag(),
            "diag (exact)",
        ),
        Method(
            "diag (MC, 1 sample)",
            "natgrad",
            'fisher(structure="diag", kind="mc")',
            lambda: fisher("diag", "mc"),
            lambda out: out.diag(),
            "diag (exact)",
        ),
        Method(
            "K-FAC factors (exact)",
            "natgrad",
            'fisher(structure="kfac")',
            lambda: fisher("kfac"),
            factors,
            "K-FAC factors (exact)",
        ),
        Method(
            "K-FAC factors (MC, 1 sample)",
            "natgrad",
            'fisher(structure="kfac", kind="mc")',
            lambda: fisher("kfac", "mc"),
            factors,
            "K-FAC factors (exact)",
        ),
        Method(
            "EKFAC (exact)",
            "natgrad",
            'fisher(structure="ekfac")',
            lambda: fisher("ekfac"),
            lambda out: out.mv(vector),
            "EKFAC (exact)",
        ),
    ]


# -- curvlinops ----------------------------------------------------------------------------------
def curvlinops_methods(problem: Problem) -> list[Method]:
    model, params, vector = problem.model, problem.params, problem.vector
    data = [(problem.inputs, problem.targets)]
    loss = nn.CrossEntropyLoss(reduction="mean")
    common = {"check_deterministic": False, "num_data": BATCH}
    kfac_options = {
        **common,
        "num_per_example_loss_terms": 1,
        "separate_weight_and_bias": False,
    }
    ggn = GGNLinearOperator(model, loss, params, data, **common)

    def kfac(fisher_type: str) -> KFACLinearOperator:
        operator = KFACLinearOperator(
            model, loss, params, data, fisher_type=fisher_type, **kfac_options
        )
        operator.compute_kronecker_factors()
        return operator

    def ekfac() -> EKFACLinearOperator:
        operator = EKFACLinearOperator(
            model, loss, params, data, fisher_type=FisherType.TYPE2, **kfac_options
        )
        operator.compute_eigenvalue_correction()
        return operator

    def factors(operator: KFACLinearOperator) -> KroneckerFactors:
        state = operator.state_dict()
        names = [name for name, _ in model.named_modules() if name in state["input_covariances"]]
        return [
            (state["gradient_covariances"][name], state["input_covariances"][name])
            for name in names
        ]

    return [
        Method(
            "Fisher-vector product",
            "curvlinops",
            "GGNLinearOperator @ v",
            lambda: ggn @ vector,
            lambda out: out,
            "Fisher-vector product",
        ),
        Method(
            "K-FAC factors (exact)",
            "curvlinops",
            "KFACLinearOperator(TYPE2)",
            lambda: kfac(FisherType.TYPE2),
            factors,
            "K-FAC factors (exact)",
        ),
        Method(
            "K-FAC factors (MC, 1 sample)",
            "curvlinops",
            "KFACLinearOperator(MC)",
            lambda: kfac(FisherType.MC),
            factors,
            "K-FAC factors (exact)",
        ),
        Method(
            "EKFAC (exact)",
            "curvlinops",
            "EKFACLinearOperator(TYPE2)",
            ekfac,
            lambda out: out @ vector,
            "EKFAC (exact)",
        ),
    ]


# -- BackPACK ------------------------------------------------------------------------------------
def backpack_methods(problem: Problem) -> list[Method]:
    model = extend(copy.deepcopy(problem.model))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="mean"))
    inputs, targets = problem.inputs, problem.targets

    def backward_with(extension: Any) -> list[nn.Parameter]:
        model.zero_grad(set_to_none=True)
        with backpack.backpack(extension):
            loss_fn(model(inputs), targets).backward()
        return list(model.parameters())

    def diagonal(savefield: str) -> Callable[[list[nn.Parameter]], Tensor]:
        return lambda params: torch.cat([getattr(p, savefield).reshape(-1) for p in params])

    def factors(savefield: str) -> Callable[[list[nn.Parameter]], KroneckerFactors]:
        def weight_factors(params: list[nn.Parameter]) -> KroneckerFactors:
            pairs: KroneckerFactors = []
            for module in model.modules():
                if isinstance(module, nn.Conv2d):
                    pairs.append(None)
                elif isinstance(module, nn.Linear):
                    pairs.append(tuple(getattr(module.weight, savefield)))
            return pairs

        return weight_factors

    has_conv = any(isinstance(module, nn.Conv2d) for module in model.modules())
    kfac_note = CONV_NOTE if has_conv else ""

    return [
        Method(
            "diag (exact)",
            "BackPACK",
            "DiagGGNExact",
            lambda: backward_with(DiagGGNExact()),
            diagonal("diag_ggn_exact"),
            "diag (exact)",
        ),
        Method(
            "diag (MC, 1 sample)",
            "BackPACK",
            "DiagGGNMC",
            lambda: backward_with(DiagGGNMC()),
            diagonal("diag_ggn_mc"),
            "diag (exact)",
        ),
        Method(
            "K-FAC factors (exact)",
            "BackPACK",
            "KFLR",
            lambda: backward_with(KFLR()),
            factors("kflr"),
            "K-FAC factors (exact)",
            kfac_note,
        ),
        Method(
            "K-FAC factors (MC, 1 sample)",
            "BackPACK",
            "KFAC",
            lambda: backward_with(BackpackKFAC()),
            factors("kfac"),
            "K-FAC factors (exact)",
            kfac_note,
        ),
    ]


# -- timing --------------------------------------------------------------------------------------
def gradient_method(problem: Problem) -> Method:
    model, inputs, targets, params = problem.model, problem.inputs, problem.targets, problem.params

    def gradient() -> tuple[Tensor, ...]:
        loss = nn.functional.cross_entropy(model(inputs), targets)
        return torch.autograd.grad(loss, params)

    return Method("gradient", "torch", "autograd.grad(CE(model(x), y))", gradient)


def calls_per_sample(method: Method) -> int:
    """Calls that make one timing sample last at least ``MIN_SAMPLE_SECONDS`` (as ``timeit``)."""
    start = time.perf_counter()
    method.run()
    elapsed = time.perf_counter() - start
    return max(1, math.ceil(MIN_SAMPLE_SECONDS / max(elapsed, 1e-9)))


def median_times(methods: list[Method], repeats: int, warmup: int) -> list[float]:
    """Median seconds per call of each method over ``repeats`` rounds.

    Each round times every method once, in turn, so that load from other processes hits all
    methods alike; a fast method is called several times in a row per sample (mean per call).
    """
    for method in methods:
        for _ in range(warmup):
            method.run()
    numbers = [calls_per_sample(method) for method in methods]
    samples: list[list[float]] = [[] for _ in methods]
    for _ in range(repeats):
        for method, number, times in zip(methods, numbers, samples, strict=True):
            start = time.perf_counter()
            for _ in range(number):
                method.run()
            times.append((time.perf_counter() - start) / number)
    return [statistics.median(times) for times in samples]


def errors_against_natgrad(methods: list[Method]) -> list[float | None]:
    """Relative error of each method's result to natgrad's result for its reference quantity."""
    results = [None if m.result is None else m.result(m.run()) for m in methods]
    natgrad_results: dict[str, Any] = {}
    for method, result in zip(methods, results, strict=True):
        if (
            method.library == "natgrad"
            and result is not None
            and method.quantity == method.reference
        ):
            natgrad_results.setdefault(method.quantity, result)
    errors: list[float | None] = []
    for method, result in zip(methods, results, strict=True):
        reference = natgrad_results.get(method.reference)
        if result is None or reference is None or result is reference:
            errors.append(None)
        else:
            errors.append(compare(result, reference))
    return errors


def benchmark(problem: Problem, repeats: int, warmup: int) -> list[dict[str, Any]]:
    """Time every method on ``problem`` and compare its result with natgrad's; one row each."""
    methods = [
        gradient_method(problem),
        *natgrad_methods(problem),
        *curvlinops_methods(problem),
        *backpack_methods(problem),
    ]
    methods.sort(key=lambda m: (_quantity_order(m.quantity), m.library != "natgrad"))
    errors = errors_against_natgrad(methods)
    seconds = median_times(methods, repeats, warmup)
    gradient_seconds = seconds[0]
    fastest_peer: dict[str, float] = {}
    for method, elapsed, error in zip(methods, seconds, errors, strict=True):
        valid = error is None or math.isfinite(error)
        if method.library in PEERS and valid:
            fastest_peer[method.quantity] = min(elapsed, fastest_peer.get(method.quantity, elapsed))
    rows = []
    for method, elapsed, error in zip(methods, seconds, errors, strict=True):
        peer = fastest_peer.get(method.quantity)
        note = method.note
        if error is not None and not math.isfinite(error):
            note = "non-finite result (NaN/inf): time not comparable"
        rows.append(
            {
                "model": problem.name,
                "threads": torch.get_num_threads(),
                "quantity": method.quantity,
                "library": method.library,
                "call": method.call,
                "median ms": 1e3 * elapsed,
                "x gradient": elapsed / gradient_seconds,
                "x fastest peer": None if peer is None else elapsed / peer,
                "rel. err.": error,
                "note": note,
            }
        )
    return rows


QUANTITIES = (
    "gradient",
    "Fisher-vector product",
    "diag (exact)",
    "diag (MC, 1 sample)",
    "K-FAC factors (exact)",
    "K-FAC factors (MC, 1 sample)",
    "EKFAC (exact)",
)


def _quantity_order(quantity: str) -> int:
    return QUANTITIES.index(quantity)


def targets_met(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's two targets, per model: FVP ≤ 3 gradients, K-FAC ≤ fastest peer."""
    checks = []
    for row in rows:
        if row["library"] != "natgrad":
            continue
        if row["call"] == "fisher(implicit).mv (built once)":
            checks.append(_check(row, "Fisher-vector product <= 3 gradients", "x gradient", 3.0))
        if row["quantity"].startswith("K-FAC factors"):
            target = f"{row['quantity']} <= fastest peer"
            checks.append(_check(row, target, "x fastest peer", 1.0))
    return checks


def _check(row: dict[str, Any], target: str, column: str, bound: float) -> dict[str, Any]:
    return {
        "model": row["model"],
        "threads": row["threads"],
        "target": target,
        "measured": row[column],
        "met": row[column] <= bound,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per method")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[2], help="torch.set_num_threads, one run each"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for problem in make_problems():
            problem_rows = benchmark(problem, args.repeats, args.warmup)
            title = f"{problem.name}, batch {BATCH}, float32, {threads} thread(s)"
            print_table(title, problem_rows, COLUMNS)
            rows.extend(problem_rows)
    checks = targets_met(rows)
    print_table("Targets (issue 2)", checks, ("model", "threads", "target", "measured", "met"))
    settings = {
        "batch": BATCH,
        "dtype": "float32",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
        "curvlinops": version("curvlinops-for-pytorch"),
        "backpack": version("backpack-for-pytorch"),
    }
    save_json(NAME, {"environment": environment(**settings), "rows": rows, "targets": checks})


if __name__ == "__main__":
    main()
