"""Factored (π, Tikhonov) damping by Cholesky inverses of the damped factors.

The preconditioned gradients are checked against dense solves with
``(G + λ_G I) ⊗ (A + λ_A I)`` in float64 (π from the traces of the factors of the last
refresh), against the eigenbasis form :func:`natgrad.linalg.kron.factored_solve`, and the
Cholesky failure paths of :func:`natgrad.linalg.kron.damped_factor_inverses` against NumPy
inverses and clamped eigendecompositions.
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from natgrad.linalg.kron import (
    SymmetricEigen,
    damped_factor_inverses,
    factored_damping,
    factored_damping_from_factors,
    factored_solve,
    symmetric_eigh,
)
from natgrad.optim import KFAC

DTYPE = torch.float64


def all_kinds() -> nn.Module:
    """Embedding, Conv2d and Linear layers (with and without bias)."""
    return nn.Sequential(
        nn.Embedding(6, 4),
        nn.Unflatten(1, (1, 2)),  # (N, 2, 4) -> (N, 1, 2, 4)
        nn.Conv2d(1, 2, 2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 5, 5),
        nn.Tanh(),
        nn.Linear(5, 3, bias=False),
    ).to(DTYPE)


def batch(seed: int, size: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 6, (size, 2), generator=generator)
    return tokens, torch.randint(0, 3, (size,), generator=generator)


def loss_of(model: nn.Module, inputs, targets) -> torch.Tensor:
    return nn.functional.cross_entropy(model(inputs), targets)


def dense_factored_solve(factors, damping: float, gradient: torch.Tensor) -> torch.Tensor:
    """``((G + λ_G I) ⊗ (A + λ_A I))⁻¹ vec(V)`` densely in float64, π from the traces."""
    output_factor, input_factor = (factor.to(DTYPE) for factor in factors)
    if input_factor.ndim == 1:
        input_factor = torch.diag(input_factor)
    pi = float(
        torch.sqrt(
            (torch.trace(input_factor) / len(input_factor))
            / (torch.trace(output_factor) / len(output_factor))
        )
    )
    output_damping, input_damping = damping**0.5 / pi, damping**0.5 * pi
    block = torch.kron(
        output_factor + output_damping * torch.eye(len(output_factor), dtype=DTYPE),
        input_factor + input_damping * torch.eye(len(input_factor), dtype=DTYPE),
    )
    return torch.linalg.solve(block, gradient.to(DTYPE).reshape(-1)).reshape(gradient.shape)


def test_schedule_between_refreshes_equals_dense_solves_with_the_refreshed_factors() -> None:
    """Factors move every step, inverses are refreshed every 3 steps and the damping changes
    every step: each step solves with the factors of the last refresh and the current λ."""
    torch.manual_seed(0)
    model = all_kinds()
    schedule = lambda step: 0.02 * (step + 1)  # noqa: E731
    precond = KFAC(
        model, damping=schedule, damping_mode="factored", inv_update_interval=3, factor_decay=0.5
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    refreshed = None
    for step in range(7):
        optimizer.zero_grad()
        loss_of(model, *batch(step)).backward()
        gradients = [state.grad_matrix().clone() for state in precond.layers]
        precond.step()
        if step % 3 == 0:
            refreshed = [(s.output_factor.clone(), s.input_factor.clone()) for s in precond.layers]
        for state, factors, gradient in zip(precond.layers, refreshed, gradients, strict=True):
            expected = dense_factored_solve(factors, schedule(step), gradient)
            torch.testing.assert_close(state.grad_matrix(), expected)
        optimizer.step()


def test_adaptive_damping_re_forms_inverses_and_predicts_with_the_refreshed_factors() -> None:
    """Levenberg–Marquardt damping changes λ between refreshes: the next step solves with the
    new λ, and the predicted decrease uses ``vec(δ)ᵀ (G ⊗ A + λI) vec(δ)`` of the refreshed
    factors."""
    torch.manual_seed(1)
    model = all_kinds()
    precond = KFAC(
        model,
        damping=0.05,
        damping_mode="factored",
        adaptive_damping=True,
        damping_adaptation_interval=1,
        damping_decay=0.5,
        inv_update_interval=4,
        factor_decay=0.5,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    dampings, refreshed = [], None
    for step in range(6):
        inputs, targets = batch(10 + step)
        optimizer.zero_grad()
        loss = loss_of(model, inputs, targets)
        loss.backward()
        gradients = [state.grad_matrix().clone() for state in precond.layers]
        before = [state.param_matrix().clone() for state in precond.layers]
        damping = precond.current_damping()
        dampings.append(damping)
        precond.step()
        if step % 4 == 0:
            refreshed = [(s.output_factor.clone(), s.input_factor.clone()) for s in precond.layers]
        for state, factors, gradient in zip(precond.layers, refreshed, gradients, strict=True):
            torch.testing.assert_close(
                state.grad_matrix(), dense_factored_solve(factors, damping, gradient)
            )
        optimizer.step()
        with torch.no_grad():
            precond.update_damping(loss, loss_of(model, inputs, targets))
        predicted = 0.0
        for state, (output_factor, input_factor), gradient, old in zip(
            precond.layers, refreshed, gradients, before, strict=True
        ):
            delta = (state.param_matrix() - old).reshape(-1)
            if input_factor.ndim == 1:
                input_factor = torch.diag(input_factor)
            block = torch.kron(output_factor, input_factor)
            predicted += float(gradient.reshape(-1) @ delta)
            predicted += 0.5 * float(delta @ (block @ delta) + damping * delta @ delta)
        assert precond.last_damping_update["predicted"] == pytest.approx(predicted, rel=1e-9)
    assert len(set(dampings)) > 2, f"the damping never changed: {dampings}"


def test_equals_the_eigenbasis_factored_solve_in_float32() -> None:
    """The Cholesky inverses equal the previous eigen-based form
    (:func:`~natgrad.linalg.kron.factored_solve` of the factors' eigendecompositions) to
    float32 rounding."""
    torch.manual_seed(2)
    model = all_kinds().float()
    precond = KFAC(model, damping=0.01, damping_mode="factored", inv_update_interval=1)
    loss_of(model, *batch(3)).backward()
    gradients = [state.grad_matrix().clone() for state in precond.layers]
    precond.step()
    for state, gradient in zip(precond.layers, gradients, strict=True):
        output_eigen = symmetric_eigh(state.output_factor)
        if state.input_factor.ndim == 1:
            input_eigen = SymmetricEigen(state.input_factor.clamp_min(0), None)
        else:
            input_eigen = symmetric_eigh(state.input_factor)
        expected = factored_solve(output_eigen, input_eigen, gradient, 0.01)
        assert state.grad_matrix().dtype == torch.float32
        torch.testing.assert_close(state.grad_matrix(), expected, rtol=2e-4, atol=1e-5)
        torch.testing.assert_close(
            torch.tensor(
                factored_damping_from_factors(state.output_factor, state.input_factor, 1.0)
            ),
            torch.tensor(factored_damping(output_eigen, input_eigen, 1.0)),
        )


def test_no_eigendecomposition_is_computed(monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("factored damping must not eigendecompose")

    monkeypatch.setattr(torch.linalg, "eigh", forbidden)
    model = all_kinds()
    precond = KFAC(model, damping=0.1, damping_mode="factored", inv_update_interval=2)
    for step in range(3):
        model.zero_grad()
        loss_of(model, *batch(step)).backward()
        precond.step()
    assert all(state.output_eigen is None for state in precond.layers)


def test_cholesky_failures_fall_back_to_clamped_eigendecompositions(monkeypatch) -> None:
    """With every Cholesky reported failed, the preconditioned gradients still equal the dense
    solves (from the float64 retry's failure to the eigendecomposition)."""
    original = torch.linalg.cholesky_ex

    def failing(matrix, **kwargs):
        factor, info = original(matrix, **kwargs)
        return factor, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    torch.manual_seed(3)
    model = all_kinds()
    precond = KFAC(model, damping=0.03, damping_mode="factored", inv_update_interval=1)
    loss_of(model, *batch(4)).backward()
    gradients = [state.grad_matrix().clone() for state in precond.layers]
    precond.step()
    for state, gradient in zip(precond.layers, gradients, strict=True):
        factors = (state.output_factor, state.input_factor)
        torch.testing.assert_close(
            state.grad_matrix(), dense_factored_solve(factors, 0.03, gradient)
        )


def test_singular_factor_with_tiny_damping_gives_finite_dense_solutions() -> None:
    """Duplicated input features make ``A`` singular; with λ = 1e-10 the damped factors are
    still inverted (by Cholesky or its fallbacks) and the solve matches the dense one."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 3)).to(DTYPE)
    half = torch.randn(9, 2, dtype=DTYPE)
    inputs, targets = torch.cat([half, half], dim=1), torch.randint(0, 3, (9,))
    precond = KFAC(model, damping=1e-10, damping_mode="factored", inv_update_interval=1)
    loss_of(model, inputs, targets).backward()
    gradient = precond.layers[0].grad_matrix().clone()
    precond.step()
    state = precond.layers[0]
    assert torch.linalg.matrix_rank(state.input_factor) < len(state.input_factor)
    solution = state.grad_matrix()
    assert torch.isfinite(solution).all()
    expected = dense_factored_solve((state.output_factor, state.input_factor), 1e-10, gradient)
    torch.testing.assert_close(solution, expected, rtol=1e-6, atol=1e-6 * expected.abs().max())


def random_psd(size: int, seed: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(size + 1, size, generator=generator, dtype=DTYPE)
    return (factor.T @ factor / (size + 1)).to(dtype)


def test_damped_factor_inverses_equal_numpy_inverses() -> None:
    """Mixed sizes, dtypes and a diagonal factor: each equals ``inv(M + λI)`` in float64, in
    row-major memory (the one layout that broadcasts reproduce bit for bit)."""
    matrices = [
        random_psd(4, 0),
        random_psd(3, 1),
        random_psd(4, 2),
        random_psd(4, 3, torch.float32),
        torch.tensor([0.5, 0.0, 2.0], dtype=DTYPE),
        random_psd(5, 4, torch.bfloat16),
    ]
    dampings = [0.1, 1e-3, 2.0, 0.3, 0.25, 0.5]
    inverses = damped_factor_inverses(matrices, dampings)
    for matrix, damping, inverse in zip(matrices, dampings, inverses, strict=True):
        assert inverse.dtype == (torch.float32 if matrix.dtype != DTYPE else DTYPE)
        assert inverse.is_contiguous()
        reference = matrix.double().numpy()
        if matrix.ndim == 1:
            expected = 1.0 / (reference + damping)
        else:
            expected = np.linalg.inv(reference + damping * np.eye(len(reference)))
        tolerance = (1e-10 if matrix.dtype == DTYPE else 1e-5) * np.abs(expected).max()
        np.testing.assert_allclose(inverse.double().numpy(), expected, rtol=0, atol=tolerance)
    assert damped_factor_inverses([], []) == []


def test_indefinite_factor_falls_back_to_the_clamped_eigendecomposition() -> None:
    """A factor that round-off made indefinite (eigenvalue −1e−6) with damping 1e−9: Cholesky
    fails in float32 and float64; the inverse is ``Q diag(1 / (max(s, 0) + λ)) Qᵀ``."""
    generator = torch.Generator().manual_seed(5)
    basis, _ = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=DTYPE))
    values = torch.tensor([1.0, 0.5, -1e-6], dtype=DTYPE)
    indefinite = basis @ torch.diag(values) @ basis.T
    assert torch.linalg.cholesky_ex(indefinite + 1e-9 * torch.eye(3, dtype=DTYPE))[1] > 0
    fine = random_psd(3, 6)
    for dtype in (DTYPE, torch.float32):
        inverse, other = damped_factor_inverses([indefinite.to(dtype), fine.to(dtype)], [1e-9, 0.1])
        assert inverse.is_contiguous() and other.is_contiguous()
        reference_values, reference_vectors = np.linalg.eigh(indefinite.numpy())
        reciprocal = 1.0 / (np.maximum(reference_values, 0.0) + 1e-9)
        expected = (reference_vectors * reciprocal) @ reference_vectors.T
        np.testing.assert_allclose(inverse.double().numpy(), expected, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(
            other, torch.linalg.inv(fine + 0.1 * torch.eye(3, dtype=DTYPE)).to(dtype)
        )


def test_float32_cholesky_failure_is_retried_in_float64(monkeypatch) -> None:
    """A float32 Cholesky reported failed is redone in float64 (not by eigendecomposition)."""
    original = torch.linalg.cholesky_ex
    calls = []

    def fails_in_float32(matrix, **kwargs):
        calls.append(matrix.dtype)
        factor, info = original(matrix, **kwargs)
        return factor, info + (matrix.dtype == torch.float32)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", fails_in_float32)
    monkeypatch.setattr(torch.linalg, "eigh", None)
    matrix = random_psd(4, 7, torch.float32)
    (inverse,) = damped_factor_inverses([matrix], [0.2])
    assert calls == [torch.float32, torch.float64] and inverse.dtype == torch.float32
    expected = torch.linalg.inv(matrix.double() + 0.2 * torch.eye(4, dtype=DTYPE))
    torch.testing.assert_close(inverse.double(), expected, rtol=1e-6, atol=1e-7)


def test_damped_factor_inverses_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="dampings"):
        damped_factor_inverses([random_psd(2, 0)], [0.1, 0.2])
    with pytest.raises(ValueError, match="positive"):
        damped_factor_inverses([random_psd(2, 0)], [0.0])
    with pytest.raises(ValueError, match="square"):
        damped_factor_inverses([torch.zeros(2, 3)], [0.1])
    broken = random_psd(2, 0)
    broken[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        damped_factor_inverses([broken], [0.1])
    model = all_kinds()
    precond = KFAC(model, damping=lambda step: 0.0, damping_mode="factored")
    loss_of(model, *batch(0)).backward()
    with pytest.raises(ValueError, match="damping > 0"):
        precond.step()


@pytest.mark.parametrize("adaptive", [False, True])
def test_state_dict_round_trip_resumes_identically(adaptive) -> None:
    """Saved between refreshes (inverse interval 3, 5 steps): the refreshed factors come back,
    so the resumed run equals the uninterrupted one exactly."""
    options = {"damping_mode": "factored", "inv_update_interval": 3, "factor_decay": 0.7}
    if adaptive:
        options |= {"damping": 0.05, "adaptive_damping": True, "damping_adaptation_interval": 2}
    else:
        options |= {"damping": lambda step: 0.05 / (step + 1)}

    def train(model, precond, optimizer, steps) -> None:
        for step in steps:
            inputs, targets = batch(20 + step)
            optimizer.zero_grad()
            loss = loss_of(model, inputs, targets)
            loss.backward()
            precond.step()
            optimizer.step()
            if precond.damping_update_due:
                with torch.no_grad():
                    precond.update_damping(loss, loss_of(model, inputs, targets))

    torch.manual_seed(5)
    model = all_kinds()
    precond = KFAC(model, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    train(model, precond, optimizer, range(5))
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), precond.state_dict()))
    train(model, precond, optimizer, range(5, 10))

    resumed = all_kinds()
    resumed.load_state_dict(saved[0])
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.5, momentum=0.9)
    resumed_optimizer.load_state_dict(saved[1])
    resumed_precond = KFAC(resumed, **options)
    resumed_precond.load_state_dict(saved[2])
    train(resumed, resumed_precond, resumed_optimizer, range(5, 10))
    for expected, actual in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert saved[2]["layers"]["2"]["inverted_input_factor"] is not None


def test_autocast_keeps_float32_factors_and_inverses() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    precond = KFAC(model, damping=0.1, damping_mode="factored", inv_update_interval=1)
    inputs, targets = torch.randn(8, 3), torch.randint(0, 3, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(inputs).float(), targets)
    loss.backward()
    gradients = [state.grad_matrix().clone() for state in precond.layers]
    precond.step()
    for state, gradient in zip(precond.layers, gradients, strict=True):
        assert all(factor.dtype == torch.float32 for factor in state.inverted_factors)
        assert all(t.dtype == torch.float32 for t in state.factored_inverse_tensors())
        factors = (state.output_factor, state.input_factor)
        expected = dense_factored_solve(factors, 0.1, gradient).float()
        torch.testing.assert_close(state.grad_matrix(), expected, rtol=1e-4, atol=1e-5)


def test_channels_last_conv_grad_takes_the_copy_path() -> None:
    """A channels-last weight gradient is not a row-major matrix view: the deferred last
    product is formed and copied into it, equal to the dense factored solve."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
    model = model.to(DTYPE).to(memory_format=torch.channels_last)
    precond = KFAC(model, damping=0.1, damping_mode="factored", inv_update_interval=1)
    inputs, targets = torch.randn(5, 2, 3, 3, dtype=DTYPE), torch.randint(0, 3, (5,))
    loss_of(model, inputs, targets).backward()
    gradients = [state.grad_matrix().clone() for state in precond.layers]
    precond.step()
    assert not model[0].weight.grad.is_contiguous()
    for state, gradient in zip(precond.layers, gradients, strict=True):
        factors = (state.output_factor, state.input_factor)
        torch.testing.assert_close(
            state.grad_matrix(), dense_factored_solve(factors, 0.1, gradient)
        )


@pytest.mark.parametrize("saved_mode", ["eigen", "factored"])
def test_state_saved_in_one_damping_mode_resumes_in_the_other(saved_mode) -> None:
    """Between refreshes, a state saved with the other damping mode has no curvature of the
    loaded mode's kind: it is formed from the loaded factors at the next step."""
    torch.manual_seed(8)
    model = all_kinds()
    options = {"damping": 0.05, "inv_update_interval": 10}
    precond = KFAC(model, damping_mode=saved_mode, **options)
    for step in range(2):
        model.zero_grad()
        loss_of(model, *batch(30 + step)).backward()
        precond.step()
    mode = "factored" if saved_mode == "eigen" else "eigen"
    resumed = KFAC(model, damping_mode=mode, **options)
    resumed.load_state_dict(copy.deepcopy(precond.state_dict()))
    precond.remove()
    model.zero_grad()
    loss_of(model, *batch(32)).backward()
    gradients = [state.grad_matrix().clone() for state in resumed.layers]
    resumed.step()
    for state, gradient in zip(resumed.layers, gradients, strict=True):
        factors = (state.output_factor, state.input_factor)
        if mode == "factored":
            expected = dense_factored_solve(factors, 0.05, gradient)
        else:
            output_factor, input_factor = factors
            if input_factor.ndim == 1:
                input_factor = torch.diag(input_factor)
            block = torch.kron(output_factor, input_factor)
            block += 0.05 * torch.eye(len(block), dtype=DTYPE)
            expected = torch.linalg.solve(block, gradient.reshape(-1)).reshape(gradient.shape)
        torch.testing.assert_close(state.grad_matrix(), expected)
