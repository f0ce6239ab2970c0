"""Shampoo vs a dense float64 NumPy/SciPy oracle, and its reductions to SGD, Adagrad and Adam."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.linalg import fractional_matrix_power
from torch import nn

from natgrad.optim import Shampoo

pytestmark = pytest.mark.usefixtures("float64_default")


def _gradients(shape: tuple[int, ...], steps: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(steps)]


def _unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def _oracle_preconditioners(statistics: list[np.ndarray], epsilon: float) -> list[np.ndarray]:
    """(S + εI)^{-1/(2k)} by SciPy; a 1-d (diagonal) statistic gives an elementwise power."""
    order = len(statistics)
    return [
        (s + epsilon) ** (-1.0 / (2 * order))
        if s.ndim == 1
        else np.real(fractional_matrix_power(s + epsilon * np.eye(len(s)), -1.0 / (2 * order)))
        for s in statistics
    ]


def _oracle_direction(grad: np.ndarray, preconditioners: list[np.ndarray]) -> np.ndarray:
    """G ×₁ P₁ … ×_k P_k, each mode product through the unfolding: P G_(i), folded back."""
    for mode, preconditioner in enumerate(preconditioners):
        moved = np.moveaxis(grad, mode, 0)
        if preconditioner.ndim == 1:
            product = preconditioner.reshape((-1,) + (1,) * (grad.ndim - 1)) * moved
        else:
            product = (preconditioner @ moved.reshape(len(moved), -1)).reshape(moved.shape)
        grad = np.moveaxis(product, 0, mode)
    return grad


def _oracle_run(
    theta: np.ndarray,
    grads: list[np.ndarray],
    lr: float,
    epsilon: float,
    max_dim: int = 10**9,
    update_freq: int = 1,
    graft_norm=None,
) -> np.ndarray:
    """Dense Shampoo on fixed gradients: statistics summed from step 1, roots every update_freq."""
    statistics = [
        np.zeros(size) if size > max_dim else np.zeros((size, size)) for size in theta.shape
    ]
    for step, grad in enumerate(grads):
        for mode, size in enumerate(theta.shape):
            unfolded = _unfold(grad, mode)
            outer = unfolded @ unfolded.T
            statistics[mode] += np.diag(outer) if size > max_dim else outer
        if step % update_freq == 0:
            preconditioners = _oracle_preconditioners(statistics, epsilon)
        direction = _oracle_direction(grad, preconditioners)
        if graft_norm is not None:
            direction = direction * graft_norm(step, grads) / np.linalg.norm(direction)
        theta = theta - lr * direction
    return theta


def _run_on_gradients(param: nn.Parameter, optimizer: Shampoo, grads: list[np.ndarray]):
    for grad in grads:
        param.grad = torch.from_numpy(grad).clone()
        optimizer.step()
    return param.detach().numpy()


@pytest.mark.parametrize(
    ("shape", "max_dim", "update_freq"),
    [
        ((3, 4), 1024, 1),  # W ← W − lr L^{-1/4} G R^{-1/4}
        ((2, 3, 4), 1024, 1),  # order 3: exponent −1/6 per mode
        ((5,), 1024, 1),  # a vector: full-matrix AdaGrad (Σ g gᵀ + εI)^{-1/2} g
        ((3, 6), 4, 1),  # mode of length 6 > 4 falls back to the diagonal
        ((3, 4), 1024, 2),  # preconditioners recomputed every second step
    ],
)
def test_update_matches_dense_oracle(shape, max_dim: int, update_freq: int) -> None:
    theta = np.random.default_rng(1).standard_normal(shape)
    grads = _gradients(shape, steps=4)
    param = nn.Parameter(torch.from_numpy(theta.copy()))
    optimizer = Shampoo(
        [param], lr=0.3, epsilon=1e-3, max_preconditioner_dim=max_dim, update_freq=update_freq
    )
    result = _run_on_gradients(param, optimizer, grads)
    expected = _oracle_run(theta, grads, 0.3, 1e-3, max_dim=max_dim, update_freq=update_freq)
    np.testing.assert_allclose(result, expected, rtol=1e-9, atol=1e-12)


def test_matrix_step_is_left_and_right_inverse_fourth_roots() -> None:
    """The paper's matrix form written out directly: one step from W₀ with gradient G."""
    rng = np.random.default_rng(4)
    weight, grad = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    left = fractional_matrix_power(grad @ grad.T + 0.01 * np.eye(4), -0.25)
    right = fractional_matrix_power(grad.T @ grad + 0.01 * np.eye(3), -0.25)
    param = nn.Parameter(torch.from_numpy(weight.copy()))
    result = _run_on_gradients(param, Shampoo([param], lr=0.5, epsilon=0.01), [grad])
    np.testing.assert_allclose(result, weight - 0.5 * np.real(left @ grad @ right), rtol=1e-9)


