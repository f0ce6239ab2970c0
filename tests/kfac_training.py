"""The K-FAC training loop that several test modules run: forward, the Monte-Carlo backward
where the preconditioner samples, the loss backward, ``precond.step()``, the optimizer's step."""

from collections.abc import Callable

import torch
from torch import nn

from natgrad.optim import KFAC


def fisher_options(fisher_type: str, seed: int) -> dict:
    """Constructor options of a K-FAC with ``fisher_type`` (the MC and exact ones categorical,
    the MC one seeded)."""
    if fisher_type == "exact":
        return {"fisher_type": "exact", "likelihood": "categorical"}
    if fisher_type != "mc":
        return {"fisher_type": fisher_type}
    generator = torch.Generator().manual_seed(seed)
    return {"fisher_type": "mc", "likelihood": "categorical", "generator": generator}


def train_steps(
    forward: Callable[[torch.Tensor], torch.Tensor],
    precond: KFAC,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
) -> None:
    """``steps`` preconditioned steps on the cross-entropy of one batch."""
    for _ in range(steps):
        optimizer.zero_grad()
        outputs = forward(inputs)
        if precond.fisher_type != "empirical":
            precond.sample_backward(outputs)
        nn.functional.cross_entropy(outputs, targets).backward()
        precond.step()
        optimizer.step()
