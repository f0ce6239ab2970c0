"""natgrad.es: natural evolution strategies (xNES, SNES) with rank-based fitness shaping.

A Gaussian search distribution is moved along the natural gradient of the expected shaped
fitness, estimated from its own samples: :class:`XNES` (full covariance, exponential
parameterisation) and :class:`SNES` (diagonal covariance), with ``ask``/``tell`` and
:func:`minimize`. A NaN objective value ranks last, as ``+inf`` does, with a warning; a
generation of NaN values only raises. Test functions are in :mod:`natgrad.es.objectives`.
"""

from natgrad.es.base import ESResult, NaturalEvolutionStrategy
from natgrad.es.minimize import minimize
from natgrad.es.objectives import ellipsoid, rosenbrock, sphere
from natgrad.es.snes import SNES, default_snes_rates, snes_natural_gradient
from natgrad.es.utilities import default_population_size, rank_utilities, shaped_fitness
from natgrad.es.xnes import XNES, default_xnes_rates, xnes_natural_gradient

__all__ = [
    "SNES",
    "XNES",
    "ESResult",
    "NaturalEvolutionStrategy",
    "default_population_size",
    "default_snes_rates",
    "default_xnes_rates",
    "ellipsoid",
    "minimize",
    "rank_utilities",
    "rosenbrock",
    "shaped_fitness",
    "snes_natural_gradient",
    "sphere",
    "xnes_natural_gradient",
]