@pytest.mark.parametrize("grafting", ["sgd", "adagrad"])
def test_grafting_takes_the_grafted_step_norm(grafting: str) -> None:
    shape = (3, 4)
    theta = np.random.default_rng(2).standard_normal(shape)
    grads = _gradients(shape, steps=3, seed=5)

    def graft_norm(step: int, grads: list[np.ndarray]) -> float:
        if grafting == "sgd":
            return np.linalg.norm(grads[step])
        sum_squares = sum(g**2 for g in grads[: step + 1])
        return np.linalg.norm(grads[step] / (np.sqrt(sum_squares) + 1e-8))

    param = nn.Parameter(torch.from_numpy(theta.copy()))
    optimizer = Shampoo([param], lr=0.1, epsilon=1e-3, grafting=grafting, grafting_eps=1e-8)
    result = _run_on_gradients(param, optimizer, grads)
    expected = _oracle_run(theta, grads, 0.1, 1e-3, graft_norm=graft_norm)
    np.testing.assert_allclose(result, expected, rtol=1e-9, atol=1e-12)


def test_adam_grafting_preconditions_the_first_moment() -> None:
    """d = P(m̂) rescaled to ‖m̂ / (√v̂ + eps)‖, written out with NumPy/SciPy."""
    shape, betas, eps = (3, 2), (0.8, 0.9), 1e-8
    theta = np.random.default_rng(6).standard_normal(shape)
    grads = _gradients(shape, steps=3, seed=9)
    param = nn.Parameter(torch.from_numpy(theta.copy()))
    optimizer = Shampoo([param], lr=0.1, epsilon=1e-3, grafting="adam", grafting_betas=betas)
    result = _run_on_gradients(param, optimizer, grads)
    expected, exp_avg, exp_avg_sq = theta.copy(), np.zeros(shape), np.zeros(shape)
    for step, grad in enumerate(grads, start=1):
        exp_avg = betas[0] * exp_avg + (1 - betas[0]) * grad
        exp_avg_sq = betas[1] * exp_avg_sq + (1 - betas[1]) * grad**2
        first = exp_avg / (1 - betas[0] ** step)
        adam = first / (np.sqrt(exp_avg_sq / (1 - betas[1] ** step)) + eps)
        statistics = [sum(_unfold(g, m) @ _unfold(g, m).T for g in grads[:step]) for m in (0, 1)]
        direction = _oracle_direction(first, _oracle_preconditioners(statistics, 1e-3))
        expected = expected - 0.1 * direction * np.linalg.norm(adam) / np.linalg.norm(direction)
    np.testing.assert_allclose(result, expected, rtol=1e-9, atol=1e-12)


def _mlp_problem(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(16, 3, generator=generator)
    targets = torch.randn(16, 2, generator=generator)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return model, inputs, targets


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, inputs, targets, steps: int):
    losses = []
    for _ in range(steps):

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            return loss

        losses.append(optimizer.step(closure).item())
    return losses


@pytest.mark.parametrize(
    ("grafting", "reference", "options"),
    [
        (None, torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.01}),
        ("sgd", torch.optim.SGD, {"momentum": 0.5}),
        ("adagrad", torch.optim.Adagrad, {"eps": 1e-6, "weight_decay": 0.1}),
        ("adam", torch.optim.Adam, {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.01}),
    ],
)
def test_before_preconditioning_equals_the_grafted_optimizer(grafting, reference, options):
    model, inputs, targets = _mlp_problem()
    twin = copy.deepcopy(model)
    shampoo_options = {
        "momentum": options.get("momentum", 0.0),
        "weight_decay": options.get("weight_decay", 0.0),
        "grafting_eps": options.get("eps", 1e-8),
        "grafting_betas": options.get("betas", (0.9, 0.999)),
    }
    shampoo = Shampoo(
        model.parameters(),
        lr=0.05,
        grafting=grafting,
        start_preconditioning_step=1000,
        **shampoo_options,
    )
    baseline = reference(twin.parameters(), lr=0.05, **options)
    losses = _train(model, shampoo, inputs, targets, steps=6)
    expected_losses = _train(twin, baseline, inputs, targets, steps=6)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-12)
    for param, expected in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(param, expected, rtol=1e-12, atol=1e-14)


def test_preconditioning_starts_at_the_given_step() -> None:
    """Steps before the start are SGD; from the start on, roots of the statistics of all steps."""
    shape = (3, 4)
    theta = np.random.default_rng(3).standard_normal(shape)
    grads = _gradients(shape, steps=4, seed=8)
    param = nn.Parameter(torch.from_numpy(theta.copy()))
    optimizer = Shampoo([param], lr=0.2, epsilon=1e-3, start_preconditioning_step=3)
    result = _run_on_gradients(param, optimizer, grads)
    expected = theta - 0.2 * (grads[0] + grads[1])
    for step in (2, 3):
        statistics = [
            sum(_unfold(g, m) @ _unfold(g, m).T for g in grads[: step + 1]) for m in (0, 1)
        ]
        expected = expected - 0.2 * _oracle_direction(
            grads[step], _oracle_preconditioners(statistics, 1e-3)
        )
    np.testing.assert_allclose(result, expected, rtol=1e-9, atol=1e-12)


