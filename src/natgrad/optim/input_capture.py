"""The inputs of a model's latest forward pass, for optimizers that re-run the model outside
the user's closure (exact Fisher products need the batch the closure used)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from natgrad.curvature.evaluation_scope import in_curvature_evaluation

__all__ = ["InputCapture"]


class _CaptureHook:
    """The forward pre-hook of an :class:`InputCapture`. It holds the capture weakly, and
    pickles and deep-copies to an inert hook: ``copy.deepcopy`` of a model copies its hooks onto
    the copy (an EMA model, a twin run), where the hook must neither record the copy's inputs
    nor drag a copy of the optimizer along, and ``torch.save(model)`` must not fail on it."""

    def __init__(self, capture: InputCapture | None) -> None:
        self._capture = None if capture is None else weakref.ref(capture)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        capture = None if self._capture is None else self._capture()
        if capture is not None:
            capture.record(args)

    def __reduce__(self) -> tuple[type[_CaptureHook], tuple[None]]:
        return _CaptureHook, (None,)


class InputCapture:
    """The first positional input (detached) of ``module``'s latest forward pass.

    A forward pre-hook records it, except in the passes of natgrad's curvature builders
    (:func:`~natgrad.curvature.evaluation_scope.curvature_evaluation`). A copy of the capture
    (``copy.deepcopy`` or ``pickle`` of its optimizer) hooks the copy of ``module``; a copy of
    the module alone carries an inert hook.

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
        self.module = module
        self.only_with_grad = only_with_grad
        self.inputs: Tensor | None = None
        self._handle = module.register_forward_pre_hook(_CaptureHook(self))

    def __getstate__(self) -> dict[str, Any]:
        return {"module": self.module, "only_with_grad": self.only_with_grad}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["module"], only_with_grad=state["only_with_grad"])

    def record(self, args: tuple[Any, ...]) -> None:
        """Keep the first positional argument of a forward pass of the module."""
        if not args or not isinstance(args[0], Tensor) or in_curvature_evaluation():
            return
        if self.only_with_grad and not torch.is_grad_enabled():
            return
        self.inputs = args[0].detach()

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
