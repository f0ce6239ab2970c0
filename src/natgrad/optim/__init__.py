"""natgrad.optim: torch.optim optimizers and gradient preconditioners.

- :class:`NaturalGradient`: ``θ ← θ − lr (F + λI)⁻¹ ∇L`` with any Fisher kind and structure.
- :class:`NaturalGradientDescent`: natural-gradient VI on the natural parameters of
  :mod:`natgrad.expfam` distributions (``F⁻¹∇L`` as a vector-Jacobian product of ``η ↦ θ(η)``).
- :class:`KFAC`, :class:`EKFAC`: preconditioners that rewrite ``.grad`` between
  ``loss.backward()`` and any ``torch.optim`` optimizer's ``step()``.
- :class:`QuadraticModelOptimizer`: Martens & Grosse's step ``α Δ + μ δ₀`` with the learning rate
  and momentum chosen by the exact damped quadratic model, over a K-FAC/EKFAC direction.
- :class:`Shampoo`, :class:`AdaHessian`: optimizers with Kronecker-factored / Hessian-diagonal
  preconditioning.
"""

from natgrad.optim.adahessian import AdaHessian
from natgrad.optim.ekfac import EKFAC
from natgrad.optim.kfac import KFAC
from natgrad.optim.natural_gradient import NaturalGradient
from natgrad.optim.natural_gradient_descent import NaturalGradientDescent
from natgrad.optim.quadratic_model import QuadraticModelOptimizer
from natgrad.optim.shampoo import Shampoo

__all__ = [
    "EKFAC",
    "KFAC",
    "AdaHessian",
    "NaturalGradient",
    "NaturalGradientDescent",
    "QuadraticModelOptimizer",
    "Shampoo",
]
