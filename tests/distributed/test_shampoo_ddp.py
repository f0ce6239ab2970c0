"""Shampoo under DistributedDataParallel: 2 gloo processes on loopback equal one process.

Shampoo's statistics are built from the gradients, which DistributedDataParallel has already
averaged over the processes, and its roots are deterministic functions of them: every replica
computes the same preconditioners and takes the same step, with no communication of its own.
After 20 steps (roots recomputed every 3 steps, AdaGrad grafting, momentum, a convolution's
order-4 kernel, a diagonal mode) the replicas are bitwise equal and equal one process trained
on the global batches.
"""

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distributed_helpers import classifier_batches, run_on_processes, small_conv_classifier
from natgrad.optim import Shampoo

STEPS = 20
GLOBAL_BATCH = 32
OPTIONS = {
    "lr": 0.05,
    "momentum": 0.9,
    "epsilon": 1e-4,
    "update_freq": 3,
    "grafting": "adagrad",
    "max_preconditioner_dim": 6,
}


def make_model() -> nn.Module:
    return small_conv_classifier()


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return classifier_batches(GLOBAL_BATCH, STEPS)


def train(model: nn.Module, shard: slice) -> list[torch.Tensor]:
    optimizer = Shampoo(model.parameters(), **OPTIONS)
    for inputs, targets in global_batches():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs[shard]), targets[shard]).backward()
        optimizer.step()
    assert optimizer.counters["refused_steps"] == 0
    return [param.detach().clone() for param in model.parameters()]


def worker(rank: int, world_size: int) -> list[torch.Tensor]:
    local = GLOBAL_BATCH // world_size
    return train(DistributedDataParallel(make_model()), slice(rank * local, (rank + 1) * local))


@pytest.fixture(scope="module")
def results_by_rank(tmp_path_factory) -> list[list[torch.Tensor]]:
    return run_on_processes(worker, workdir=tmp_path_factory.mktemp("shampoo_ddp"))


def test_the_replicas_stay_bitwise_identical(results_by_rank) -> None:
    first, second = results_by_rank
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_two_gloo_processes_equal_one_process_on_the_global_batch(results_by_rank) -> None:
    single = train(make_model(), slice(None))
    initial = list(make_model().parameters())
    assert any(not torch.equal(a, b) for a, b in zip(single, initial, strict=True))
    for actual, expected in zip(results_by_rank[0], single, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
