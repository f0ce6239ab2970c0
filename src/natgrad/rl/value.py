"""State-value baseline ``V(s)`` and its least-squares fit."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from natgrad._validation import positive_int
from natgrad.rl.policies import mlp


class ValueFunction(nn.Module):
    """MLP ``V(s)``: maps observations ``(N, obs_dim)`` to values ``(N,)``.

    Parameters
    ----------
    obs_dim : int
    hidden_sizes : sequence of int, default (32, 32)
    generator : torch.Generator, optional
        Source of the initial weights.
    """

    def __init__(
        self,
        obs_dim: int,
        hidden_sizes: Sequence[int] = (32, 32),
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.obs_dim = positive_int("obs_dim", obs_dim)
        self.net = mlp(obs_dim, 1, hidden_sizes, generator, output_gain=1.0)

    def forward(self, observations: Tensor) -> Tensor:
        return self.net(observations).squeeze(-1)


def fit_value_function(
    value_function: ValueFunction,
    observations: Tensor,
    targets: Tensor,
    optimizer: torch.optim.Optimizer,
    steps: int,
) -> float:
    """Take ``steps`` full-batch optimizer steps on the mean squared error to ``targets``.

    Parameters
    ----------
    value_function : ValueFunction
    observations : Tensor of shape (N, obs_dim)
    targets : Tensor of shape (N,)
        Regression targets (λ-returns).
    optimizer : torch.optim.Optimizer
        Over ``value_function.parameters()`` (its state persists across calls).
    steps : int
        Number of steps.

    Returns
    -------
    float
        The mean squared error after the last step.

    Raises
    ------
    ValueError
        If ``targets`` is not of shape ``(N,)`` (a ``(N, 1)`` column would broadcast into a
        wrong ``(N, N)`` error).
    """
    expected = (observations.shape[0],)
    if tuple(targets.shape) != expected:
        raise ValueError(f"targets must have shape {expected}, got {tuple(targets.shape)}")
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (value_function(observations) - targets).square().mean()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((value_function(observations) - targets).square().mean())
