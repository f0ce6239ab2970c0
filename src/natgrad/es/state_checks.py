"""Checks of the values in a saved NES state; each error names the key and the value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def describe(value: Tensor, bad: Tensor) -> str:
    """``value`` and (the first ten of) the indices where ``bad`` is true, for a message."""
    indices = [tuple(i) if len(i) > 1 else i[0] for i in torch.nonzero(bad).tolist()]
    shown = ", ".join(map(str, indices[:10])) + (", ..." if len(indices) > 10 else "")
    return f"{value!r} (at indices {shown})"


def checked_tensor(
    state_dict: Mapping[str, Any], name: str, shape: tuple[int, ...], dtype: torch.dtype
) -> Tensor:
    """A copy of ``state_dict[name]`` if it is a finite tensor of ``shape`` and ``dtype``.

    Raises
    ------
    ValueError
        Otherwise, naming the key, and the non-finite entries.
    """
    value = state_dict[name]
    if not isinstance(value, Tensor):
        raise ValueError(f"state_dict[{name!r}] must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape or value.dtype != dtype:
        raise ValueError(
            f"state_dict[{name!r}] must have shape {shape} and dtype {dtype}, got "
            f"shape {tuple(value.shape)} and dtype {value.dtype}"
        )
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        raise ValueError(f"state_dict[{name!r}] must be finite, got {describe(value, ~finite)}")
    return value.detach().clone()


def check_positive(name: str, value: Tensor) -> None:
    """Raise ``ValueError`` naming ``state_dict[name]`` unless every entry is ``> 0``."""
    bad = ~(value > 0)
    if bool(bad.any()):
        raise ValueError(f"state_dict[{name!r}] must be positive, got {describe(value, bad)}")


def check_invertible(name: str, matrix: Tensor) -> None:
    """Raise ``ValueError`` naming ``state_dict[name]`` unless ``matrix`` is numerically
    invertible: its 2-norm condition number below ``1/ε`` of its dtype."""
    singular_values = torch.linalg.svdvals(matrix)
    largest, smallest = float(singular_values[0]), float(singular_values[-1])
    condition = largest / smallest if smallest > 0 else float("inf")
    limit = 1.0 / torch.finfo(matrix.dtype).eps
    if not condition < limit:
        raise ValueError(
            f"state_dict[{name!r}] must be an invertible matrix, got {matrix!r} of condition "
            f"number {condition:.3g} (>= 1/eps = {limit:.3g} for {matrix.dtype})"
        )


def check_asked_samples(samples: Tensor, recomputed: Tensor) -> None:
    """Raise ``ValueError`` unless ``state_dict['asked_samples']`` equals ``recomputed``, the
    samples that ``state_dict['asked_noise']`` gives under the saved distribution, up to
    ``√ε`` of the largest sample (rounding, another BLAS)."""
    tolerance = torch.finfo(samples.dtype).eps ** 0.5
    scale = float(samples.abs().max())
    mismatch = (samples - recomputed).abs() > tolerance * scale
    if bool(mismatch.any()):
        raise ValueError(
            "state_dict['asked_samples'] are not the samples of state_dict['asked_noise'] "
            f"under the saved mean and step sizes: they differ at {describe(samples, mismatch)}"
        )


def checked_generator_state(state: Any, device: torch.device) -> Tensor:
    """``state`` if a generator on ``device`` accepts it (tried on a scratch generator).

    Raises
    ------
    ValueError
        If ``state`` is not a uint8 tensor or not a valid generator state.
    """
    if not isinstance(state, Tensor) or state.dtype != torch.uint8:
        raise ValueError(f"state_dict['generator_state'] must be a uint8 tensor, got {state!r}")
    try:
        torch.Generator(device=device).set_state(state)
    except RuntimeError as error:
        raise ValueError(f"state_dict['generator_state'] is not a valid state: {error}") from None
    return state
