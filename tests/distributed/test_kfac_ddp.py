"""K-FAC under torch.distributed: 2 gloo processes on loopback equal one process.

Each process trains a DistributedDataParallel copy of the model on its half of every global
batch; factor statistics are all-reduced. After 20 steps the parameters must equal a single
process trained on the full global batches (K-FAC-reduce included, and EKFAC with the exact
Fisher, whose columns' backward passes run on each process's DistributedDataParallel graph;
the model has a grouped convolution, whose blocks are stacked over its groups). With factored
damping the damped factor inverses are formed on every process (``"replicated"``) or on each layer's
assigned process and broadcast (``"assigned"``), at each refresh and whenever the damping
changes; adaptive (Levenberg–Marquardt) damping changes it between refreshes, with the losses
averaged over the processes. The batch is larger than every factor's dimension so that no
factor has a repeated (zero) eigenvalue: EKFAC's eigenvalue estimates depend on the basis
chosen inside a degenerate eigenspace, which round-off decides.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distributed_helpers import run_on_processes
from natgrad.distributed import assign_owners
from natgrad.optim import EKFAC, KFAC

STEPS = 20
GLOBAL_BATCH = 32
CONFIGS = [
    (KFAC, "replicated", "expand", "empirical"),
    (KFAC, "assigned", "expand", "empirical"),
    (EKFAC, "assigned", "expand", "empirical"),
    (KFAC, "assigned", "reduce", "empirical"),
    (EKFAC, "replicated", "expand", "exact"),  # C backward passes, the samples counted once
]
PLACEMENTS = ["replicated", "assigned"]


def make_model() -> nn.Module:
    """A grouped convolution, and a Linear layer called twice per forward pass."""
    torch.manual_seed(0)
    repeated = nn.Linear(6, 6)
    return nn.Sequential(
        nn.Conv2d(1, 2, 2),
        nn.Tanh(),
        nn.Conv2d(2, 4, 1, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4, 6),
        nn.Tanh(),
        repeated,
        nn.Tanh(),
        repeated,
        nn.Tanh(),
        nn.Linear(6, 3),
    ).to(torch.float64)


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(GLOBAL_BATCH, 1, 3, 3, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def train(
    model: nn.Module, cls, placement: str, kfac_approx: str, fisher_type: str, shard: slice
) -> list[torch.Tensor]:
    likelihood = None if fisher_type == "empirical" else "categorical"
    precond = cls(
        model,
        fisher_type=fisher_type,
        likelihood=likelihood,
        factor_decay=0.9,
        inv_update_interval=3,
        damping=0.01,
        kl_clip=0.01,
        lr=0.1,
        inverse_placement=placement,
        kfac_approx=kfac_approx,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for inputs, targets in global_batches():
        optimizer.zero_grad()
        outputs = model(inputs[shard])
        if likelihood is not None:
            precond.sample_backward(outputs)
        nn.functional.cross_entropy(outputs, targets[shard]).backward()
        precond.step()
        optimizer.step()
    precond.remove()
    return [param.detach().clone() for param in model.parameters()]


def mean_over_processes(loss: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return loss
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def train_factored_adaptive(
    model: nn.Module, placement: str, shard: slice
) -> tuple[list[torch.Tensor], list[float]]:
    precond = KFAC(
        model,
        factor_decay=0.9,
        inv_update_interval=4,
        damping=0.05,
        damping_mode="factored",
        adaptive_damping=True,
        damping_adaptation_interval=1,
        damping_decay=0.5,
        inverse_placement=placement,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    dampings = []
    for inputs, targets in global_batches():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs[shard]), targets[shard])
        loss.backward()
        precond.step()
        optimizer.step()
        with torch.no_grad():
            after = nn.functional.cross_entropy(model(inputs[shard]), targets[shard])
        dampings.append(
            precond.update_damping(mean_over_processes(loss), mean_over_processes(after))
        )
    precond.remove()
    return [param.detach().clone() for param in model.parameters()], dampings


def worker(rank: int, world_size: int) -> dict:
    local = GLOBAL_BATCH // world_size
    shard = slice(rank * local, (rank + 1) * local)
    return {
        "configs": [
            train(DistributedDataParallel(make_model()), *config, shard) for config in CONFIGS
        ],
        "factored": [
            train_factored_adaptive(DistributedDataParallel(make_model()), placement, shard)
            for placement in PLACEMENTS
        ],
    }


@pytest.fixture(scope="module")
def results_by_rank(tmp_path_factory) -> list[dict]:
    """Run :func:`worker` on 2 gloo processes once; the results of each rank."""
    return run_on_processes(worker, workdir=tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def two_process_results(results_by_rank) -> dict:
    """Rank 0's results."""
    return results_by_rank[0]


def test_the_replicas_stay_bitwise_identical(results_by_rank) -> None:
    """Every process preconditions with the same tensors in the same memory layout: a layer's
    eigenbasis or damped inverses computed on its owner (column-major, as LAPACK returns them)
    and broadcast into another process's buffers must not make the BLAS round differently
    there, or the replicas drift apart step by step."""
    first, second = results_by_rank
    runs = [*zip(first["configs"], second["configs"], strict=True)]
    runs += [(a[0], b[0]) for a, b in zip(first["factored"], second["factored"], strict=True)]
    for params, other in runs:
        for a, b in zip(params, other, strict=True):
            assert torch.equal(a, b)


def test_two_gloo_processes_equal_one_process_on_the_global_batch(two_process_results) -> None:
    for config, params in zip(CONFIGS, two_process_results["configs"], strict=True):
        single = train(make_model(), *config, slice(None))
        moved = any(
            not torch.equal(a, b) for a, b in zip(single, make_model().parameters(), strict=True)
        )
        assert moved, f"{config}: training did not move the parameters"
        for expected, actual in zip(single, params, strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_two_gloo_processes_equal_one_process_with_factored_adaptive_damping(
    two_process_results,
) -> None:
    results = two_process_results["factored"]
    for placement, (params, dampings) in zip(PLACEMENTS, results, strict=True):
        single, single_dampings = train_factored_adaptive(make_model(), placement, slice(None))
        assert len(set(single_dampings)) > 2, f"the damping never changed: {single_dampings}"
        assert dampings == pytest.approx(single_dampings, rel=1e-9)
        for expected, actual in zip(single, params, strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_assign_owners_balances_costs() -> None:
    assert assign_owners([1.0, 8.0, 1.0, 7.0], 2) == [1, 0, 0, 1]
    assert assign_owners([3.0, 3.0], 1) == [0, 0]
    with pytest.raises(ValueError, match="size"):
        assign_owners([1.0], 0)
