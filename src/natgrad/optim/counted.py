"""A ``torch.optim.Optimizer`` base with step counters and refused steps.

Optimizers that may refuse a step (non-finite loss, gradient or direction) leave the parameters
as they are, warn, and count it; the counters round-trip through ``state_dict()``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor


class CountedOptimizer(torch.optim.Optimizer):
    """Base class: ``self.counters`` (a dict of ints, set by the subclass, with at least
    ``"refused_steps"``) is saved by :meth:`state_dict` and restored by
    :meth:`load_state_dict`."""

    counters: dict[str, int]

    def _refuse(self, loss: Tensor, why: str) -> Tensor:
        """Count a refused step, warn with ``why`` and return ``loss``."""
        self.counters["refused_steps"] += 1
        warnings.warn(f"{type(self).__name__} refused a step: {why}", RuntimeWarning, stacklevel=3)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, with the step counters."""
        state = super().state_dict()
        state["counters"] = dict(self.counters)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        state = dict(state_dict)
        self.counters = dict(state.pop("counters", self.counters))
        super().load_state_dict(state)
