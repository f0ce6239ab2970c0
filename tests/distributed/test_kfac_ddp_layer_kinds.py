"""K-FAC and EKFAC under DistributedDataParallel on the layer kinds recorded through recording
modes or expanded inputs: an LSTM with ``proj_size``, a bidirectional GRU, an ``nn.LSTMCell``
in a Python loop, ``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer`` (its
cross-attention's memory of another length), an ``nn.MultiheadAttention`` with ``kdim``/``vdim``
and an ``nn.ConvTranspose2d`` (:mod:`kfac_layer_kinds`).

Two gloo processes, float64, each on its share of every global batch, must equal one process on
the global batches to 1e-10 after 5 steps (factors recorded on 3 of them and averaged, the
eigenbases refreshed on 2): the unrolled recurrent calls and the attentions' projections must
count each process's samples once when the statistics are all-reduced.

With the Monte-Carlo Fisher each process draws the targets of its own share with its own
generator. The single process reproduces those draws by taking the global batch as two
micro-batches (``accumulation_steps=2``), the shares, each sampled after re-seeding the
generator with the seed that the share's process uses at that step (every process re-seeds
its own at every step): the draws are then the same, and the factors and steps those of the
global batch.

With shares of unequal sizes (4 and 12) the factors (and EKFAC's eigenvalues) recorded on the
first step must still be those of one process on the global batch. DDP then averages the
processes' mean gradients, which weights the smaller share's samples more than the global mean
does; one process accumulating the same two shares as micro-batches does the same, and must
take the same EKFAC steps.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from distributed_helpers import run_on_processes
from kfac_layer_kinds import (
    KINDS,
    LAYER_NAMES,
    batches,
    make_model,
    parameters,
    precondition_options,
    train_step,
)
from natgrad.optim import EKFAC, KFAC

STEPS = 5
GLOBAL_BATCH = 16
EQUAL_SHARES = [slice(0, 8), slice(8, 16)]
UNEQUAL_SHARES = [slice(0, 4), slice(4, 16)]
# (preconditioner, Fisher, inverse placement): both placements, both Fisher types
CONFIGS = [
    (KFAC, "empirical", "replicated"),
    (KFAC, "mc", "assigned"),
    (EKFAC, "empirical", "assigned"),
    (EKFAC, "mc", "replicated"),
]
UNEQUAL_CONFIGS = [(EKFAC, "empirical", "assigned")]


def draw_seed(step: int, share: int) -> int:
    """The seed of the Monte-Carlo draws of ``share`` (the process of that rank) at ``step``."""
    return 1000 * step + share


def build(kind: str, model, cls, fisher_type: str, placement: str, accumulation_steps: int = 1):
    """The preconditioner and SGD with momentum."""
    precond = cls(
        model,
        **precondition_options(fisher_type),
        inverse_placement=placement,
        accumulation_steps=accumulation_steps,
    )
    names = [state.name.removeprefix("module.") for state in precond.layers]
    assert names == LAYER_NAMES[kind]
    return precond, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)


def train_share(kind: str, config: tuple, shares: list[slice], rank: int) -> list[torch.Tensor]:
    """One process of the data-parallel run: ``STEPS`` steps on its share."""
    model = DistributedDataParallel(make_model(kind))
    precond, optimizer = build(kind, model, *config)
    share = shares[rank]
    for step, (inputs, targets) in enumerate(batches(kind, STEPS, GLOBAL_BATCH)):

        def reseed(_: int, step: int = step) -> None:
            precond.generator.manual_seed(draw_seed(step, rank))

        train_step(model, precond, optimizer, [(inputs[share], targets[share])], reseed)
    precond.remove()
    return parameters(model)


def train_global(kind: str, config: tuple, shares: list[slice] | None) -> list[torch.Tensor]:
    """One process on the global batches: in one piece (``shares`` None), or as the shares,
    accumulated, each drawn from its process's seed."""
    model = make_model(kind)
    precond, optimizer = build(kind, model, *config, accumulation_steps=len(shares or [None]))
    for step, (inputs, targets) in enumerate(batches(kind, STEPS, GLOBAL_BATCH)):
        pieces = (
            [(inputs, targets)] if shares is None else [(inputs[s], targets[s]) for s in shares]
        )

        def reseed(share: int, step: int = step) -> None:
            precond.generator.manual_seed(draw_seed(step, share))

        train_step(model, precond, optimizer, pieces, reseed)
    precond.remove()
    return parameters(model)


