"""EKFAC's eigenvalue re-estimation under torch.distributed is one agreed collective.

Every process all-reduces the same list of sums and counts, whichever layers its own batch
called: a layer that one process's batch never reaches contributes zeros there. Before, each
process passed only the layers it had pairs for, so with a branch taken by one process only the
lists were paired wrongly (two heads of one shape: each head's eigenvalues got the other head's
sums, silently) or differed in length (an error or a hang). And an exception of one process's
local estimate is raised on every process (:class:`~natgrad.distributed.ProcessFailure` on the
others) at that collective, instead of leaving them waiting in it. Both checks compare with one
process on the same global batch; the short collective timeout makes a hang fail.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from distributed_helpers import FAILURE_TIMEOUT, outcome, run_on_processes
from natgrad.optim import EKFAC
from natgrad.optim.kfac_layers import KroneckerLayerState

SHARES = (5, 7)
GLOBAL = sum(SHARES)
IN, HIDDEN, OUT = 3, 4, 3
STEPS = 4
ROUTES = {  # the layers after the trunk that each process's batch goes through
    "same-shaped heads": (("head_a",), ("head_b",)),
    "a layer on process 0 only": (("extra", "head_a"), ("head_b",)),
}


class Branched(nn.Module):
    """A trunk, then each group of rows along its own path of layers (tanh between)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(IN, HIDDEN)
        self.extra = nn.Linear(HIDDEN, HIDDEN)
        self.head_a = nn.Linear(HIDDEN, OUT)
        self.head_b = nn.Linear(HIDDEN, OUT)
        self.double()

    def forward(self, inputs: Tensor, paths: Sequence[tuple[int, tuple[str, ...]]]) -> Tensor:
        hidden = torch.tanh(self.trunk(inputs))
        outputs, start = [], 0
        for rows, path in paths:
            part = hidden[start : start + rows]
            start += rows
            for name in path[:-1]:
                part = torch.tanh(getattr(self, name)(part))
            outputs.append(getattr(self, path[-1])(part))
        return torch.cat(outputs)


def batch(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(step + 1)
    inputs = torch.randn(GLOBAL, IN, generator=generator, dtype=torch.float64)
    return inputs, torch.randint(0, OUT, (GLOBAL,), generator=generator)


def train_branched(routes: str, rank: int | None) -> dict[str, Tensor | None]:
    """EKFAC (exact Fisher) + SGD on ``rank``'s share, whose rows take that process's path
    (``None``: one process on the global batch, each share along its path); returns the
    parameters and the layers' eigenvalues."""
    model = Branched()
    precond = EKFAC(
        model,
        fisher_type="exact",
        likelihood="categorical",
        factor_decay=0.8,
        inv_update_interval=2,
        damping=0.01,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    shares = range(len(SHARES)) if rank is None else [rank]
    paths = [(SHARES[share], ROUTES[routes][share]) for share in shares]
    rows = slice(0, GLOBAL) if rank is None else slice(sum(SHARES[:rank]), sum(SHARES[: rank + 1]))
    for step in range(STEPS):
        inputs, targets = batch(step)
        optimizer.zero_grad()
        outputs = model(inputs[rows], paths)
        precond.sample_backward(outputs)
        loss = nn.functional.cross_entropy(outputs, targets[rows], reduction="sum") / GLOBAL
        loss.backward()
        if rank is not None:  # the global batch's mean gradient
            for param in model.parameters():
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad)
        precond.step()
        optimizer.step()
    result: dict[str, Tensor | None] = {
        f"eigenvalues {state.name}": state.eigenvalues for state in precond.layers
    }
    result.update({name: param.detach() for name, param in model.named_parameters()})
    return result


def branched_worker(rank: int, world_size: int, routes: str) -> dict[str, Tensor | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the layers' unequal sample counts
        return train_branched(routes, rank)


@pytest.mark.parametrize("routes", list(ROUTES))
def test_a_layer_one_process_never_calls_equals_one_process(tmp_path, routes: str) -> None:
    results = run_on_processes(
        branched_worker, (routes,), workdir=tmp_path, timeout=FAILURE_TIMEOUT
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        reference = train_branched(routes, None)
    called = {"trunk", *(name for path in ROUTES[routes] for name in path)}
    for name, value in reference.items():
        if name.startswith("eigenvalues") and name.split()[1] in called:
            assert value is not None, name
        for result in results:
            if value is None:
                assert result[name] is None, name
            else:
                torch.testing.assert_close(result[name], value, msg=name)


# -- one process's local estimate fails ----------------------------------------------------------
def injected_failure(self: KroneckerLayerState) -> None:
    raise torch.linalg.LinAlgError("injected: the eigenvalue estimate failed on this process")


def train_failing(rank: int | None) -> dict:
    """EKFAC (empirical Fisher) + SGD, four steps on equal shares (``None``: one process on
    the global batch); the third step's eigenvalue estimate fails on process 1 (one process:
    its own)."""
    torch.manual_seed(0)  # the same model on every process, forked or spawned
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)).double()
    precond = EKFAC(model, factor_decay=0.8, inv_update_interval=2, damping=0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    half = GLOBAL // 2
    rows = slice(0, GLOBAL) if rank is None else slice(rank * half, (rank + 1) * half)
    outcomes = []
    for step in range(STEPS):
        inputs, targets = batch(step)
        fails = step == 2 and rank in (1, None)

        def take_step(inputs: Tensor = inputs[rows], targets: Tensor = targets[rows]) -> None:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            if rank is not None:  # the mean of the shares' mean losses, as in DDP
                for param in model.parameters():
                    dist.all_reduce(param.grad)
                    param.grad /= 2
            precond.step()
            optimizer.step()

        original = KroneckerLayerState.projected_moment
        if fails:
            KroneckerLayerState.projected_moment = injected_failure
        try:
            outcomes.append(outcome(take_step))
        finally:
            KroneckerLayerState.projected_moment = original
    params = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    return {"outcomes": outcomes, "params": params}


def failing_worker(rank: int, world_size: int) -> dict:
    return train_failing(rank)


def test_a_failed_local_estimate_is_raised_on_every_process(tmp_path) -> None:
    results = run_on_processes(failing_worker, workdir=tmp_path, timeout=FAILURE_TIMEOUT)
    reference = train_failing(None)
    (type0, message0), (type1, message1) = (result["outcomes"][2] for result in results)
    assert (type1, message1) == reference["outcomes"][2]
    assert type1 == torch.linalg.LinAlgError.__name__, type1
    assert message1.startswith("injected"), message1
    assert type0 == "ProcessFailure", message0
    assert message0 == f"process 1 failed: {type1}: {message1}"
    for step in (0, 1, 3):
        assert [result["outcomes"][step] for result in results] == [("ok", "")] * 2
    assert torch.equal(results[0]["params"], results[1]["params"])
    torch.testing.assert_close(results[0]["params"], reference["params"])
