"""NaturalGradient and ``natgrad.fisher`` under torch.distributed: 2 gloo processes with
shares of unequal sizes (5 and 7 samples of each global batch of 12) equal one process on the
global batch, for every structure and kind.

Each process steps a DistributedDataParallel replica (or, in some cases, hands the optimizer
the inner module while its closure calls the wrapper) on its share. Its closure returns the
sum of its samples' negative log-likelihoods times ``world_size / 12``, so that the mean of the
processes' losses, whose gradient DDP averages, is the global batch's mean loss; the Fisher is
the global batch's (the processes' sums and counts all-reduced). ``"mc"`` draws the targets of
the global batch on every process from generators seeded alike, so the sampled Fishers are
equal too. Adaptive damping and KL clipping are switched on in turn, and each likelihood is
used, so that Poisson's rejection sampling (which consumes a data-dependent amount of
randomness) checks that the draws are the global batch's.

One spawn runs every case: the operators of ``fisher(..., global_batch=GlobalBatch())`` (as
dense matrices, an implicit one's through its reduced vmapped products), the optimizer's
trajectories, and refusals: process 1's closure returns ``+inf`` (its gradient untouched) at
the first evaluation of one step and at the re-evaluation of another (adaptive damping), so
that only that process sees a non-finite loss. The single-process reference sees ``+inf`` at
the same evaluations. Before the fix, each process built the Fisher of its own share and
refused alone, and the replicas drifted apart.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distributed_helpers import run_on_processes
from natgrad.curvature import fisher, get_likelihood
from natgrad.distributed import GlobalBatch
from natgrad.optim import NaturalGradient

SHARES = (5, 7)
GLOBAL_BATCH = sum(SHARES)
STEPS = 3
IN, HIDDEN, OUT = 4, 5, 3
SEED = 7
DAMPING = 0.1

# Conjugate gradients run to round-off: at their default tolerance (1.5e-8) the iterates
# amplify the round-off of the sums (the processes' sum differs from one process's in the last
# bits) to 1e-10 to 1e-9 in the parameters after 3 steps.
TIGHT = {"cg_rtol": 1e-12}
# (structure, kind, likelihood, options, layer-normed model, optimizer on the DDP wrapper)
CASES = [
    ("dense", "exact", "categorical", {"adaptive_damping": True}, False, True),
    ("dense", "mc", "poisson", {}, False, False),
    ("dense", "empirical", "categorical", {"max_kl": 1e-3}, False, True),
    ("diag", "exact", "categorical", {}, False, False),
    ("diag", "mc", "bernoulli", {"adaptive_damping": True, "mc_samples": 2}, False, True),
    ("diag", "empirical", "gaussian", {}, False, True),
    ("diag", "exact", "gaussian", {"adaptive_damping": True}, True, False),
    ("block", "exact", "gaussian", {"max_kl": 1e-3}, False, True),
    ("block", "mc", "categorical", {}, True, False),
    ("block", "empirical", "bernoulli", {"adaptive_damping": True}, False, True),
    ("kfac", "exact", "bernoulli", {}, False, False),
    ("kfac", "mc", "gaussian", {"adaptive_damping": True}, False, True),
    ("kfac", "empirical", "poisson", {"max_kl": 1e-3}, False, True),
    ("ekfac", "exact", "poisson", {"adaptive_damping": True}, False, False),
    ("ekfac", "mc", "categorical", {"max_kl": 1e-3}, False, True),
    ("ekfac", "empirical", "categorical", {}, False, True),
    (
        "implicit",
        "exact",
        "categorical",
        {"adaptive_damping": True, "max_kl": 1e-2, **TIGHT},
        False,
        True,
    ),
    ("implicit", "mc", "poisson", {"mc_samples": 3, **TIGHT}, True, False),
    ("implicit", "empirical", "gaussian", TIGHT, False, True),
]
REFUSAL_CASES = [("dense", "exact"), ("kfac", "mc"), ("implicit", "exact")]
# (step, evaluation) at which the loss of process 1 (of the whole batch, in one process) is +inf:
# the first evaluation of step 1 (refused before the Fisher is built), the re-evaluation of
# step 2 (the step is undone).
POISONED = {(1, 0), (2, 1)}


def make_model(layer_norm: bool) -> nn.Module:
    """A tanh MLP; with ``layer_norm`` one of its parameters is outside Linear layers (the
    diagonal then takes the generic path)."""
    torch.manual_seed(0)
    middle = nn.LayerNorm(HIDDEN) if layer_norm else nn.Identity()
    return nn.Sequential(nn.Linear(IN, HIDDEN), middle, nn.Tanh(), nn.Linear(HIDDEN, OUT)).to(
        torch.float64
    )


def draw_targets(likelihood: str, generator: torch.Generator) -> torch.Tensor:
    if likelihood == "categorical":
        return torch.randint(0, OUT, (GLOBAL_BATCH,), generator=generator)
    if likelihood == "gaussian":
        return torch.randn(GLOBAL_BATCH, OUT, generator=generator, dtype=torch.float64)
    if likelihood == "bernoulli":
        return torch.randint(0, 2, (GLOBAL_BATCH, OUT), generator=generator).to(torch.float64)
    return torch.randint(0, 4, (GLOBAL_BATCH, OUT), generator=generator).to(torch.float64)


def global_batches(likelihood: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(GLOBAL_BATCH, IN, generator=generator, dtype=torch.float64),
            draw_targets(likelihood, generator),
        )
        for _ in range(STEPS)
    ]


def share(rank: int | None) -> slice:
    """Process ``rank``'s rows of a global batch; all of them for ``None`` (one process)."""
    if rank is None:
        return slice(None)
    start = sum(SHARES[:rank])
    return slice(start, start + SHARES[rank])