def first_step_statistics(kind: str, model, cls, share: slice) -> list:
    """Each layer's factors (and EKFAC's eigenvalues) after one step on ``share`` of the first
    global batch."""
    precond, optimizer = build(kind, model, cls, "empirical", "replicated")
    inputs, targets = batches(kind, 1, GLOBAL_BATCH)[0]
    train_step(model, precond, optimizer, [(inputs[share], targets[share])])
    precond.remove()
    return [
        (state.input_factor, state.output_factor, getattr(state, "eigenvalues", None))
        for state in precond.layers
    ]


def worker(rank: int, world_size: int) -> dict:
    assert world_size == 2
    return {
        "equal": {
            (kind, index): train_share(kind, config, EQUAL_SHARES, rank)
            for kind in KINDS
            for index, config in enumerate(CONFIGS)
        },
        "unequal": {
            (kind, index): train_share(kind, config, UNEQUAL_SHARES, rank)
            for kind in KINDS
            for index, config in enumerate(UNEQUAL_CONFIGS)
        },
        "first_step": {
            (kind, cls.__name__): first_step_statistics(
                kind, DistributedDataParallel(make_model(kind)), cls, UNEQUAL_SHARES[rank]
            )
            for kind in KINDS
            for cls in (KFAC, EKFAC)
        },
    }


@pytest.fixture(scope="module")
def results_by_rank(tmp_path_factory) -> list[dict]:
    """:func:`worker` on 2 gloo processes, once; each rank's results."""
    return run_on_processes(worker, workdir=tmp_path_factory.mktemp("ddp_layer_kinds"))


def assert_same(actual: list, expected: list, tolerance: float, message: str) -> None:
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance, msg=message)


def test_the_replicas_stay_bitwise_identical(results_by_rank) -> None:
    first, second = results_by_rank
    for run in ("equal", "unequal"):
        for key, params in first[run].items():
            for a, b in zip(params, second[run][key], strict=True):
                assert torch.equal(a, b), (run, key)


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_equal_one_process_on_the_global_batch(results_by_rank, kind) -> None:
    initial = parameters(make_model(kind))
    for index, config in enumerate(CONFIGS):
        message = f"{kind}, {config}"
        shares = EQUAL_SHARES if config[1] == "mc" else None
        expected = train_global(kind, config, shares)
        moved = max(float((a - b).abs().max()) for a, b in zip(expected, initial, strict=True))
        assert moved > 1e-2, f"{message}: training did not move the parameters"
        got = results_by_rank[0]["equal"][kind, index]
        assert_same(got, expected, 1e-10, message)


@pytest.mark.parametrize("kind", KINDS)
def test_unequal_shares_record_the_global_batch_factors(results_by_rank, kind) -> None:
    """After one step; EKFAC's eigenvalues too."""
    for cls in (KFAC, EKFAC):
        expected = first_step_statistics(kind, make_model(kind), cls, slice(None))
        for result in results_by_rank:
            for want, got in zip(expected, result["first_step"][kind, cls.__name__], strict=True):
                for wanted, actual in zip(want, got, strict=True):
                    if wanted is None:
                        assert actual is None
                        continue
                    torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_unequal_shares_step_as_one_process_accumulating_them(results_by_rank, kind) -> None:
    for index, config in enumerate(UNEQUAL_CONFIGS):
        expected = train_global(kind, config, UNEQUAL_SHARES)
        got = results_by_rank[0]["unequal"][kind, index]
        assert_same(got, expected, 1e-10, f"{kind}, {config}")
