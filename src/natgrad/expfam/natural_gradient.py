"""The natural gradient of an exponential family as a gradient in mean coordinates.

For an exponential family with natural parameters ``θ`` and mean parameters ``η = ∇A(θ)``,
the Jacobian of ``η`` with respect to ``θ`` is the Fisher ``F(θ) = ∇²A(θ)``, so by the chain
rule ``∇_θ L = F(θ) ∇_η L`` and the natural gradient is

    F(θ)⁻¹ ∇_θ L = ∇_η L.

:func:`mean_parameter_gradient` computes it without forming or inverting ``F``: it evaluates
the loss through the map ``η → θ`` and lets autograd return ``∂L/∂η``. For the families whose
inverse map has a closed form (Gaussian, multivariate Gaussian, Bernoulli, Categorical,
Poisson) this is exact autograd through that formula; for Gamma, Beta and Dirichlet the map is
implicit and its backward pass solves one system with ``F(θ)`` per event (``O(K)`` for the
Dirichlet, whose Fisher is diagonal plus rank one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from natgrad.expfam.base import ExponentialFamily, Params, as_float_tensor


def mean_parameter_gradient(
    loss_fn: Callable[..., Tensor],
    family: type[ExponentialFamily],
    natural_params: Sequence[Tensor],
    *,
    validate: bool = True,
) -> Params:
    """Natural gradient ``F(θ)⁻¹ ∇_θ L`` of a loss of the natural parameters, as ``∇_η L``.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(*theta) -> Tensor`` with a single element; ``theta`` has the shapes of
        ``natural_params``.
    family : type of ExponentialFamily
        The family, e.g. :class:`natgrad.expfam.Gaussian`.
    natural_params : sequence of Tensor
        The point ``θ`` (not modified, and its graph is not used).
    validate : bool
        Check that ``θ`` is finite and inside the natural parameter space (one host sync).

    Returns
    -------
    tuple of Tensor
        ``∇_η L``, one tensor per natural parameter with its shape (zeros where ``L`` does not
        depend on a parameter). For :class:`~natgrad.expfam.MultivariateGaussian` the part for
        ``θ₂`` is the symmetric solution.

    Raises
    ------
    ValueError
        If ``θ`` is outside the natural parameter space or the loss is not a single number.

    Examples
    --------
    >>> import torch
    >>> from natgrad.expfam import Gaussian, mean_parameter_gradient
    >>> q = Gaussian(torch.tensor([0.5]), torch.tensor([2.0]))
    >>> def negative_elbo(theta1, theta2):
    ...     p = Gaussian.from_natural(theta1, theta2, validate=False)
    ...     return p.kl(Gaussian(torch.zeros(1), torch.ones(1))).sum()
    >>> step = mean_parameter_gradient(negative_elbo, Gaussian, q.natural_params)
    """
    names = family.natural_names
    theta = tuple(
        as_float_tensor(t, n).detach() for t, n in zip(natural_params, names, strict=False)
    )
    point = family.from_natural(*theta, validate=validate)
    eta = tuple(e.detach().requires_grad_(True) for e in point.mean_params)
    with torch.enable_grad():
        theta_of_eta = family._natural_from_mean_at(eta, point.natural_params)
        loss = loss_fn(*theta_of_eta)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a tensor with one element, got {shape}")
    if not loss.requires_grad:
        return tuple(torch.zeros_like(e) for e in eta)
    grads = torch.autograd.grad(loss.reshape(()), eta, allow_unused=True)
    return tuple(torch.zeros_like(e) if g is None else g for g, e in zip(grads, eta, strict=True))
