"""K-FAC under activation checkpointing (``torch.utils.checkpoint``), which runs the
checkpointed layers' forward again during the backward pass."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kfac_training import fisher_options, train_steps
from natgrad.optim import EKFAC, KFAC


class Checkpointed(nn.Module):
    def __init__(self, checkpointed: bool, reentrant: bool) -> None:
        super().__init__()
        self.checkpointed, self.reentrant = checkpointed, reentrant
        self.block = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh())
        self.head = nn.Linear(4, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.checkpointed:
            hidden = checkpoint(self.block, inputs, use_reentrant=self.reentrant)
        else:
            hidden = self.block(inputs)
        return self.head(hidden)


def train(preconditioner, fisher_type: str, checkpointed: bool, reentrant: bool = False):
    """Parameters and preconditioner after 3 preconditioned SGD steps."""
    torch.manual_seed(0)
    model = Checkpointed(checkpointed, reentrant)
    options = {"damping": 0.1, "inv_update_interval": 1}
    precond = preconditioner(model, **options, **fisher_options(fisher_type, seed=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(2)
    # the reentrant variant needs an input that requires grad to build a graph through the block
    inputs = torch.randn(8, 3, generator=generator).requires_grad_(reentrant)
    targets = torch.randint(0, 3, (8,), generator=generator)
    train_steps(model, precond, optimizer, inputs, targets, steps=3)
    return [p.detach().clone() for p in model.parameters()], precond


@pytest.mark.parametrize(
    ("preconditioner", "fisher_type", "reentrant"),
    [
        (KFAC, "empirical", False),
        (KFAC, "empirical", True),
        (KFAC, "mc", False),
        (KFAC, "exact", False),
        (EKFAC, "empirical", False),
        (EKFAC, "mc", False),
        (EKFAC, "exact", False),
    ],
)
def test_checkpointed_training_equals_plain_training(preconditioner, fisher_type, reentrant):
    """Each checkpointed call is recorded once: non-reentrant checkpointing back-propagates
    through the first forward's outputs (the recomputation's take no part in any backward
    pass), reentrant checkpointing through the recomputation's (its first forward runs without
    gradients)."""
    expected, expected_precond = train(preconditioner, fisher_type, checkpointed=False)
    got, got_precond = train(preconditioner, fisher_type, checkpointed=True, reentrant=reentrant)
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(got_precond.layers, expected_precond.layers, strict=True):
        torch.testing.assert_close(ours.input_factor, theirs.input_factor)
        torch.testing.assert_close(ours.output_factor, theirs.output_factor)


def test_reentrant_checkpointing_with_the_monte_carlo_fisher_is_named() -> None:
    """Reentrant checkpointing runs the block without gradients first and records it only
    during the loss's backward pass, after the Monte-Carlo backward: the block's layers get no
    statistics, and the user is told so."""
    with pytest.warns(RuntimeWarning, match=r"\['block.0', 'block.2'\] recorded no statistics"):
        _, precond = train(KFAC, "mc", checkpointed=True, reentrant=True)
    assert [state.input_factor is None for state in precond.layers] == [True, True, False]
