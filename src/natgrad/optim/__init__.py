"""natgrad.optim: torch.optim optimizers and gradient preconditioners."""

from natgrad.optim.ekfac import EKFAC
from natgrad.optim.kfac import KFAC
from natgrad.optim.natural_gradient import NaturalGradient

__all__ = ["EKFAC", "KFAC", "NaturalGradient"]
from natgrad.optim.adahessian import AdaHessian
from natgrad.optim.shampoo import Shampoo

__all__ += ["AdaHessian", "Shampoo"]
