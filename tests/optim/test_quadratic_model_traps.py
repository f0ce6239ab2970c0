"""QuadraticModelOptimizer traps found by using it: ``max_kl`` with ``lr`` ≠ 1, parameters frozen
or unfrozen after construction. Oracles: float64 dense Fishers from ``torch.func`` per-sample
Jacobians over the parameters that require gradients, and the 2×2 model solved directly."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

from natgrad.optim.quadratic_model import QuadraticModelOptimizer

pytestmark = pytest.mark.usefixtures("float64_default")


def _problem() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(12, 4, generator=generator)
    labels = torch.randint(0, 3, (12,), generator=generator)
    return model, inputs, labels


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _flat(params: dict[str, Tensor]) -> Tensor:
    return torch.cat([value.reshape(-1) for value in params.values()])


def _dense_fisher(model: nn.Module, inputs: Tensor) -> Tensor:
    """``1/N Σ Jₙᵀ ∇²logsumexp(fₙ) Jₙ`` over the parameters that require gradients."""
    params = _trainable(model)

    def output(values: dict[str, Tensor], sample: Tensor) -> Tensor:
        return functional_call(model, values, (sample.unsqueeze(0),)).reshape(-1)

    jacobians = vmap(jacrev(output), in_dims=(None, 0))(params, inputs)
    flat = torch.cat([jacobians[name].flatten(2) for name in params], dim=2)
    logits = vmap(output, in_dims=(None, 0))(params, inputs)
    curvatures = vmap(hessian(lambda f: torch.logsumexp(f, -1)))(logits)
    return torch.einsum("nci,ncd,ndj->ij", flat, curvatures, flat) / len(inputs)


def _gradient(model: nn.Module, inputs: Tensor, labels: Tensor) -> Tensor:
    model.zero_grad()
    nn.functional.cross_entropy(model(inputs), labels).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def _closure(model: nn.Module, optimizer, inputs: Tensor, labels: Tensor):
    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("lr", [0.5, 2.0])
def test_max_kl_bounds_the_step_that_lr_scaled(lr: float) -> None:
    """``½ δᵀFδ ≤ max_kl`` for the step taken, ``lr`` included: with lr = 2 the step had
    4 max_kl, with lr = 0.5 it was clipped to max_kl / 4 although lr · (α Δ) was within."""
    model, inputs, labels = _problem()
    damping, max_kl = 0.05, 1e-3
    gradient = _gradient(model, inputs, labels)
    fisher = _dense_fisher(model, inputs)
    matrix = gradient @ (fisher + damping * torch.eye(len(fisher))) @ gradient
    alpha = float(gradient @ gradient / matrix)  # the 1-d model's minimiser along −g
    free_kl = 0.5 * lr**2 * alpha**2 * float(gradient @ fisher @ gradient)
    assert free_kl > 2 * max_kl  # the bound binds
    optimizer = QuadraticModelOptimizer(
        model, "categorical", lr=lr, damping=damping, max_kl=max_kl, adaptive_damping=False
    )
    start = _flat(_trainable(model))
    optimizer.step(_closure(model, optimizer, inputs, labels))
    step = _flat(_trainable(model)) - start
    assert 0.5 * float(step @ fisher @ step) == pytest.approx(max_kl, rel=1e-9)
    scale = (max_kl / free_kl) ** 0.5
    torch.testing.assert_close(step, -scale * lr * alpha * gradient, rtol=1e-9, atol=1e-12)


def test_a_parameter_frozen_after_construction_is_left_alone() -> None:
    """The second step is the quadratic model's over the parameters still trainable (with their
    part of the first step as momentum); the frozen weight keeps its value."""
    model, inputs, labels = _problem()
    damping = 0.05
    optimizer = QuadraticModelOptimizer(
        model, "categorical", damping=damping, adaptive_damping=False
    )
    start = _flat(_trainable(model))
    optimizer.step(_closure(model, optimizer, inputs, labels))
    first_step = _flat(_trainable(model)) - start
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    previous = first_step[model[0].weight.numel() :]
    gradient = _gradient(model, inputs, labels)
    fisher = _dense_fisher(model, inputs)
    directions = torch.stack([-gradient, previous])
    matrix = directions @ (fisher + damping * torch.eye(len(fisher))) @ directions.T
    coefficients = torch.linalg.solve(matrix, -(directions @ gradient))
    expected = _flat(_trainable(model)) + coefficients @ directions
    optimizer.step(_closure(model, optimizer, inputs, labels))
    torch.testing.assert_close(model[0].weight, frozen, rtol=0, atol=0)
    torch.testing.assert_close(_flat(_trainable(model)), expected, rtol=1e-9, atol=1e-12)
    assert optimizer.last_step["mu"] == pytest.approx(float(coefficients[1]), rel=1e-8)


def test_a_parameter_unfrozen_after_construction_is_named_and_nothing_moves() -> None:
    model, inputs, labels = _problem()
    model[0].bias.requires_grad_(False)
    optimizer = QuadraticModelOptimizer(model, "categorical")
    model[0].bias.requires_grad_(True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"\['0.bias'\] require gradients"):
        optimizer.step(_closure(model, optimizer, inputs, labels))
    for param, value in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(param, value, rtol=0, atol=0)
