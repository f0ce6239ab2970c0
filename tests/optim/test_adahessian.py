"""AdaHessian: Hutchinson diagonals vs the torch.func Hessian, closed-form steps on quadratics."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, hessian

from natgrad.optim import AdaHessian
from natgrad.optim.adahessian import hutchinson_diagonal, rademacher_like, spatial_average

pytestmark = [
    pytest.mark.usefixtures("float64_default"),
    # AdaHessian's documented contract: the closure calls ``backward(create_graph=True)``, about
    # which torch warns (a parameter-gradient reference cycle, broken by ``zero_grad()``)
    pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning"),
]


def _mlp_problem(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(12, 3, generator=generator)
    targets = torch.randn(12, 1, generator=generator)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    return model, inputs, targets


def _exact_hessian(model: nn.Module, inputs, targets) -> torch.Tensor:
    """Dense Hessian of the MSE loss over the flat parameter vector, by torch.func."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()

    def loss_of(vector: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(vector, [s.numel() for s in shapes])
        params = {n: v.view(s) for n, v, s in zip(names, pieces, shapes, strict=True)}
        return nn.functional.mse_loss(functional_call(model, params, (inputs,)), targets)

    return hessian(loss_of)(flat)


def _graph_gradients(model: nn.Module, inputs, targets) -> list[torch.Tensor]:
    loss = nn.functional.mse_loss(model(inputs), targets)
    return list(torch.autograd.grad(loss, list(model.parameters()), create_graph=True))


def test_hutchinson_matches_exact_hessian_diagonal_within_monte_carlo_error() -> None:
    model, inputs, targets = _mlp_problem()
    exact = _exact_hessian(model, inputs, targets)
    n_samples = 1000
    estimate = hutchinson_diagonal(
        _graph_gradients(model, inputs, targets),
        list(model.parameters()),
        n_samples=n_samples,
        generator=torch.Generator().manual_seed(0),
    )
    estimate = torch.cat([d.reshape(-1) for d in estimate])
    diagonal = torch.diagonal(exact)
    # Var[z_i (Hz)_i] = Σ_{j≠i} H_ij² for Rademacher z.
    standard_error = ((exact.square().sum(1) - diagonal.square()) / n_samples).sqrt()
    assert diagonal.abs().max() > 20 * standard_error.max()  # the check can fail
    assert torch.all((estimate - diagonal).abs() <= 5 * standard_error + 1e-12)


def test_hutchinson_is_exact_for_a_diagonal_hessian() -> None:
    curvature = torch.tensor([[0.5, 2.0, 3.0], [1.0, 4.0, 0.1]])
    param = torch.randn(2, 3, requires_grad=True)
    loss = 0.5 * (curvature * param**2).sum() + param.sum()
    (grad,) = torch.autograd.grad(loss, [param], create_graph=True)
    (estimate,) = hutchinson_diagonal([grad], [param], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(estimate, curvature, rtol=0, atol=1e-15)


def test_rademacher_signs_are_balanced_and_seeded() -> None:
    template = torch.empty(4000)
    signs = rademacher_like(template, torch.Generator().manual_seed(3))
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(signs.mean().item()) < 4 / math.sqrt(4000)
    torch.testing.assert_close(signs, rademacher_like(template, torch.Generator().manual_seed(3)))


def test_spatial_average_of_conv_kernels() -> None:
    diagonal = torch.randn(2, 3, 2, 2)
    averaged = spatial_average(diagonal)
    expected = np.abs(diagonal.numpy()).mean(axis=(2, 3), keepdims=True) * np.ones((1, 1, 2, 2))
    np.testing.assert_allclose(averaged.numpy(), expected, rtol=1e-14)
    matrix = torch.randn(3, 4)
    assert torch.equal(spatial_average(matrix), matrix)


def _quadratic_run(curvature, minimum, theta0, steps: int, **options) -> torch.Tensor:
    """AdaHessian on L(θ) = ½ Σ h (θ − θ*)², a diagonal quadratic."""
    param = nn.Parameter(theta0.clone())
    optimizer = AdaHessian([param], generator=torch.Generator().manual_seed(0), **options)
    for _ in range(steps):

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = 0.5 * (curvature * (param - minimum) ** 2).sum()
            loss.backward(create_graph=True)
            return loss

        optimizer.step(closure)
    return param.detach()


@settings(max_examples=10, deadline=None)
@given(
    lr=st.floats(0.05, 1.0),
    power=st.sampled_from([0.5, 1.0]),
    beta2=st.sampled_from([0.0, 0.5, 0.999]),
    steps=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_diagonal_quadratic_matches_closed_form(lr, power, beta2, steps, seed) -> None:
    """β₁ = 0 and exact D = h give v̂ = h², so θ_t − θ* = (θ₀ − θ*)(1 − lr h/(h^k + ε))^t."""
    generator = torch.Generator().manual_seed(seed)
    curvature = torch.rand(5, generator=generator) * 3 + 0.1
    minimum, theta0 = torch.randn(5, generator=generator), torch.randn(5, generator=generator)
    result = _quadratic_run(
        curvature, minimum, theta0, steps, lr=lr, betas=(0.0, beta2), eps=1e-4, hessian_power=power
    )
    contraction = 1 - lr * curvature / (curvature**power + 1e-4)
    torch.testing.assert_close(result, minimum + (theta0 - minimum) * contraction**steps)


def test_first_step_with_momentum_and_weight_decay_matches_closed_form() -> None:
    curvature = torch.tensor([0.5, 2.0, 8.0])
    minimum, theta0 = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0.0, 2.0, 1.0])
    result = _quadratic_run(
        curvature, minimum, theta0, 1, lr=0.3, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.1
    )
    gradient = curvature * (theta0 - minimum)
    expected = theta0 * (1 - 0.3 * 0.1) - 0.3 * gradient / (curvature + 1e-3)
    torch.testing.assert_close(result, expected)


def test_conv_kernel_step_uses_the_spatially_averaged_diagonal() -> None:
    curvature = torch.rand(2, 3, 2, 2) + 0.5
    minimum, theta0 = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    result = _quadratic_run(curvature, minimum, theta0, 1, lr=0.5, betas=(0.9, 0.999), eps=1e-4)
    averaged = curvature.mean(dim=(2, 3), keepdim=True)
    expected = theta0 - 0.5 * curvature * (theta0 - minimum) / (averaged + 1e-4)
    torch.testing.assert_close(result, expected)


def _train(model, optimizer, inputs, targets, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(inputs), targets)
            loss.backward(create_graph=True)
            return loss

        losses.append(optimizer.step(closure).item())
    return losses


def test_seeded_generator_gives_identical_runs_and_seed_matters() -> None:
    runs = []
    for seed in (5, 5, 6):
        model, inputs, targets = _mlp_problem()
        optimizer = AdaHessian(
            model.parameters(), lr=0.05, generator=torch.Generator().manual_seed(seed)
        )
        _train(model, optimizer, inputs, targets, steps=5)
        runs.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach())
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_state_dict_round_trip_resumes_identically() -> None:
    options = {"lr": 0.05, "weight_decay": 0.01, "update_each": 2}
    model, inputs, targets = _mlp_problem(seed=2)
    optimizer = AdaHessian(
        model.parameters(), generator=torch.Generator().manual_seed(1), **options
    )
    _train(model, optimizer, inputs, targets, steps=3)
    saved_model = copy.deepcopy(model.state_dict())
    saved_state = copy.deepcopy(optimizer.state_dict())
    continued = _train(model, optimizer, inputs, targets, steps=4)

    resumed_model, _, _ = _mlp_problem(seed=9)
    resumed_model.load_state_dict(saved_model)
    resumed = AdaHessian(
        resumed_model.parameters(), generator=torch.Generator().manual_seed(123), **options
    )
    resumed.load_state_dict(saved_state)
    assert _train(resumed_model, resumed, inputs, targets, steps=4) == continued
    for param, expected in zip(resumed_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(param, expected)


def test_update_each_reuses_the_latest_estimate() -> None:
    model, inputs, targets = _mlp_problem(seed=4)
    optimizer = AdaHessian(
        model.parameters(), lr=0.05, update_each=2, generator=torch.Generator().manual_seed(0)
    )
    weight = model[0].weight
    seen = []
    for _ in range(3):
        _train(model, optimizer, inputs, targets, steps=1)
        seen.append(optimizer.state[weight]["hessian_diag"].clone())
    assert torch.equal(seen[0], seen[1])
    assert not torch.equal(seen[1], seen[2])


def test_missing_create_graph_raises() -> None:
    model, inputs, targets = _mlp_problem()
    optimizer = AdaHessian(model.parameters())
    nn.functional.mse_loss(model(inputs), targets).backward()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        optimizer.step()


def test_non_finite_gradient_refuses_the_step() -> None:
    param = nn.Parameter(torch.ones(3))
    optimizer = AdaHessian([param])
    loss = (param * torch.tensor([1.0, float("nan"), 2.0])).sum() + (param**2).sum()
    loss.backward(create_graph=True)
    with pytest.warns(RuntimeWarning, match="not finite"):
        optimizer.step()
    assert torch.equal(param.detach(), torch.ones(3))
    assert optimizer.counters["refused_steps"] == 1
    assert len(optimizer.state[param]) == 0


def test_sparse_gradients_are_refused_by_name() -> None:
    embedding = nn.Embedding(5, 2, sparse=True)
    optimizer = AdaHessian(embedding.parameters())
    embedding(torch.tensor([1, 3])).square().sum().backward()
    with pytest.raises(TypeError, match="AdaHessian does not support sparse gradients"):
        optimizer.step()


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"lr": -0.1}, ValueError, "lr"),
        ({"betas": (0.9, 1.0)}, ValueError, "betas"),
        ({"betas": (0.9,)}, ValueError, "betas"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"hessian_power": 1.5}, ValueError, "hessian_power"),
        ({"hessian_power": "one"}, TypeError, "hessian_power"),
        ({"n_samples": 0}, ValueError, "n_samples"),
        ({"update_each": 2.0}, TypeError, "update_each"),
        ({"generator": 0}, TypeError, "generator"),
    ],
)
def test_bad_options_raise(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        AdaHessian([nn.Parameter(torch.ones(2))], **options)


def test_bad_group_option_raises_and_adds_no_group() -> None:
    optimizer = AdaHessian([nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="hessian_power"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.ones(2))], "hessian_power": 2.0})
    assert len(optimizer.param_groups) == 1


def test_options_are_stored_as_python_numbers() -> None:
    optimizer = AdaHessian([nn.Parameter(torch.ones(2))], lr=np.float32(0.5), betas=[0.8, 0.9])
    group = optimizer.param_groups[0]
    assert type(group["lr"]) is float and group["lr"] == 0.5
    assert group["betas"] == (0.8, 0.9)
