"""Standard test functions for minimisation, vectorised over leading dimensions.

Each maps ``x`` of shape ``(..., d)`` to values of shape ``(...)``; the minimum is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(x: Tensor, min_dim: int = 1) -> Tensor:
    if not isinstance(x, Tensor):  # a tensor stays on its device, whatever the default one
        x = torch.as_tensor(x)
    if x.ndim < 1 or x.shape[-1] < min_dim:
        raise ValueError(f"x must have a last dimension of at least {min_dim}, got {x.shape}")
    return x


def sphere(x: Tensor) -> Tensor:
    """``Σᵢ xᵢ²``, minimum at 0."""
    return _check(x).square().sum(-1)


def ellipsoid(x: Tensor, condition: float = 1e6) -> Tensor:
    """``Σᵢ condition^((i−1)/(d−1)) xᵢ²`` (axis-parallel, condition number ``condition``)."""
    x = _check(x)
    dim = x.shape[-1]
    exponents = torch.arange(dim, dtype=x.dtype, device=x.device) / max(dim - 1, 1)
    return (condition**exponents * x.square()).sum(-1)


def rosenbrock(x: Tensor) -> Tensor:
    """``Σᵢ 100 (xᵢ₊₁ − xᵢ²)² + (1 − xᵢ)²``, ``d ≥ 2``, minimum at ``(1, …, 1)``."""
    x = _check(x, min_dim=2)
    head, tail = x[..., :-1], x[..., 1:]
    return (100.0 * (tail - head.square()).square() + (1.0 - head).square()).sum(-1)
