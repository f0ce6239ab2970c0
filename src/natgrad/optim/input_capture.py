"""The inputs of a model's latest forward pass, for optimizers that re-run the model outside
the user's closure (exact Fisher products need the batch the closure used)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["InputCapture"]


class InputCapture:
    """The first positional input (detached) of ``module``'s latest forward pass.

    A forward pre-hook records it. The hook is a closure that ignores every module but
    ``module``: ``copy.deepcopy`` of a model copies its hooks onto the copy (an EMA model, a
    twin run), and there the hook must neither record the copy's inputs nor, as a bound method
    would, drag a deep copy of its optimizer (state, preconditioner and all) along.

    Parameters
    ----------
    module : nn.Module
    only_with_grad : bool, default False
        Ignore forward passes run with gradients disabled (e.g. evaluations between steps).

    Attributes
    ----------
    inputs : Tensor or None
        The captured inputs ``(N, ...)``; ``None`` until a pass is recorded (or after a reset).
    """

    def __init__(self, module: nn.Module, *, only_with_grad: bool = False) -> None:
        self.inputs: Tensor | None = None

        def capture(called: nn.Module, args: tuple[Any, ...]) -> None:
            if called is not module or not args or not isinstance(args[0], Tensor):
                return
            if only_with_grad and not torch.is_grad_enabled():
                return
            self.inputs = args[0].detach()

        self._handle = module.register_forward_pre_hook(capture)

    def run(self, closure: Callable[[], Tensor]) -> Tensor:
        """Run ``closure`` with gradients enabled and return its loss; it must run the model.

        The inputs are cleared first, so a closure that skips the model raises instead of
        leaving an earlier batch's inputs in place.

        Raises
        ------
        RuntimeError
            If ``closure`` did not run a forward pass of the module (with gradients, when
            ``only_with_grad``).
        """
        self.inputs = None
        with torch.enable_grad():
            loss = closure()
        if self.inputs is None:
            raise RuntimeError("the closure did not run the model forward: no inputs captured")
        return loss

    def remove(self) -> None:
        """Detach the hook from the module."""
        self._handle.remove()
