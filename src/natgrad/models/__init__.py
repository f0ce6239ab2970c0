"""natgrad.models."""

from natgrad.models.logistic import LogisticRegression
from natgrad.models.pnmf import PNMF
from natgrad.models.poisson_regression import PoissonRegression

__all__ = ["PNMF", "LogisticRegression", "PoissonRegression"]
