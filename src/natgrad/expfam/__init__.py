"""Exponential families: natural and mean parameters, log-partition, Fisher, KL, entropy.

Every family stores its natural parameters ``θ``, batched over leading dimensions, and
provides ``from_natural``/``from_mean`` constructors, ``natural_params``/``mean_params``,
``log_partition()`` and the pure ``log_partition_fn``, ``sufficient_statistics``, ``fisher()``
(``∇²A(θ)``, flattened as described in :mod:`natgrad.expfam.base`), ``kl``, ``entropy``,
``log_prob`` and ``to_torch()``. :func:`mean_parameter_gradient` returns the natural gradient
of a loss of ``θ`` as the plain gradient with respect to ``η``.
"""

from natgrad.expfam.base import ExponentialFamily
from natgrad.expfam.bernoulli import Bernoulli
from natgrad.expfam.beta import Beta
from natgrad.expfam.categorical import Categorical
from natgrad.expfam.dirichlet import Dirichlet
from natgrad.expfam.gamma import Gamma
from natgrad.expfam.gaussian import Gaussian
from natgrad.expfam.multivariate_gaussian import MultivariateGaussian
from natgrad.expfam.natural_gradient import mean_parameter_gradient
from natgrad.expfam.newton import NEWTON_MAX_ITER, NEWTON_TOLERANCE
from natgrad.expfam.poisson import Poisson

__all__ = [
    "NEWTON_MAX_ITER",
    "NEWTON_TOLERANCE",
    "Bernoulli",
    "Beta",
    "Categorical",
    "Dirichlet",
    "ExponentialFamily",
    "Gamma",
    "Gaussian",
    "MultivariateGaussian",
    "Poisson",
    "mean_parameter_gradient",
]
