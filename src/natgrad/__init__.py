"""natgrad: natural-gradient methods for PyTorch.

The top-level namespace re-exports the curvature builders (:func:`fisher`, :func:`ggn`,
:func:`hessian`), the :class:`NaturalGradient` optimizer and the estimators :class:`PNMF`,
:class:`LogisticRegression` and :class:`PoissonRegression`. Sub-packages are imported lazily so
that ``import natgrad`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "fisher": "natgrad.curvature",
    "ggn": "natgrad.curvature",
    "hessian": "natgrad.curvature",
    "PNMF": "natgrad.models",
    "LogisticRegression": "natgrad.models",
    "PoissonRegression": "natgrad.models",
    "NaturalGradient": "natgrad.optim",
}
_SUBPACKAGES = (
    "curvature",
    "distributed",
    "es",
    "expfam",
    "linalg",
    "models",
    "optim",
    "rl",
)

__all__ = [
    "PNMF",
    "LogisticRegression",
    "NaturalGradient",
    "PoissonRegression",
    "__version__",
    "fisher",
    "ggn",
    "hessian",
    *_SUBPACKAGES,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"natgrad.{name}")
    raise AttributeError(f"module 'natgrad' has no attribute {name!r}")
