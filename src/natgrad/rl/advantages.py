"""Generalised advantage estimation (Schulman et al. 2016)."""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad._validation import unit_interval


def gae_advantages(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    episode_ends: Tensor,
    gamma: float = 0.99,
    lam: float = 0.97,
) -> Tensor:
    """GAE(γ, λ) advantages of one trajectory batch (possibly several episodes in a row).

    ``δₜ = rₜ + γ (1 − terminatedₜ) V(sₜ₊₁) − V(sₜ)`` and
    ``Âₜ = δₜ + γλ (1 − endₜ) Âₜ₊₁``: a terminal state bootstraps with zero, a truncated one
    (time limit, or the batch's last step) with the value of its next observation.

    Parameters
    ----------
    rewards, values, next_values : Tensor of shape (T,)
        ``rₜ``, ``V(sₜ)`` and ``V(sₜ₊₁)`` (``sₜ₊₁`` the observation the step led to, also
        when the episode ended there).
    terminated : bool Tensor of shape (T,)
        The step reached a terminal state.
    episode_ends : bool Tensor of shape (T,)
        The episode ended after the step (terminated, truncated, or the batch ended): with
        gymnasium's flags, ``terminated | truncated``, not ``truncated`` alone.
    gamma, lam : float in [0, 1]
        Discount and GAE parameter.

    Returns
    -------
    Tensor of shape (T,)
        The advantages ``Âₜ``; ``Âₜ + V(sₜ)`` are the λ-returns used as value targets.

    Raises
    ------
    ValueError
        If ``rewards`` is not 1-d, another input's shape differs from it, or a terminated
        step is not marked as an episode end.
    """
    unit_interval("gamma", gamma, closed_right=True)
    unit_interval("lam", lam, closed_right=True)
    _check_trajectory(rewards, values, next_values, terminated, episode_ends)
    continuing = (~terminated.bool()).to(rewards.dtype)
    deltas = rewards + gamma * continuing * next_values - values
    carry = (~episode_ends.bool()).to(rewards.dtype) * (gamma * lam)
    advantages = torch.empty_like(rewards)
    running = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    for step in range(rewards.shape[0] - 1, -1, -1):
        running = deltas[step] + carry[step] * running
        advantages[step] = running
    return advantages


def _check_trajectory(
    rewards: Tensor, values: Tensor, next_values: Tensor, terminated: Tensor, episode_ends: Tensor
) -> None:
    if rewards.ndim != 1:
        raise ValueError(f"rewards must have shape (T,), got {tuple(rewards.shape)}")
    length = rewards.shape[0]
    for name, tensor in (
        ("values", values),
        ("next_values", next_values),
        ("terminated", terminated),
        ("episode_ends", episode_ends),
    ):
        if tensor.shape != (length,):
            raise ValueError(f"{name} must have shape ({length},), got {tuple(tensor.shape)}")
    unmarked = torch.nonzero(terminated.bool() & ~episode_ends.bool()).flatten().tolist()
    if unmarked:
        raise ValueError(
            f"episode_ends must be True wherever terminated is (terminated | truncated); "
            f"steps {unmarked} are terminated but not episode ends"
        )
