"""QuadraticModelOptimizer under DDP refuses a step on every process when the loss is not
finite on one of them.

DDP averages the gradients, so every process gets the non-finite gradient of the one whose
batch holds a NaN; if only that process refused (its own loss is the non-finite one), the
others would go on into the K-FAC preconditioner's and the Fisher products' all-reduces and
wait there for it. Here process 1's batch of the second step holds a NaN: both processes must
refuse that step, stay equal, and take the other steps as one process on the global batch
does (which refuses the same step).
"""

import warnings

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distributed_helpers import run_on_processes
from natgrad.optim import KFAC, QuadraticModelOptimizer

STEPS = 4
GLOBAL_BATCH = 16
POISONED_STEP = 1


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(torch.float64)


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for step in range(STEPS):
        inputs = torch.randn(GLOBAL_BATCH, 4, generator=generator, dtype=torch.float64)
        if step == POISONED_STEP:
            inputs[-1, 0] = float("nan")  # in process 1's half
        batches.append((inputs, torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator)))
    return batches


def train(model: nn.Module, shard: slice) -> dict:
    precond = KFAC(model, inv_update_interval=2, damping_mode="factored")
    optimizer = QuadraticModelOptimizer(model, "categorical", preconditioner=precond, damping=0.05)
    for inputs, targets in global_batches():

        def closure(inputs=inputs[shard], targets=targets[shard]) -> torch.Tensor:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the refusal and K-FAC's skip
            optimizer.step(closure)
    precond.remove()
    params = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    return {"counters": dict(optimizer.counters), "params": params}


def worker(rank: int, world_size: int) -> dict:
    local = GLOBAL_BATCH // world_size
    return train(DistributedDataParallel(make_model()), slice(rank * local, (rank + 1) * local))


def test_a_loss_non_finite_on_one_process_is_refused_on_every_process(tmp_path) -> None:
    results = run_on_processes(worker, workdir=tmp_path)
    reference = train(make_model(), slice(None))
    assert reference["counters"]["refused_steps"] == 1
    for result in results:
        assert result["counters"] == reference["counters"]
        assert torch.isfinite(result["params"]).all()
        torch.testing.assert_close(result["params"], reference["params"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(results[0]["params"], results[1]["params"], rtol=0, atol=0)
