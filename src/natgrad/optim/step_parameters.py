"""The parameters an optimizer over a whole model's Fisher moves at a step.

The Fisher of a model is laid out in ``model.parameters()`` order over the parameters that
require gradients, so a step over it moves exactly those, in that order, whatever the order of
the param groups: one frozen after the optimizer was built is left alone, and one unfrozen
since (in no group) is refused by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from natgrad.curvature.kfac_capture import trainable_parameters

__all__ = ["step_parameters"]


def step_parameters(
    model: nn.Module, param_groups: Sequence[dict[str, Any]], remedy: str
) -> list[Tensor]:
    """The parameters of ``model`` that require gradients now, in ``model.parameters()`` order.

    Raises
    ------
    ValueError
        If one of them is in none of ``param_groups`` (the message names them and ends with
        ``remedy``), or if there is none.
    """
    grouped = {id(param) for group in param_groups for param in group["params"]}
    missing = [
        name
        for name, param in model.named_parameters()
        if param.requires_grad and id(param) not in grouped
    ]
    if missing:
        raise ValueError(
            f"parameters {missing} require gradients but are in no param group: {remedy}"
        )
    params = trainable_parameters(model)
    if not params:
        raise ValueError("model has no trainable parameters (all have requires_grad=False)")
    return params
