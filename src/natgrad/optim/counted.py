"""A ``torch.optim.Optimizer`` base with step counters and refused steps.

Optimizers that may refuse a step (non-finite loss, gradient or direction) leave the parameters
as they are, warn, and count it; the counters round-trip through ``state_dict()``. Optimizers
that validate their group options override :meth:`CountedOptimizer._check_group_options` and
call :meth:`CountedOptimizer._check_param_groups` at the start of ``step()``, so that an option
edited in ``param_groups`` by hand (or by a scheduler) is checked too. A copy
(``copy.deepcopy``, ``pickle``) keeps every attribute of the optimizer, where
``torch.optim.Optimizer`` keeps only its defaults, state and parameter groups, and a copied
optimizer with options of its own would fail at its next step.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor


class CountedOptimizer(torch.optim.Optimizer):
    """Base class: ``self.counters`` (a dict of ints, set by the subclass, with at least
    ``"refused_steps"``) and the state of ``self.generator`` (if the subclass sets one) are
    saved by :meth:`state_dict` and restored by :meth:`load_state_dict`."""

    counters: dict[str, int]
    generator: torch.Generator | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Every attribute but torch's hook registries (which ``__setstate__`` makes anew)."""
        attributes = {
            name: value for name, value in vars(self).items() if not _is_hook_registry(name)
        }
        return {**attributes, **super().__getstate__()}

    def _check_group_options(self, group: dict[str, Any]) -> None:
        """Raise ``TypeError`` or ``ValueError`` naming an invalid option of ``group``; the base
        class checks nothing."""

    def _check_param_groups(self) -> None:
        """Check every param group's options as they are now (edited since they were added?).

        Raises
        ------
        TypeError, ValueError
            The error of :meth:`_check_group_options`, prefixed with ``param_groups[i]``.
        """
        for index, group in enumerate(self.param_groups):
            try:
                self._check_group_options(group)
            except (TypeError, ValueError) as error:
                raise type(error)(f"param_groups[{index}]: {error}") from None

    def _check_gradient(self, grad: Tensor) -> None:
        """Raise ``TypeError`` for a sparse or complex gradient, which these optimizers'
        statistics (squares, outer products) do not support."""
        name = type(self).__name__
        if grad.layout != torch.strided:
            raise TypeError(f"{name} does not support sparse gradients, got layout {grad.layout}")
        if not grad.dtype.is_floating_point:
            raise TypeError(
                f"{name} supports real floating point gradients only, got dtype {grad.dtype}"
            )

    def _refuse(self, loss: Tensor, why: str) -> Tensor:
        """Count a refused step, warn with ``why`` and return ``loss``."""
        self.counters["refused_steps"] += 1
        warnings.warn(f"{type(self).__name__} refused a step: {why}", RuntimeWarning, stacklevel=3)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, with the step counters and, for an optimizer that samples with
        a ``generator``, its state under ``"generator_state"`` (a resumed run draws the same
        samples)."""
        state = super().state_dict()
        state["counters"] = dict(self.counters)
        if self.generator is not None:
            state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (the generator's state where both have one)."""
        state = dict(state_dict)
        self.counters = dict(state.pop("counters", self.counters))
        generator_state = state.pop("generator_state", None)
        super().load_state_dict(state)
        if generator_state is not None and self.generator is not None:
            self.generator.set_state(generator_state)


def _is_hook_registry(name: str) -> bool:
    """``_optimizer_step_pre_hooks`` and the like: callables registered on the optimizer, which
    ``torch.optim.Optimizer`` leaves out of its pickled state."""
    return name.startswith("_optimizer_") and name.endswith("_hooks")
