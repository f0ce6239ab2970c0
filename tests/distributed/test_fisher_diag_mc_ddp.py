"""``fisher(..., global_batch=GlobalBatch())``: the ``"diag"`` structure's per-layer path and
the Monte-Carlo kind under torch.distributed, on 2 gloo processes with a 10-second timeout.

Failures: process 1 alone fails in its local work (targets outside the likelihood's support,
a model whose forward pass raises on one of its inputs). Before, the per-layer diagonal did
that work after the all-reduce of the shards' counts, and the Monte-Carlo kind ran its
forward pass after it too (the Kronecker structures' until they make the shard between their
forward pass and their draws), so process 0 waited in the next collective (the diagonal's
all-reduce, the gather of the outputs) until the timeout. Now the failure rides on the count
all-reduce: process 1 raises its own exception, process 0 a ``ProcessFailure`` quoting it,
and a good call afterwards still gives the global batch's Fisher. NaN outputs are gathered, so
the draws fail alike on both processes (same ``ValueError``).

Gathers: with ``mc_samples=k`` the outputs were gathered once per draw (``k`` all-reduces of
the global batch's outputs); now once. The draws are the same: each process's ``k`` draws for
the global batch equal, bitwise, those of one process on the global batch with the same seed,
and the Fisher equals that process's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from distributed_helpers import FAILURE_TIMEOUT, outcome, run_on_processes
from natgrad.curvature import fisher
from natgrad.curvature.likelihoods import CategoricalLikelihood, PoissonLikelihood
from natgrad.distributed import GlobalBatch

SHARES = (5, 7)
GLOBAL = sum(SHARES)
IN, HIDDEN, OUT = 4, 5, 3
SEED = 11
POISON = 1000.0  # a first input feature that the model refuses (or turns into NaN outputs)


class Guard(nn.Module):
    """Raises on a first input feature above 100 (``"raise"``), or makes that sample's
    outputs NaN (``"nan"``); the identity otherwise, and with ``"off"``."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, inputs: Tensor) -> Tensor:
        if self.mode == "off":
            return inputs
        flagged = inputs[:, :1] > 100
        if self.mode == "raise" and bool(flagged.any()):
            raise RuntimeError("injected: the forward pass refused an input")
        if self.mode == "nan":
            return torch.where(flagged, torch.full_like(inputs, float("nan")), inputs)
        return inputs


def make_model(mode: str = "off", layer_norm: bool = False) -> nn.Module:
    """A tanh MLP after a :class:`Guard`; with ``layer_norm`` the diagonal takes the generic
    path (a parameter outside Linear layers)."""
    torch.manual_seed(0)
    middle = nn.LayerNorm(HIDDEN) if layer_norm else nn.Identity()
    layers = [Guard(mode), nn.Linear(IN, HIDDEN), middle, nn.Tanh(), nn.Linear(HIDDEN, OUT)]
    return nn.Sequential(*layers).double()


def global_batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(GLOBAL, IN, generator=generator, dtype=torch.float64)
    return inputs, torch.randint(0, OUT, (GLOBAL,), generator=generator)


def share(rank: int | None) -> slice:
    if rank is None:
        return slice(None)
    start = sum(SHARES[:rank])
    return slice(start, start + SHARES[rank])


# -- a failure on one process --------------------------------------------------------------------
FAILURES = [  # (structure, kind, model's guard, poison on process 1, layer_norm)
    ("diag", "empirical", "raise", "targets", False),
    ("diag", "exact", "raise", "forward", False),
    ("diag", "mc", "raise", "forward", False),
    ("diag", "mc", "raise", "forward", True),
    ("dense", "mc", "raise", "forward", False),
    ("implicit", "mc", "raise", "forward", False),
    ("kfac", "mc", "raise", "forward", False),
    ("ekfac", "mc", "raise", "forward", False),
    ("block", "mc", "raise", "targets count", False),
    ("diag", "mc", "raise", "nan input", False),
    ("diag", "mc", "nan", "forward", False),
    ("dense", "mc", "nan", "forward", False),
]


def poisoned(inputs: Tensor, targets: Tensor, poison: str) -> tuple[Tensor, Tensor]:
    inputs, targets = inputs.clone(), targets.clone()
    if poison == "targets":
        targets[-1] = OUT + 2  # no class of the categorical likelihood
    elif poison == "targets count":
        targets = targets[:-1]
    elif poison == "nan input":
        inputs[-1, 0] = float("nan")
    else:
        inputs[-1, 0] = POISON
    return inputs, targets


def failure_worker(rank: int, world_size: int) -> dict:
    inputs, targets = global_batch()
    inputs, targets = inputs[share(rank)], targets[share(rank)]
    outcomes = []
    for structure, kind, mode, poison, layer_norm in FAILURES:
        bad = poisoned(inputs, targets, poison) if rank == 1 else (inputs, targets)
        model = make_model(mode, layer_norm)

        def call(bad=bad, model=model, structure=structure, kind=kind) -> None:
            fisher(
                model,
                bad[0],
                kind=kind,
                structure=structure,
                targets=bad[1],
                mc_samples=2,
                generator=torch.Generator().manual_seed(SEED),
                global_batch=GlobalBatch(),
            )

        outcomes.append(outcome(call))
    good = fisher(
        make_model(),
        inputs,
        kind="empirical",
        structure="diag",
        targets=targets,
        global_batch=GlobalBatch(),
    )
    return {"outcomes": outcomes, "good": good.to_dense()}