def test_state_dict_round_trip_resumes_identically() -> None:
    model, inputs, targets = _mlp_problem(seed=3)
    options = {"lr": 0.05, "momentum": 0.5, "update_freq": 2, "grafting": "adam"}
    optimizer = Shampoo(model.parameters(), **options)
    _train(model, optimizer, inputs, targets, steps=3)
    saved_model, saved_state = (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(optimizer.state_dict()),
    )
    continued = _train(model, optimizer, inputs, targets, steps=4)

    resumed_model, _, _ = _mlp_problem(seed=99)
    resumed_model.load_state_dict(saved_model)
    resumed = Shampoo(resumed_model.parameters(), **options)
    resumed.load_state_dict(saved_state)
    assert _train(resumed_model, resumed, inputs, targets, steps=4) == continued
    for param, expected in zip(resumed_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(param, expected, rtol=0, atol=0)


def test_shampoo_decreases_a_loss_and_handles_groups_scalars_and_float32() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).float()
    scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float32))
    inputs = torch.randn(32, 3, dtype=torch.float32)
    targets = inputs[:, :1] * 2.0 - inputs[:, 1:2]
    optimizer = Shampoo(
        [{"params": model.parameters()}, {"params": [scale], "lr": 0.01}],
        lr=0.05,
        grafting="adam",
    )
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(scale * model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.2 * losses[0]
    assert optimizer.state[scale]["statistics"][0].shape == (1, 1)


def test_non_finite_gradient_refuses_the_step() -> None:
    param = nn.Parameter(torch.ones(2, 3))
    optimizer = Shampoo([param], lr=0.1, momentum=0.9)
    param.grad = torch.ones(2, 3)
    optimizer.step()
    before, state_before = param.detach().clone(), copy.deepcopy(optimizer.state_dict())
    for bad in (float("nan"), float("inf")):
        param.grad = torch.ones(2, 3)
        param.grad[0, 1] = bad
        with pytest.warns(RuntimeWarning, match="not finite"):
            optimizer.step()
        assert torch.equal(param.detach(), before)
    assert optimizer.counters["refused_steps"] == 2
    assert optimizer.state[param]["step"] == state_before["state"][0]["step"] == 1
    torch.testing.assert_close(
        optimizer.state[param]["statistics"][0], state_before["state"][0]["statistics"][0]
    )


def test_sparse_gradients_are_refused_by_name() -> None:
    embedding = nn.Embedding(5, 2, sparse=True)
    optimizer = Shampoo(embedding.parameters())
    embedding(torch.tensor([1, 3])).square().sum().backward()
    with pytest.raises(TypeError, match="Shampoo does not support sparse gradients"):
        optimizer.step()


def test_overflowing_statistics_refuse_the_step() -> None:
    param = nn.Parameter(torch.ones(2, 2, dtype=torch.float32))
    optimizer = Shampoo([param], lr=0.1)
    param.grad = torch.full((2, 2), 1e30, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="overflow"):
        optimizer.step()
    assert torch.equal(param.detach(), torch.ones(2, 2, dtype=torch.float32))


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"lr": -1.0}, ValueError, "lr"),
        ({"lr": "fast"}, TypeError, "lr"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"beta2": 0.0}, ValueError, "beta2"),
        ({"epsilon": 0.0}, ValueError, "epsilon"),
        ({"epsilon": float("nan")}, ValueError, "epsilon"),
        ({"update_freq": 0}, ValueError, "update_freq"),
        ({"start_preconditioning_step": 1.5}, TypeError, "start_preconditioning_step"),
        ({"max_preconditioner_dim": 0}, ValueError, "max_preconditioner_dim"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"grafting": "rmsprop"}, ValueError, "grafting"),
        ({"grafting_betas": (0.9, 1.0)}, ValueError, "grafting_betas"),
        ({"grafting_eps": 0.0}, ValueError, "grafting_eps"),
    ],
)
def test_bad_options_raise(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Shampoo([nn.Parameter(torch.ones(2))], **options)


def test_bad_group_option_raises_and_adds_no_group() -> None:
    optimizer = Shampoo([nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="epsilon"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.ones(2))], "epsilon": -1.0})
    assert len(optimizer.param_groups) == 1


def test_options_are_stored_as_python_numbers() -> None:
    optimizer = Shampoo([nn.Parameter(torch.ones(2))], lr=np.float32(0.5), update_freq=np.int64(2))
    optimizer.add_param_group(
        {"params": [nn.Parameter(torch.ones(2))], "grafting": "adam", "grafting_betas": [0.8, 0.9]}
    )
    first, second = optimizer.param_groups
    assert type(first["lr"]) is float and first["lr"] == 0.5
    assert type(first["update_freq"]) is int and first["update_freq"] == 2
    assert second["grafting_betas"] == (0.8, 0.9)
