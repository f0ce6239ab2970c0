"""NaturalGradient's conjugate-gradient options (``cg_rtol``, ``cg_max_iter``), which the
data-parallel tests use to run CG to round-off: they reach the implicit Fisher's solve, and
are refused, naming the value, where they would have no effect.

Oracle: one step with ``structure="implicit"`` and ``cg_rtol=1e-13`` equals the dense step
``θ − lr (F + λI)⁻¹ g`` with ``F`` from ``torch.func`` per-sample Jacobians (float64).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from natgrad.optim import NaturalGradient

DAMPING = 0.05
LR = 0.5


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(torch.float64)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(10, 3, generator=generator, dtype=torch.float64)
    return inputs, torch.randint(0, 3, (10,), generator=generator)


def dense_step_oracle() -> torch.Tensor:
    """``θ − lr (F + λI)⁻¹ g``: ``F = mean_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n``."""
    model = make_model()
    inputs, targets = batch()
    params = {name: p.detach() for name, p in model.named_parameters()}
    flat = torch.nn.utils.parameters_to_vector(params.values())

    def logits(vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        chunks = vector.split([p.numel() for p in params.values()])
        named = {n: c.view_as(p) for (n, p), c in zip(params.items(), chunks, strict=True)}
        return functional_call(model, named, (x.unsqueeze(0),)).squeeze(0)

    jacobians = vmap(jacrev(logits), in_dims=(None, 0))(flat, inputs)
    probs = vmap(logits, in_dims=(None, 0))(flat, inputs).softmax(-1)
    hessians = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    curvature = torch.einsum("ncp,ncd,ndq->pq", jacobians, hessians, jacobians) / len(inputs)
    gradient = torch.func.grad(
        lambda v: nn.functional.cross_entropy(vmap(logits, in_dims=(None, 0))(v, inputs), targets)
    )(flat)
    identity = torch.eye(len(flat), dtype=torch.float64)
    return flat - LR * torch.linalg.solve(curvature + DAMPING * identity, gradient)


def one_step(**options: object) -> torch.Tensor:
    model = make_model()
    inputs, targets = batch()
    optimizer = NaturalGradient(
        model, "categorical", lr=LR, structure="implicit", damping=DAMPING, **options
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an iteration cap falls short
        optimizer.step(closure)
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def test_cg_options_reach_the_implicit_solve() -> None:
    expected = dense_step_oracle()
    torch.testing.assert_close(one_step(cg_rtol=1e-13), expected, rtol=0, atol=1e-12)
    capped = one_step(cg_max_iter=1)
    assert (capped - expected).abs().max() > 1e-4, "one CG iteration is not the solution"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"structure": "dense", "cg_rtol": 1e-6}, "cg_rtol=1e-06 applies to structure='implicit'"),
        ({"structure": "kfac", "cg_max_iter": 5}, "cg_max_iter=5 applies to structure='implicit'"),
        ({"structure": "implicit", "cg_rtol": 1.5}, "cg_rtol must be a number in .* got 1.5"),
        ({"structure": "implicit", "cg_max_iter": 0}, "cg_max_iter must be .* got 0"),
    ],
)
def test_cg_options_are_refused_where_they_do_nothing_or_out_of_range(
    options: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        NaturalGradient(make_model(), "categorical", **options)
