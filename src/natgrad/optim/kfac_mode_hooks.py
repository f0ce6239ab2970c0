"""Forward hooks that run a module's forward under a ``TorchFunctionMode`` of K-FAC's.

Attentions and recurrent layers multiply by their weights inside fused functions
(``F.multi_head_attention_forward``, ``torch._VF.lstm``) that no layer hook sees. On recording
steps their forward runs under a mode that takes over that function and records the products
with the weights (:mod:`natgrad.optim.kfac_attention`, :mod:`natgrad.optim.kfac_recurrent`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from natgrad.optim.kfac import KFAC

__all__ = ["ModeHooks", "RecordingMode", "linear_view"]

LinearType = TypeVar("LinearType", bound=nn.Linear)


def linear_view(
    layer_type: type[LinearType], weight: nn.Parameter, bias: nn.Parameter | None
) -> LinearType:
    """A ``layer_type`` (an ``nn.Linear`` subclass, never called) holding ``weight`` and
    ``bias`` themselves, not copies: how K-FAC preconditions a weight that a fused function
    uses as a linear map."""
    layer = layer_type.__new__(layer_type)
    nn.Module.__init__(layer)
    layer.out_features, layer.in_features = weight.shape
    layer.weight = weight
    layer.bias = bias
    return layer


class RecordingMode(TorchFunctionMode):
    """Active during one forward pass of ``layers.module`` on a recording step: takes over the
    calls of the fused function that :meth:`_takes_over` names while the preconditioner
    records that module, running them with the products with the weights recorded
    (:meth:`_run`); every other torch function passes through."""

    def __init__(self, precond: KFAC, layers: Any) -> None:
        super().__init__()
        self._precond = precond
        self._layers = layers

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if self._takes_over(func) and self._precond._unrolling(self._layers.module):
            # eager: a compiled recording forward would back-propagate (the weight-locality
            # probe, sample_backward) with retain_graph=True through AOTAutograd's donated
            # buffers, which raises
            return torch._dynamo.disable(self._run)(func, args, kwargs)
        return func(*args, **kwargs)

    def _takes_over(self, func: Callable[..., Any]) -> bool:
        raise NotImplementedError

    def _run(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError


class ModeHooks:
    """The forward pre-hook and (always called) forward hook that run a module's forward under
    the mode ``mode_type(precond, layers)``. They hold the preconditioner weakly and pickle and
    deep-copy to inert hooks, as the layers' hooks do."""

    def __init__(
        self, precond: KFAC | None, mode_type: type[RecordingMode] | None, layers: Any
    ) -> None:
        self._precond = None if precond is None else weakref.ref(precond)
        self._mode_type = mode_type
        self._layers = layers
        self._active: list[TorchFunctionMode] = []

    def enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        precond = None if self._precond is None else self._precond()
        if precond is None:
            return
        mode = self._mode_type(precond, self._layers)
        mode.__enter__()
        self._active.append(mode)

    def leave(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._active:
            self._active.pop().__exit__(None, None, None)

    def register(self, module: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Attach both hooks to ``module``; returns their handles."""
        return [
            module.register_forward_pre_hook(self.enter),
            module.register_forward_hook(self.leave, always_call=True),
        ]

    def __reduce__(self) -> tuple[type[ModeHooks], tuple[None, None, None]]:
        return ModeHooks, (None, None, None)
