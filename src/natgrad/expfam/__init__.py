"""Exponential families: natural and mean parameters, log-partition, Fisher, KL, entropy.

See :mod:`natgrad.expfam.base` for the shared interface and the flattening order of
``fisher()``.
"""

from natgrad.expfam.base import ExponentialFamily
from natgrad.expfam.gaussian import Gaussian

__all__ = ["ExponentialFamily", "Gaussian"]
