"""natgrad.optim: torch.optim optimizers and gradient preconditioners."""

from natgrad.optim.natural_gradient import NaturalGradient

__all__ = ["NaturalGradient"]
