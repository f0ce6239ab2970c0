"""QuadraticModelOptimizer under torch.distributed: 2 gloo processes on loopback equal one
process on the global batch.

Each process steps a DistributedDataParallel copy of the model on its half of every global
batch. The gradients are averaged by DDP, the K-FAC factors all-reduced by the preconditioner,
and the optimizer all-reduces the Fisher products of its quadratic model and the losses of its
damping rule, so that ``α``, ``μ`` and ``λ`` (adapted every step here) agree across processes
and with one process.
"""

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distributed_helpers import run_on_processes
from natgrad.optim import KFAC, QuadraticModelOptimizer

STEPS = 12
GLOBAL_BATCH = 32


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(torch.float64)


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(GLOBAL_BATCH, 4, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def make_closure(model: nn.Module, optimizer, inputs: torch.Tensor, targets: torch.Tensor):
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss

    return closure


def train(model: nn.Module, shard: slice) -> tuple[list[torch.Tensor], list[float]]:
    precond = KFAC(model, factor_decay=0.9, inv_update_interval=3, damping_mode="factored")
    optimizer = QuadraticModelOptimizer(
        model,
        "categorical",
        preconditioner=precond,
        damping=0.05,
        damping_adaptation_interval=1,
        damping_decay=0.5,
    )
    dampings = []
    for inputs, targets in global_batches():
        closure = make_closure(model, optimizer, inputs[shard], targets[shard])
        optimizer.step(closure)
        dampings.append(optimizer.damping)
    precond.remove()
    return [param.detach().clone() for param in model.parameters()], dampings


def worker(rank: int, world_size: int) -> tuple[list[torch.Tensor], list[float]]:
    local = GLOBAL_BATCH // world_size
    return train(DistributedDataParallel(make_model()), slice(rank * local, (rank + 1) * local))


def test_two_gloo_processes_equal_one_process_on_the_global_batch(tmp_path) -> None:
    results = run_on_processes(worker, workdir=tmp_path)
    single_params, single_dampings = train(make_model(), slice(None))
    assert len(set(single_dampings)) > 2, "the damping should move during the run"
    moved = any(
        not torch.equal(a, b) for a, b in zip(single_params, make_model().parameters(), strict=True)
    )
    assert moved
    for params, dampings in results:
        assert dampings == pytest.approx(single_dampings, rel=1e-9)
        for expected, actual in zip(single_params, params, strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)
