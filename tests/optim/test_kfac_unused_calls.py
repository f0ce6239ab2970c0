"""A forward pass with gradients enabled whose output is never back-propagated (a training
accuracy computed without ``torch.no_grad()``, a second model call for logging) must not change
what K-FAC records: only the calls that a backward pass reaches count, in ``A`` as in ``G``."""

import pytest
import torch
from torch import nn

from kfac_training import fisher_options
from natgrad.optim import EKFAC, KFAC

EXTRA_PASSES = ["before the training forward", "after the backward", "of a layer alone"]


def _train(preconditioner, fisher_type: str, extra_pass: str | None) -> torch.Tensor:
    """Four K-FAC steps on a small classifier; ``extra_pass`` adds a forward pass with gradients
    enabled that nothing back-propagates. Returns the parameters after the steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    options = fisher_options(fisher_type, seed=3)
    precond = preconditioner(model, damping=0.1, inv_update_interval=1, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        inputs = torch.randn(16, 4, generator=generator, dtype=torch.float64)
        targets = torch.randint(0, 3, (16,), generator=generator)
        other_inputs = torch.randn(8, 4, generator=generator, dtype=torch.float64)
        if extra_pass == "before the training forward":
            model(other_inputs).argmax(dim=1)
        if extra_pass == "of a layer alone":
            model[0](other_inputs)
        optimizer.zero_grad()
        outputs = model(inputs)
        if fisher_type != "empirical":
            precond.sample_backward(outputs)
        nn.functional.cross_entropy(outputs, targets).backward()
        if extra_pass == "after the backward":
            model(other_inputs).argmax(dim=1)
        precond.step()
        optimizer.step()
    precond.remove()
    return torch.cat([param.detach().flatten() for param in model.parameters()])


@pytest.mark.parametrize("extra_pass", EXTRA_PASSES)
@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "exact"])
@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
def test_a_forward_pass_without_backward_records_nothing(
    preconditioner, fisher_type: str, extra_pass: str
) -> None:
    """Its inputs were added to ``A`` when the layer ran, without any output gradient in ``G``:
    the steps moved by 2e-2 from those of the same loop without it."""
    expected = _train(preconditioner, fisher_type, None)
    torch.testing.assert_close(
        _train(preconditioner, fisher_type, extra_pass), expected, rtol=0, atol=0
    )


def test_only_the_backpropagated_call_reaches_the_input_factor() -> None:
    """A layer called on two batches, one of which reaches the loss: ``A`` is that batch's
    ``E[a aᵀ]`` (bias column included), against a float64 hand computation."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    precond = KFAC(layer, factor_decay=0.0)
    used, unused = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    layer(unused)
    layer(used).square().sum().backward()
    precond.step()
    precond.remove()
    rows = torch.cat([used, torch.ones(5, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(precond.layers[0].input_factor, rows.T @ rows / 5)
