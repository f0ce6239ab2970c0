"""natgrad.models."""

from natgrad.models.logistic import LogisticRegression
from natgrad.models.poisson_regression import PoissonRegression

__all__ = ["LogisticRegression", "PoissonRegression"]
