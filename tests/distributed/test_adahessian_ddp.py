"""AdaHessian under torch.distributed: 2 gloo processes on loopback equal one process.

``DistributedDataParallel`` cannot back-propagate with ``create_graph=True`` (checked below), so
each process computes its loss through the wrapped module (``ddp.module``, or ``ddp`` inside
``no_sync()``) and AdaHessian averages the local gradients and the local Hessian-diagonal
estimates ``z ⊙ (H_w z)`` over the processes, with rank 0's Rademacher signs everywhere. After
20 steps the parameters must equal one process trained on the global batches, and the replicas
must be bitwise equal. Before, each process stepped with its own gradient and its own estimate
and the replicas drifted apart from the first step. The model has a convolution, whose estimate
is spatially averaged (``|D|`` over the kernel window), a non-linear map that must act on the
averaged estimate. With local batches of 8 and 24 samples the processes are weighted equally,
as ``DistributedDataParallel`` weights gradients: the reference is one process on a batch in
which every sample of the small share appears three times.
"""

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distributed_helpers import classifier_batches, run_on_processes, small_conv_classifier
from natgrad.optim import AdaHessian

STEPS = 20
GLOBAL_BATCH = 32
UNEQUAL_SHARES = (8, 24)
OPTIONS = {
    "plain": {"lr": 0.05},
    "samples_and_decay": {"lr": 0.05, "n_samples": 2, "update_each": 2, "weight_decay": 0.01},
}


def make_model() -> nn.Module:
    return small_conv_classifier()


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return classifier_batches(GLOBAL_BATCH, STEPS)


def equal_share(rank: int, world_size: int) -> slice:
    local = GLOBAL_BATCH // world_size
    return slice(rank * local, (rank + 1) * local)


def unequal_share(rank: int) -> slice:
    start = sum(UNEQUAL_SHARES[:rank])
    return slice(start, start + UNEQUAL_SHARES[rank])


def equally_weighted(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One batch whose mean loss is the mean of the shares' mean losses."""
    repeats = [max(UNEQUAL_SHARES) // size for size in UNEQUAL_SHARES]
    parts = [unequal_share(rank) for rank in range(len(UNEQUAL_SHARES))]
    return (
        torch.cat([inputs[p].repeat(r, 1, 1, 1) for p, r in zip(parts, repeats, strict=True)]),
        torch.cat([targets[p].repeat(r) for p, r in zip(parts, repeats, strict=True)]),
    )


def train(model: nn.Module, forward, select, options: dict, seed: int = 0) -> list[torch.Tensor]:
    """``forward(inputs)`` gives the outputs; ``select(inputs, targets)`` this process's data."""
    optimizer = AdaHessian(
        model.parameters(), generator=torch.Generator().manual_seed(seed), **options
    )
    for batch in global_batches():
        inputs, targets = select(*batch)
        optimizer.zero_grad()
        nn.functional.cross_entropy(forward(inputs), targets).backward(create_graph=True)
        optimizer.step()
    assert optimizer.counters["refused_steps"] == 0
    return [param.detach().clone() for param in model.parameters()]


def through_module(ddp: DistributedDataParallel):
    return ddp.module


def through_no_sync(ddp: DistributedDataParallel):
    def forward(inputs: torch.Tensor) -> torch.Tensor:
        with ddp.no_sync():
            return ddp(inputs)

    return forward


def ddp_error_with_create_graph() -> str:
    ddp = DistributedDataParallel(make_model())
    inputs, targets = global_batches()[0]
    try:
        nn.functional.cross_entropy(ddp(inputs), targets).backward(create_graph=True)
    except RuntimeError as error:
        return str(error)
    return ""


def error_without_generator() -> str:
    ddp = DistributedDataParallel(make_model())
    optimizer = AdaHessian(ddp.module.parameters())
    inputs, targets = global_batches()[0]
    nn.functional.cross_entropy(ddp.module(inputs), targets).backward(create_graph=True)
    try:
        optimizer.step()
    except ValueError as error:
        return str(error)
    return ""


def worker(rank: int, world_size: int) -> dict:
    def shard(inputs, targets):
        part = equal_share(rank, world_size)
        return inputs[part], targets[part]

    def unequal(inputs, targets):
        return inputs[unequal_share(rank)], targets[unequal_share(rank)]

    results = {}
    for name, options in OPTIONS.items():
        ddp = DistributedDataParallel(make_model())
        results[name] = train(ddp.module, through_module(ddp), shard, options)
    ddp = DistributedDataParallel(make_model())
    results["no_sync"] = train(ddp.module, through_no_sync(ddp), shard, OPTIONS["plain"])
    ddp = DistributedDataParallel(make_model())
    results["seeded_apart"] = train(ddp.module, ddp.module, shard, OPTIONS["plain"], seed=rank)
    ddp = DistributedDataParallel(make_model())
    results["unequal"] = train(ddp.module, ddp.module, unequal, OPTIONS["plain"])
    results["ddp_error"] = ddp_error_with_create_graph()
    results["generator_error"] = error_without_generator()
    return results


@pytest.fixture(scope="module")
def results_by_rank(tmp_path_factory) -> list[dict]:
    """Run :func:`worker` on 2 gloo processes once; the results of each rank."""
    return run_on_processes(worker, workdir=tmp_path_factory.mktemp("adahessian_ddp"))


def single_process(options: dict, select=lambda inputs, targets: (inputs, targets)) -> list:
    model = make_model()
    return train(model, model, select, options)


def assert_moved_and_close(params: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    initial = list(make_model().parameters())
    assert any(not torch.equal(a, b) for a, b in zip(expected, initial, strict=True))
    for actual, reference in zip(params, expected, strict=True):
        torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("run", [*OPTIONS, "no_sync", "seeded_apart", "unequal"])
def test_the_replicas_stay_bitwise_identical(results_by_rank, run: str) -> None:
    first, second = results_by_rank
    for a, b in zip(first[run], second[run], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("run", [*OPTIONS, "no_sync"])
def test_two_gloo_processes_equal_one_process_on_the_global_batch(results_by_rank, run) -> None:
    assert_moved_and_close(results_by_rank[0][run], single_process(OPTIONS.get(run, {"lr": 0.05})))


def test_processes_seeded_apart_draw_rank_zeros_signs(results_by_rank) -> None:
    assert_moved_and_close(results_by_rank[0]["seeded_apart"], single_process(OPTIONS["plain"]))


def test_unequal_shares_are_weighted_equally_as_ddp_weights_gradients(results_by_rank) -> None:
    expected = single_process(OPTIONS["plain"], equally_weighted)
    assert_moved_and_close(results_by_rank[0]["unequal"], expected)
    on_global_batch = single_process(OPTIONS["plain"])
    assert any(
        not torch.allclose(a, b, rtol=1e-3, atol=1e-3)
        for a, b in zip(results_by_rank[0]["unequal"], on_global_batch, strict=True)
    ), "equal weighting of unequal shares should differ from the global batch's mean"


def test_ddp_cannot_backpropagate_with_create_graph(results_by_rank) -> None:
    """The reason the loss goes through ``ddp.module``, as AdaHessian's docstring says."""
    for results in results_by_rank:
        assert "in-place operation" in results["ddp_error"]


def test_a_missing_generator_is_refused_naming_it(results_by_rank) -> None:
    for results in results_by_rank:
        assert "generator=None" in results["generator_error"]
        assert "torch.distributed (2 processes)" in results["generator_error"]
