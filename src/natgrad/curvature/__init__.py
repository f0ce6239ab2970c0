"""natgrad.curvature: curvature operators over a model's parameters and their builders.

Every operator is a :class:`CurvatureOperator` (``mv``, ``solve``, ``diag``, ``to_dense``,
``trace``, ``to_scipy``; ``+`` and non-negative multiples give a :class:`LinearCombination`)
over the flat vector of the model's trainable parameters. The Fisher is always the
MEAN over data points. ``KFAC`` and ``EKFAC`` are imported on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from natgrad.curvature.base import CurvatureOperator
from natgrad.curvature.block import BlockDiagonal
from natgrad.curvature.builders import fisher, ggn, hessian, output_factors
from natgrad.curvature.combination import LinearCombination
from natgrad.curvature.dense import Dense
from natgrad.curvature.diagonal import Diagonal
from natgrad.curvature.implicit import Implicit
from natgrad.curvature.layer_diagonal import layer_fisher_diagonal
from natgrad.curvature.likelihoods import Likelihood, get_likelihood

_LAZY = {"KFAC": "natgrad.curvature.kfac", "EKFAC": "natgrad.curvature.ekfac"}

__all__ = [
    "EKFAC",
    "KFAC",
    "BlockDiagonal",
    "CurvatureOperator",
    "Dense",
    "Diagonal",
    "Implicit",
    "Likelihood",
    "LinearCombination",
    "fisher",
    "get_likelihood",
    "ggn",
    "hessian",
    "layer_fisher_diagonal",
    "output_factors",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'natgrad.curvature' has no attribute {name!r}")
