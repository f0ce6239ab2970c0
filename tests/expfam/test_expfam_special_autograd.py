"""First and second derivatives through the special-function series, and their layout.

The natural-gradient code differentiates KL divergences twice: ``∇²_θq KL(p ‖ q)`` at
``q = p`` is the Fisher ``∇²A(θ)``, checked here against the closed-form ``fisher()``
(trigamma, itself checked against SciPy in ``test_expfam_special.py``).
"""

from __future__ import annotations

import pytest
import scipy.special
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.expfam import Beta, Dirichlet, Gamma, special
from natgrad.expfam.special import (
    stirling_remainder,
    stirling_remainder_bregman,
    stirling_remainder_derivatives,
    trigamma,
    x_minus_log1p,
)

DTYPE = torch.float64
# Concentrations below 1, between 1 and ASYMPTOTIC_START, and above it.
CASES = [
    (
        Gamma,
        ((torch.tensor([0.3, 4.0, 25.0]), torch.tensor([1.5, 0.2, 3.0])),),
        ((torch.tensor([0.35, 5.5, 24.0]), torch.tensor([1.4, 0.25, 3.5])),),
    ),
    (
        Beta,
        ((torch.tensor([0.4, 8.0, 30.0]), torch.tensor([2.0, 9.0, 0.7])),),
        ((torch.tensor([0.5, 8.1, 12.0]), torch.tensor([6.0, 8.9, 0.6])),),
    ),
    (
        Dirichlet,
        ((torch.tensor([[0.4, 3.0, 12.0], [20.0, 0.9, 2.0]]),),),
        ((torch.tensor([[0.45, 2.0, 30.0], [21.0, 0.8, 2.5]]),),),
    ),
]


def _natural(family, arguments) -> tuple[torch.Tensor, ...]:
    (values,) = arguments
    return family(*(v.to(DTYPE) for v in values)).natural_params


@pytest.mark.parametrize(("family", "first", "second"), CASES)
def test_kl_and_entropy_have_second_derivatives(family, first, second) -> None:
    """``gradgradcheck`` (finite differences of the autograd gradient) of KL + entropy."""
    count = len(_natural(family, first))
    inputs = tuple(
        t.clone().requires_grad_(True) for t in _natural(family, first) + _natural(family, second)
    )

    def objective(*theta):
        p = family.from_natural(*theta[:count], validate=False)
        q = family.from_natural(*theta[count:], validate=False)
        return p.kl(q).sum() + p.entropy().sum() + q.kl(p).sum()

    assert torch.autograd.gradcheck(objective, inputs)
    assert torch.autograd.gradgradcheck(objective, inputs)


@pytest.mark.parametrize(("family", "first", "second"), CASES)
def test_kl_hessian_at_equal_distributions_is_the_fisher(family, first, second) -> None:
    """``∇²_θq KL(p ‖ q)`` at ``θq = θp`` is ``F(θp)``; its gradient there is zero.

    At ``q = p`` every relative change is exactly 0, the point where the series of
    ``x − log(1 + x)`` and the quadrature of Stirling's remainder are evaluated at 0.
    """
    del second
    p = family.from_natural(*_natural(family, first))
    flat = p.flatten_params(p.natural_params).detach()

    def kl_of(flat_other):
        other = family.from_natural(*p.unflatten_params(flat_other), validate=False)
        return p.kl(other).sum()

    gradient = torch.func.grad(kl_of)(flat)
    torch.testing.assert_close(gradient, torch.zeros_like(gradient), rtol=0, atol=1e-14)
    hessian = torch.autograd.functional.hessian(kl_of, flat)
    batch = p.batch_shape.numel()
    size = p.natural_dim
    blocks = hessian.reshape(batch, size, batch, size).diagonal(dim1=0, dim2=2)
    expected = p.fisher().reshape(batch, size, size)
    torch.testing.assert_close(blocks.permute(2, 0, 1), expected, rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-6.0, 8.0), min_size=1, max_size=6))
def test_derivatives_table_matches_the_single_derivative_and_scipy(exponents) -> None:
    """``stirling_remainder_derivatives`` row ``d`` is ``stirling_remainder(·, d)``; ``μ″ + 1/x
    + 1/(2x²)`` is ``ψ′`` (SciPy)."""
    x = torch.tensor([10.0**e for e in exponents], dtype=DTYPE)
    table = stirling_remainder_derivatives(x)
    assert table.shape == (3, len(exponents))
    for derivative in range(3):
        assert torch.equal(table[derivative], stirling_remainder(x, derivative))
    expected = scipy.special.polygamma(1, x.numpy())
    recovered = (table[2] + 1.0 / x + 0.5 / x**2).numpy()
    assert abs(recovered - expected).max() <= 1e-14 * abs(expected).max()


@pytest.mark.parametrize("shape", [(), (0,), (2, 3), (4, 1, 2)])
def test_special_functions_keep_any_batch_shape(shape) -> None:
    """The flattened internal layout gives back the input's shape, entry by entry."""
    x = torch.rand(shape, dtype=DTYPE) * 30 + 0.05
    y = x * 1.1
    for function, arguments in (
        (trigamma, (x,)),
        (x_minus_log1p, (x - 0.5,)),
        (stirling_remainder, (x,)),
        (stirling_remainder_bregman, (x, y, y - x)),
    ):
        result = function(*arguments)
        assert result.shape == shape
        flat = function(*(a.reshape(-1) for a in arguments))
        torch.testing.assert_close(result.reshape(-1), flat, rtol=0, atol=0)
    assert stirling_remainder_derivatives(x).shape == (3, *shape)


def test_first_call_under_inference_mode_leaves_usable_constants() -> None:
    """The cached coefficient tensors are made outside inference mode: a later call under
    autograd can save them for backward."""
    special._coefficients.cache_clear()
    with torch.inference_mode():
        Gamma(torch.tensor(3.0, dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE)).entropy()
    shape = torch.tensor(3.0, dtype=DTYPE, requires_grad=True)
    entropy = Gamma(shape, torch.tensor(1.0, dtype=DTYPE)).entropy()
    (gradient,) = torch.autograd.grad(entropy, shape)
    # dH/dα = 1 + (1 − α) ψ′(α) for the Gamma with unit rate.
    expected = 1.0 + (1.0 - 3.0) * scipy.special.polygamma(1, 3.0)
    assert abs(gradient.item() - expected) <= 1e-14