def params_of(model: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def train(
    model: nn.Module,
    optimized: nn.Module,
    case: tuple,
    rank: int | None,
    poisoned: Callable[[int, int], bool] = lambda step, evaluation: False,
) -> dict:
    """``STEPS`` steps of NaturalGradient on ``optimized``; the closure calls ``model``."""
    structure, kind, likelihood, options, _, _ = case
    nll = get_likelihood(likelihood).nll
    optimizer = NaturalGradient(
        optimized,
        likelihood,
        lr=0.5,
        kind=kind,
        structure=structure,
        damping=DAMPING,
        generator=torch.Generator().manual_seed(SEED),
        **options,
    )
    scale = (1 if rank is None else len(SHARES)) / GLOBAL_BATCH  # the processes' mean: the mean
    dampings = []
    for step, (inputs, targets) in enumerate(global_batches(likelihood)):
        mine = share(rank)
        evaluations = iter(range(2))  # the closure's calls in this step

        def closure(
            inputs=inputs[mine], targets=targets[mine], step=step, evaluations=evaluations
        ) -> torch.Tensor:
            optimizer.zero_grad()
            loss = nll(model(inputs), targets).sum() * scale
            loss.backward()
            return loss + float("inf") if poisoned(step, next(evaluations)) else loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the refusals
            optimizer.step(closure, targets=targets[mine])
        dampings.append(optimizer.param_groups[0]["damping"])
    return {"params": params_of(model), "dampings": dampings, "counters": optimizer.counters}


def operators(model: nn.Module, rank: int | None) -> dict[tuple[str, str], torch.Tensor]:
    """Dense matrices of ``fisher`` on the first global batch, for every structure and kind
    (Poisson outputs: sampling consumes data-dependent randomness)."""
    inputs, targets = global_batches("poisson")[0]
    global_batch = None if rank is None else GlobalBatch()
    return {
        (structure, kind): fisher(
            model,
            inputs[share(rank)],
            likelihood="poisson",
            kind=kind,
            structure=structure,
            targets=targets[share(rank)],
            mc_samples=2,
            generator=torch.Generator().manual_seed(SEED),
            global_batch=global_batch,
        ).to_dense()
        for structure in ("dense", "diag", "block", "kfac", "ekfac", "implicit")
        for kind in ("exact", "mc", "empirical")
    }


def poison(rank: int | None) -> Callable[[int, int], bool]:
    return lambda step, evaluation: rank != 0 and (step, evaluation) in POISONED


def run_all(rank: int | None) -> dict:
    """Every case on process ``rank`` of the DDP run, or in one process (``None``)."""
    results = {"operators": operators(make_model(layer_norm=False), rank), "cases": []}
    for case in CASES:
        model = make_model(layer_norm=case[4])
        if rank is None:
            results["cases"].append(train(model, model, case, rank))
            continue
        wrapper = DistributedDataParallel(model)
        results["cases"].append(train(wrapper, wrapper if case[5] else model, case, rank))
    results["refusals"] = []
    for structure, kind in REFUSAL_CASES:
        case = (structure, kind, "categorical", {"adaptive_damping": True}, False, True)
        model = make_model(layer_norm=False)
        wrapped = model if rank is None else DistributedDataParallel(model)
        results["refusals"].append(train(wrapped, wrapped, case, rank, poison(rank)))
    return results


def worker(rank: int, world_size: int) -> dict:
    assert world_size == len(SHARES)
    return run_all(rank)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], dict]:
    """The two processes' results and the single process's."""
    processes = run_on_processes(worker, workdir=tmp_path_factory.mktemp("natural_gradient"))
    return processes, run_all(None)


def assert_equal_runs(processes: list[dict], reference: dict) -> None:
    for result in processes:
        assert result["counters"] == reference["counters"]
        assert result["dampings"] == pytest.approx(reference["dampings"], rel=1e-12)
        torch.testing.assert_close(result["params"], reference["params"], rtol=0, atol=1e-10)
    torch.testing.assert_close(processes[0]["params"], processes[1]["params"], rtol=0, atol=0)


def test_fisher_of_shards_is_the_fisher_of_the_global_batch(runs) -> None:
    processes, reference = runs
    for key, expected in reference["operators"].items():
        assert expected.abs().max() > 0, key
        for result in processes:
            torch.testing.assert_close(result["operators"][key], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: "-".join(CASES[i][:3]))
def test_steps_equal_one_process_on_the_global_batch(runs, index: int) -> None:
    processes, reference = runs
    expected = reference["cases"][index]
    initial = params_of(make_model(layer_norm=CASES[index][4]))
    assert (expected["params"] - initial).abs().max() > 1e-3, "the parameters should move"
    if CASES[index][3].get("adaptive_damping"):
        assert len({DAMPING, *expected["dampings"]}) > 1, "the damping should move"
    assert_equal_runs([process["cases"][index] for process in processes], expected)


@pytest.mark.parametrize(
    "index", range(len(REFUSAL_CASES)), ids=lambda i: "-".join(REFUSAL_CASES[i])
)
def test_a_loss_not_finite_on_one_process_is_refused_or_undone_on_all(runs, index: int) -> None:
    processes, reference = runs
    expected = reference["refusals"][index]
    assert expected["counters"]["refused_steps"] == 2
    assert expected["counters"]["steps"] == STEPS - 1
    assert_equal_runs([process["refusals"][index] for process in processes], expected)
