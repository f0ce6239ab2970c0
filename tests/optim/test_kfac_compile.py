"""K-FAC/EKFAC on a ``torch.compile``d model train exactly as on the eager model.

The statistics come from forward hooks on the layers and tensor hooks on their outputs, which
TorchDynamo must run (with graph breaks where they mutate the preconditioner's state); the
hooks are attached only on recording steps, so the compiled model also switches between
graphs. The ``aot_eager`` backend traces as ``torch.compile`` does but needs no C++ compiler.
"""

import pytest
import torch
import torch._dynamo
from torch import nn

from kfac_training import fisher_options, train_steps
from natgrad.optim import EKFAC, KFAC


def convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 16, 8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )


def train(preconditioner: type[KFAC], fisher_type: str, compiled: bool, steps: int = 9):
    """Parameters and preconditioner after ``steps`` steps of K-FAC-preconditioned SGD."""
    torch.manual_seed(0)
    model = convnet()
    inputs = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    options = {"factor_update_interval": 2, "inv_update_interval": 4, "damping": 0.1}
    precond = preconditioner(model, **options, **fisher_options(fisher_type, seed=3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    train_steps(forward, precond, optimizer, inputs, targets, steps)
    return [p.detach().clone() for p in model.parameters()], precond


@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "exact"])
def test_a_compiled_model_trains_as_the_eager_one(preconditioner, fisher_type) -> None:
    torch._dynamo.reset()
    eager, eager_precond = train(preconditioner, fisher_type, compiled=False)
    compiled, compiled_precond = train(preconditioner, fisher_type, compiled=True)
    for expected, got in zip(eager, compiled, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for expected, got in zip(eager_precond.layers, compiled_precond.layers, strict=True):
        assert got.input_factor is not None
        torch.testing.assert_close(got.input_factor, expected.input_factor)
        torch.testing.assert_close(got.output_factor, expected.output_factor)