def test_a_failure_on_one_process_is_raised_on_every_process(tmp_path) -> None:
    results = run_on_processes(failure_worker, workdir=tmp_path, timeout=FAILURE_TIMEOUT)
    for index, (structure, kind, mode, poison, _) in enumerate(FAILURES):
        (type0, message0), (type1, message1) = [result["outcomes"][index] for result in results]
        case = (structure, kind, mode, poison)
        assert type1 in ("ValueError", "RuntimeError"), (case, type1, message1)
        if mode == "nan":  # the outputs are gathered: both draws fail alike
            assert (type0, message0) == (type1, message1), case
            assert "cannot sample targets" in message1, case
            continue
        assert type0 == "ProcessFailure", (case, type0, message0)
        assert message0 == f"process 1 failed: {type1}: {message1}", case
        expected = {
            "targets": "categorical likelihood",
            "forward": "injected",
            "targets count": "one per input",
            "nan input": "NaN",
        }[poison]
        assert expected in message1, case
    inputs, targets = global_batch()
    reference = fisher(
        make_model(), inputs, kind="empirical", structure="diag", targets=targets
    ).to_dense()
    torch.testing.assert_close(results[0]["good"], reference, rtol=0, atol=1e-14)
    assert torch.equal(results[0]["good"], results[1]["good"])


# -- one gather for all the draws -----------------------------------------------------------------
def recording(base: type) -> object:
    """An instance of the likelihood class ``base`` that keeps its draws (for the whole batch
    it is given: the global batch's under torch.distributed)."""

    class Recording(base):
        draws: list[Tensor]

        def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
            drawn = super().sample(outputs, generator)
            self.draws.append(drawn.clone())
            return drawn

    likelihood = Recording()
    likelihood.draws = []
    return likelihood


MC_CASES = [  # (structure, likelihood, layer_norm)
    ("diag", CategoricalLikelihood, False),
    ("diag", PoissonLikelihood, True),
    ("dense", PoissonLikelihood, False),
    ("block", CategoricalLikelihood, False),
    ("implicit", PoissonLikelihood, False),
    ("kfac", CategoricalLikelihood, False),
    ("ekfac", PoissonLikelihood, False),
]
MC_SAMPLES = (1, 3)


@contextlib.contextmanager
def counted_collectives() -> Iterator[dict[str, int]]:
    """Counts the calls of ``torch.distributed.all_reduce`` and of its all-gathers inside."""
    calls = {"all_reduce": 0, "all_gather": 0}
    names = {"all_reduce": "all_reduce", "all_gather": "all_gather"}
    names["all_gather_into_tensor"] = "all_gather"
    originals = {name: getattr(dist, name) for name in names}

    def counted(name: str) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            calls[names[name]] += 1
            return originals[name](*args, **kwargs)

        return call

    for name in names:
        setattr(dist, name, counted(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def mc_fishers(rank: int | None) -> dict:
    """Per case and ``mc_samples``: the Fisher (dense), the draws, and (under
    torch.distributed) the number of all-reduces and all-gathers of the call."""
    inputs, _ = global_batch()
    results = {}
    for structure, base, layer_norm in MC_CASES:
        for samples in MC_SAMPLES:
            likelihood = recording(base)
            with counted_collectives() as calls:
                operator = fisher(
                    make_model(layer_norm=layer_norm),
                    inputs[share(rank)],
                    likelihood=likelihood,
                    kind="mc",
                    structure=structure,
                    mc_samples=samples,
                    generator=torch.Generator().manual_seed(SEED),
                    global_batch=None if rank is None else GlobalBatch(),
                )
            results[structure, base.name, layer_norm, samples] = {
                "fisher": operator.to_dense(),
                "draws": likelihood.draws,
                "calls": calls,
            }
    return results


def mc_worker(rank: int, world_size: int) -> dict:
    return mc_fishers(rank)


@pytest.fixture(scope="module")
def mc_runs(tmp_path_factory) -> tuple[list[dict], dict]:
    processes = run_on_processes(
        mc_worker, workdir=tmp_path_factory.mktemp("mc_gathers"), timeout=FAILURE_TIMEOUT
    )
    return processes, mc_fishers(None)


@pytest.mark.parametrize("case", MC_CASES, ids=lambda case: f"{case[0]}-{case[1].name}")
def test_the_outputs_are_gathered_once_for_all_the_draws(mc_runs, case) -> None:
    processes, _ = mc_runs
    structure, base, layer_norm = case
    for result in processes:
        one, several = (result[structure, base.name, layer_norm, k]["calls"] for k in MC_SAMPLES)
        assert several == one, (several, one)  # as many collectives for 3 draws as for 1
        assert one["all_gather"] == 0


@pytest.mark.parametrize("case", MC_CASES, ids=lambda case: f"{case[0]}-{case[1].name}")
def test_the_draws_and_fisher_are_one_process_s_on_the_global_batch(mc_runs, case) -> None:
    processes, reference = mc_runs
    structure, base, layer_norm = case
    for samples in MC_SAMPLES:
        key = (structure, base.name, layer_norm, samples)
        expected = reference[key]
        assert len(expected["draws"]) == samples
        for result in processes:
            draws = result[key]["draws"]
            assert len(draws) == samples
            for drawn, wanted in zip(draws, expected["draws"], strict=True):
                assert torch.equal(drawn, wanted)  # the whole global batch's draws
            torch.testing.assert_close(
                result[key]["fisher"], expected["fisher"], rtol=0, atol=1e-12
            )
        assert torch.equal(processes[0][key]["fisher"], processes[1][key]["fisher"])
