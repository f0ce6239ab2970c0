"""Running a model to evaluate its curvature: whether natgrad is doing so, and with dropout off.

The curvature builders run the model again, under ``torch.func`` transforms (per-sample
Jacobians, Hessians, forward-mode products) or with hooks of their own (Kronecker factors,
layer diagonals). Hooks that a preconditioner keeps on the model's layers
(:class:`natgrad.optim.KFAC`) must not record those runs: inside a transform their in-place
sums would fail, and outside one they would add the builder's vectors to the training
statistics. They ask :func:`in_curvature_evaluation`.

The flag is per thread: the builders run the model's forward pass in the calling thread, where
the preconditioners' forward hooks decide whether to record.

The optimizers that build a curvature inside a training loop (:class:`natgrad.optim.
NaturalGradient`, :class:`natgrad.optim.QuadraticModelOptimizer`) do so under
:func:`dropout_off`: the model's dropout layers draw no masks there, so the curvature is that of
the network that dropout averages, one deterministic function.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch import nn

_state = threading.local()


@contextlib.contextmanager
def curvature_evaluation() -> Iterator[None]:
    """Mark the model runs inside this block as natgrad's own curvature evaluation."""
    previous = in_curvature_evaluation()
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous


def in_curvature_evaluation() -> bool:
    """Whether the current thread is inside :func:`curvature_evaluation`."""
    return getattr(_state, "active", False)


def is_training_dropout(module: nn.Module) -> bool:
    """Whether ``module`` is a dropout layer that draws masks (training mode, ``p > 0``)."""
    return isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0


@contextlib.contextmanager
def dropout_off(model: nn.Module) -> Iterator[None]:
    """The model's dropout layers in eval mode within the block (those in training mode are
    switched back on after it)."""
    switched = [module for module in model.modules() if is_training_dropout(module)]
    for module in switched:
        module.train(False)
    try:
        yield
    finally:
        for module in switched:
            module.train(True)
