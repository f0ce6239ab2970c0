"""QuadraticModelOptimizer against dense float64 oracles: the 2×2 quadratic model solved with
brute-force Fisher matrices (``torch.func.jacrev`` per-sample Jacobians), conjugate gradients on
a least-squares problem, the Levenberg–Marquardt rule, refused steps and state round trips."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

from kfac_training import fisher_options
from natgrad.optim import KFAC
from natgrad.optim.quadratic_model import QuadraticModelOptimizer, minimize_quadratic_model

pytestmark = pytest.mark.usefixtures("float64_default")


def _mlp(outputs: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, outputs))


def _classification(samples: int = 12, seed: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(samples, 4, generator=generator), torch.randint(
        0, 3, (samples,), generator=generator
    )


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _dense_fisher(model: nn.Module, inputs: Tensor) -> Tensor:
    """``1/N Σ Jₙᵀ ∇²logsumexp(fₙ) Jₙ`` from per-sample Jacobians of the flat parameters."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def output(theta: Tensor, sample: Tensor) -> Tensor:
        pieces = torch.split(theta, sizes)
        params = {n: piece.reshape(s) for n, piece, s in zip(names, pieces, shapes, strict=True)}
        return functional_call(model, params, (sample.unsqueeze(0),)).reshape(-1)

    theta = _flat(model)
    jacobians = vmap(jacrev(output), in_dims=(None, 0))(theta, inputs)
    logits = vmap(output, in_dims=(None, 0))(theta, inputs)
    curvatures = vmap(hessian(lambda f: torch.logsumexp(f, -1)))(logits)
    return torch.einsum("nci,ncd,ndj->ij", jacobians, curvatures, jacobians) / len(inputs)


def _gradient(model: nn.Module, inputs: Tensor, labels: Tensor) -> Tensor:
    model.zero_grad()
    nn.functional.cross_entropy(model(inputs), labels).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _closure(model: nn.Module, optimizer, inputs: Tensor, labels: Tensor, precond=None):
    def closure() -> Tensor:
        optimizer.zero_grad()
        outputs = model(inputs)
        if precond is not None and precond.fisher_type == "mc":
            precond.sample_backward(outputs)
        loss = nn.functional.cross_entropy(outputs, labels)
        loss.backward()
        return loss

    return closure


def _oracle_coefficients(
    fisher: Tensor, damping: float, gradient: Tensor, directions: list[Tensor]
) -> Tensor:
    stacked = torch.stack(directions)
    matrix = stacked @ (fisher + damping * torch.eye(len(fisher))) @ stacked.T
    return torch.linalg.solve(matrix, -(stacked @ gradient))


# -- the 2×2 model ----------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), size=st.integers(1, 3))
def test_minimizer_solves_the_normal_equations(seed: int, size: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(size, size, generator=generator)
    matrix = root @ root.T + 0.1 * torch.eye(size)
    linear = torch.randn(size, generator=generator)
    coefficients, predicted = minimize_quadratic_model(matrix, linear)
    np.testing.assert_allclose(
        coefficients.numpy(), np.linalg.solve(matrix.numpy(), -linear.numpy()), rtol=1e-9
    )
    expected = float(linear @ coefficients + 0.5 * coefficients @ matrix @ coefficients)
    assert predicted == pytest.approx(expected, rel=1e-12)
    assert predicted == pytest.approx(0.5 * float(linear @ coefficients), rel=1e-9)
    assert predicted <= 0


def test_minimizer_of_parallel_directions_is_the_minimum_norm_solution() -> None:
    direction = torch.tensor([1.0, 2.0])
    directions = torch.stack([direction, 3 * direction])
    matrix = directions @ directions.T  # rank one
    linear = directions @ torch.tensor([-1.0, -0.5])
    coefficients, predicted = minimize_quadratic_model(matrix, linear)
    step = coefficients @ directions
    best_scale = -float(linear[0]) / float(matrix[0, 0])  # 1-d minimiser along ``direction``
    torch.testing.assert_close(step, best_scale * direction)
    assert torch.linalg.norm(coefficients) < abs(best_scale) + 1e-12  # minimum norm
    assert predicted < 0


def test_minimizer_rejects_bad_coefficients() -> None:
    with pytest.raises(ValueError, match=r"must be \(2, 2\)"):
        minimize_quadratic_model(torch.eye(3), torch.ones(2))
    with pytest.raises(ValueError, match="non-finite"):
        minimize_quadratic_model(torch.eye(2), torch.tensor([1.0, float("nan")]))


# -- the optimizer against dense oracles -------------------------------------------------------


def test_two_steps_without_preconditioner_match_the_dense_quadratic_model() -> None:
    inputs, labels = _classification()
    model, reference = _mlp(), _mlp()
    damping = 0.05
    optimizer = QuadraticModelOptimizer(
        model, "categorical", damping=damping, adaptive_damping=False
    )
    previous = None
    for _ in range(2):
        gradient = _gradient(reference, inputs, labels)
        fisher = _dense_fisher(reference, inputs)
        directions = [-gradient] if previous is None else [-gradient, previous]
        coefficients = _oracle_coefficients(fisher, damping, gradient, directions)
        step = coefficients @ torch.stack(directions)
        torch.nn.utils.vector_to_parameters(_flat(reference) + step, reference.parameters())
        previous = step
        optimizer.step(_closure(model, optimizer, inputs, labels))
        torch.testing.assert_close(_flat(model), _flat(reference), rtol=1e-10, atol=1e-12)
    assert optimizer.last_step["alpha"] == pytest.approx(float(coefficients[0]), rel=1e-9)
    assert optimizer.last_step["mu"] == pytest.approx(float(coefficients[1]), rel=1e-9)


def test_kfac_direction_is_scaled_by_the_dense_quadratic_model() -> None:
    inputs, labels = _classification()
    model = _mlp()
    twin = copy.deepcopy(model)
    options = {"damping": 0.1, "factor_decay": 0.0}
    damping = options["damping"]
    precond = KFAC(model, **options)
    optimizer = QuadraticModelOptimizer(
        model, "categorical", preconditioner=precond, damping=damping, adaptive_damping=False
    )
    twin_precond = KFAC(twin, **options)
    gradient = _gradient(twin, inputs, labels)
    twin_precond.step()
    twin_precond.remove()
    direction = -torch.cat([p.grad.reshape(-1) for p in twin.parameters()])
    assert torch.linalg.norm(direction + gradient) > 1e-3 * torch.linalg.norm(gradient)
    fisher = _dense_fisher(twin, inputs)
    (alpha,) = _oracle_coefficients(fisher, damping, gradient, [direction])
    before = _flat(model)
    optimizer.step(_closure(model, optimizer, inputs, labels, precond))
    torch.testing.assert_close(_flat(model) - before, alpha * direction, rtol=1e-9, atol=1e-12)


def test_curvature_batch_size_uses_the_first_samples_for_the_fisher() -> None:
    inputs, labels = _classification(samples=12)
    model, reference = _mlp(), _mlp()
    damping = 0.05
    optimizer = QuadraticModelOptimizer(
        model, "categorical", damping=damping, adaptive_damping=False, curvature_batch_size=5
    )
    gradient = _gradient(reference, inputs, labels)
    (alpha,) = _oracle_coefficients(
        _dense_fisher(reference, inputs[:5]), damping, gradient, [-gradient]
    )
    optimizer.step(_closure(model, optimizer, inputs, labels))
    torch.testing.assert_close(
        _flat(model), _flat(reference) - alpha * gradient, rtol=1e-10, atol=1e-12
    )


def test_least_squares_is_solved_in_as_many_steps_as_parameters() -> None:
    """On a quadratic, the best step in span{−g, δ₀} is the conjugate-gradient step: the exact
    least-squares solution after P steps (P = 4 parameters)."""
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(30, 3, generator=generator) * torch.tensor([1.0, 5.0, 0.2])
    targets = torch.randn(30, 1, generator=generator)
    model = nn.Linear(3, 1)
    optimizer = QuadraticModelOptimizer(
        model, "gaussian", damping=1e-12, damping_bounds=(1e-14, 1.0), adaptive_damping=False
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = 0.5 * (model(inputs) - targets).pow(2).sum(-1).mean()
        loss.backward()
        return loss

    for _ in range(4):
        optimizer.step(closure)
    design = np.hstack([inputs.numpy(), np.ones((30, 1))])
    solution, *_ = np.linalg.lstsq(design, targets.numpy()[:, 0], rcond=None)
    fitted = np.concatenate([model.weight.detach().numpy()[0], model.bias.detach().numpy()])
    np.testing.assert_allclose(fitted, solution, rtol=1e-7, atol=1e-9)


def test_momentum_false_chooses_the_step_size_alone() -> None:
    inputs, labels = _classification()
    model, reference = _mlp(), _mlp()
    damping = 0.05
    optimizer = QuadraticModelOptimizer(
        model, "categorical", damping=damping, adaptive_damping=False, momentum=False
    )
    for _ in range(2):
        gradient = _gradient(reference, inputs, labels)
        (alpha,) = _oracle_coefficients(
            _dense_fisher(reference, inputs), damping, gradient, [-gradient]
        )
        torch.nn.utils.vector_to_parameters(
            _flat(reference) - alpha * gradient, reference.parameters()
        )
        optimizer.step(_closure(model, optimizer, inputs, labels))
    torch.testing.assert_close(_flat(model), _flat(reference), rtol=1e-10, atol=1e-12)
    assert "mu" not in optimizer.last_step


# -- damping ------------------------------------------------------------------------------------


def test_levenberg_marquardt_rule_follows_the_reduction_ratio() -> None:
    inputs, labels = _classification()
    model = _mlp()
    optimizer = QuadraticModelOptimizer(
        model, "categorical", damping=1.0, damping_adaptation_interval=3, damping_decay=0.5
    )
    closure = _closure(model, optimizer, inputs, labels)
    for index in range(7):
        with torch.no_grad():
            loss_before = float(nn.functional.cross_entropy(model(inputs), labels))
        damping = optimizer.damping
        optimizer.step(closure)
        with torch.no_grad():
            actual = float(nn.functional.cross_entropy(model(inputs), labels)) - loss_before
        if index % 3:  # adapted after steps 0, 3 and 6 only
            assert optimizer.damping == damping
            continue
        ratio = actual / optimizer.last_step["predicted_change"]
        assert optimizer.last_step["actual_change"] == pytest.approx(actual, rel=1e-9)
        assert optimizer.last_step["ratio"] == pytest.approx(ratio, rel=1e-9)
        expected = damping * 0.5 if ratio > 0.75 else damping / 0.5 if ratio < 0.25 else damping
        assert optimizer.damping == pytest.approx(expected, rel=1e-12)


def test_a_good_quadratic_model_lowers_the_damping_and_a_bad_one_raises_it() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(20, 3, generator=generator)
    targets = torch.randn(20, 1, generator=generator)
    model = nn.Linear(3, 1)
    optimizer = QuadraticModelOptimizer(model, "gaussian", damping=0.1, damping_decay=0.5)

    def exact() -> Tensor:  # the model is the loss: ratio ≥ 1
        optimizer.zero_grad()
        loss = 0.5 * (model(inputs) - targets).pow(2).sum(-1).mean()
        loss.backward()
        return loss

    optimizer.step(exact)
    assert optimizer.damping == pytest.approx(0.05)
    assert optimizer.last_step["ratio"] >= 1.0

    def steep() -> Tensor:  # quartic loss: the Gaussian model underestimates the curvature
        optimizer.zero_grad()
        loss = (10 * (model(inputs) - targets)).pow(4).sum(-1).mean()
        loss.backward()
        return loss

    rising = QuadraticModelOptimizer(model, "gaussian", damping=0.1, damping_decay=0.5)
    optimizer = rising
    rising.step(steep)
    assert rising.last_step["ratio"] < 0.25
    assert rising.damping == pytest.approx(0.2)


def test_couple_damping_hands_lambda_to_the_preconditioner_at_its_refreshes() -> None:
    inputs, labels = _classification()
    model = _mlp()
    precond = KFAC(model, damping=0.3, inv_update_interval=3)
    optimizer = QuadraticModelOptimizer(
        model,
        "categorical",
        preconditioner=precond,
        damping=0.02,
        damping_decay=0.5,
        damping_adaptation_interval=1,
    )
    handed = []
    for _ in range(7):
        damping = optimizer.damping
        optimizer.step(_closure(model, optimizer, inputs, labels, precond))
        handed.append((damping, precond.damping))
    assert len({damping for damping, _ in handed}) > 3  # λ moves every step
    for step, (_, precond_damping) in enumerate(handed):
        refresh = step - step % 3  # the preconditioner refreshes at steps 0, 3, 6
        assert precond_damping == handed[refresh][0]
    uncoupled = KFAC(model, damping=0.3)
    free = QuadraticModelOptimizer(
        model, "categorical", preconditioner=uncoupled, couple_damping=False
    )
    free.step(_closure(model, free, inputs, labels, uncoupled))
    assert uncoupled.damping == 0.3


def test_damping_adaptation_does_not_record_kfac_statistics() -> None:
    inputs, labels = _classification()
    model = _mlp()
    generator = torch.Generator().manual_seed(0)
    options = {"fisher_type": "mc", "likelihood": "categorical", "factor_decay": 0.5}
    twin = copy.deepcopy(model)  # before any hook is attached
    precond = KFAC(model, generator=generator, **options)
    optimizer = QuadraticModelOptimizer(
        model, "categorical", preconditioner=precond, damping=1.0, damping_adaptation_interval=1
    )
    twin_precond = KFAC(twin, generator=torch.Generator().manual_seed(0), **options)
    twin_optimizer = QuadraticModelOptimizer(
        twin, "categorical", preconditioner=twin_precond, adaptive_damping=False
    )
    for _ in range(3):
        twin_optimizer.param_groups[0]["damping"] = optimizer.damping
        optimizer.step(_closure(model, optimizer, inputs, labels, precond))
        twin_optimizer.step(_closure(twin, twin_optimizer, inputs, labels, twin_precond))
        torch.testing.assert_close(_flat(twin), _flat(model), rtol=0, atol=0)
    assert optimizer.counters["rejected_steps"] == 0
    for ours, theirs in zip(precond.layers, twin_precond.layers, strict=True):
        torch.testing.assert_close(ours.input_factor, theirs.input_factor)
        torch.testing.assert_close(ours.output_factor, theirs.output_factor)


# -- refused steps, state, bad input ------------------------------------------------------------


def test_non_finite_loss_or_gradient_refuses_the_step() -> None:
    inputs, labels = _classification()
    model = _mlp()
    optimizer = QuadraticModelOptimizer(model, "categorical")
    before = _flat(model)

    def nan_loss() -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels) * float("nan")
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="loss is not finite"):
        optimizer.step(nan_loss)

    def nan_gradient() -> Tensor:
        loss = _closure(model, optimizer, inputs, labels)()
        next(model.parameters()).grad[0, 0] = float("inf")
        return loss

    with pytest.warns(RuntimeWarning, match="gradient or the preconditioned direction"):
        optimizer.step(nan_gradient)
    torch.testing.assert_close(_flat(model), before, rtol=0, atol=0)
    assert optimizer.counters == {"steps": 0, "refused_steps": 2, "rejected_steps": 0}


def test_state_dict_round_trip_resumes_identically() -> None:
    inputs, labels = _classification()

    def build(model: nn.Module):
        precond = KFAC(model, damping=0.1, inv_update_interval=2)
        optimizer = QuadraticModelOptimizer(
            model, "categorical", preconditioner=precond, damping=0.1, damping_adaptation_interval=2
        )
        return precond, optimizer

    model = _mlp()
    precond, optimizer = build(model)
    for _ in range(3):
        optimizer.step(_closure(model, optimizer, inputs, labels, precond))
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy((precond.state_dict(), optimizer.state_dict()))
    resumed = _mlp(seed=5)
    resumed.load_state_dict(saved_model)
    resumed_precond, resumed_optimizer = build(resumed)
    resumed_precond.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[1])
    assert resumed_optimizer.damping == optimizer.damping
    assert resumed_optimizer.counters == optimizer.counters
    for _ in range(3):
        optimizer.step(_closure(model, optimizer, inputs, labels, precond))
        resumed_optimizer.step(
            _closure(resumed, resumed_optimizer, inputs, labels, resumed_precond)
        )
    torch.testing.assert_close(_flat(resumed), _flat(model), rtol=0, atol=0)


def _counted_closure(model, optimizer, inputs, labels, precond, calls: list[int]):
    closure = _closure(model, optimizer, inputs, labels, precond)

    def counted() -> Tensor:
        calls.append(1)
        return closure()

    return counted


def _full_batch_pair(interval: int):
    """Twin K-FAC (MC) + quadratic-model optimizers, the second with ``full_batch=True``."""
    pairs = []
    for full_batch in (False, True):
        model = _mlp()
        precond = KFAC(model, **fisher_options("mc", seed=3), damping=0.1, inv_update_interval=2)
        optimizer = QuadraticModelOptimizer(
            model,
            "categorical",
            preconditioner=precond,
            damping=0.1,
            damping_adaptation_interval=interval,
            damping_decay=0.5,
            full_batch=full_batch,
        )
        pairs.append((model, precond, optimizer))
    return pairs


@pytest.mark.parametrize("interval", [1, 3])
def test_full_batch_takes_the_same_steps_with_one_closure_call_per_step(interval: int) -> None:
    """On a fixed batch the loss after a step is the next step's closure loss: the same
    parameters and dampings, one step later, without the extra closure calls."""
    inputs, labels = _classification()
    (model, precond, optimizer), (twin, twin_precond, full) = _full_batch_pair(interval)
    calls: list[int] = []
    full_calls: list[int] = []
    closure = _counted_closure(model, optimizer, inputs, labels, precond, calls)
    full_closure = _counted_closure(twin, full, inputs, labels, twin_precond, full_calls)
    dampings, full_dampings, updates = [], [], []
    steps = 7
    for _ in range(steps):
        optimizer.step(closure)
        full.step(full_closure)
        torch.testing.assert_close(_flat(twin), _flat(model), rtol=0, atol=0)
        dampings.append(optimizer.damping)
        full_dampings.append(full.damping)
        updates.append(full.last_damping_update)
    adapted = len(range(0, steps, interval))
    assert len(calls) == steps + adapted and len(full_calls) == steps
    assert full_dampings[1:] == dampings[:-1]  # each assessment comes with the next step
    assert len(set(dampings)) > 1, "the damping never changed"
    assert optimizer.last_damping_update["damping_after"] == dampings[-1]
    assert updates[-1]["damping_after"] == full_dampings[-1]


def test_full_batch_state_round_trip_keeps_the_pending_assessment() -> None:
    inputs, labels = _classification()
    (_, _, _), (model, precond, optimizer) = _full_batch_pair(1)
    for _ in range(2):
        optimizer.step(_closure(model, optimizer, inputs, labels, precond))
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy((precond.state_dict(), optimizer.state_dict()))
    assert saved[1]["pending_assessment"] is not None
    (_, _, _), (resumed, resumed_precond, resumed_optimizer) = _full_batch_pair(1)
    resumed.load_state_dict(saved_model)
    resumed_precond.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[1])
    for _ in range(2):
        optimizer.step(_closure(model, optimizer, inputs, labels, precond))
        resumed_optimizer.step(
            _closure(resumed, resumed_optimizer, inputs, labels, resumed_precond)
        )
    torch.testing.assert_close(_flat(resumed), _flat(model), rtol=0, atol=0)
    assert resumed_optimizer.damping == optimizer.damping


def _overshooting(full_batch: bool):
    """No preconditioner and ``lr=30``: the first step overshoots and raises the loss;
    ``reject_steps`` undoes it."""
    model = _mlp()
    optimizer = QuadraticModelOptimizer(
        model,
        "categorical",
        lr=30.0,
        damping=0.1,
        damping_adaptation_interval=5,
        damping_decay=0.5,
        full_batch=full_batch,
        reject_steps=True,
    )
    return model, optimizer


def test_a_step_that_raises_the_loss_is_undone_and_the_next_one_assessed() -> None:
    inputs, labels = _classification()
    model, optimizer = _overshooting(full_batch=False)
    closure = _closure(model, optimizer, inputs, labels)
    start = _flat(model)
    loss = optimizer.step(closure)
    assert optimizer.last_step["actual_change"] > 0
    assert optimizer.counters == {"steps": 1, "refused_steps": 0, "rejected_steps": 1}
    torch.testing.assert_close(_flat(model), start, rtol=0, atol=1e-12)
    assert optimizer.damping == pytest.approx(0.2)  # λ / ω
    assert all("previous_update" not in optimizer.state[p] for p in model.parameters())
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(model(inputs), labels)) == pytest.approx(
            float(loss), rel=1e-12
        )
    optimizer.step(closure)  # step 1 is not due by the interval (5), but is assessed
    assert "actual_change" in optimizer.last_step


def test_full_batch_undoes_a_bad_step_like_the_re_evaluating_optimizer() -> None:
    inputs, labels = _classification()
    (model, optimizer), (twin, full) = _overshooting(False), _overshooting(True)
    calls: list[int] = []
    full_calls: list[int] = []
    closure = _counted_closure(model, optimizer, inputs, labels, None, calls)
    full_closure = _counted_closure(twin, full, inputs, labels, None, full_calls)
    for _ in range(4):
        optimizer.step(closure)
        full.step(full_closure)
    assert optimizer.counters["rejected_steps"] >= 1
    full.step(full_closure)  # assesses the fourth step
    optimizer.step(closure)
    assert optimizer.last_step["actual_change"] < 0  # the fifth step is kept: full's too
    assert full.counters == optimizer.counters
    torch.testing.assert_close(_flat(twin), _flat(model), rtol=0, atol=0)
    rejected = optimizer.counters["rejected_steps"]
    assert len(full_calls) == 5 + rejected  # one call per step, and one more per undone step
    assert len(calls) > len(full_calls)


def test_without_reject_steps_a_step_that_raises_the_loss_is_kept() -> None:
    inputs, labels = _classification()
    model, optimizer = _overshooting(full_batch=False)
    optimizer.reject_steps = False
    start = _flat(model)
    optimizer.step(_closure(model, optimizer, inputs, labels))
    assert optimizer.last_step["actual_change"] > 0
    assert optimizer.counters["rejected_steps"] == 0
    assert not torch.allclose(_flat(model), start)
    assert optimizer.damping == pytest.approx(0.2)


def test_a_non_finite_loss_after_the_step_refuses_it_and_undoes_it() -> None:
    inputs, labels = _classification()
    model = _mlp()
    optimizer = QuadraticModelOptimizer(model, "categorical", damping=0.1)
    closure = _closure(model, optimizer, inputs, labels)
    calls: list[int] = []

    def poisoned() -> Tensor:
        calls.append(1)
        loss = closure()
        return loss * float("nan") if len(calls) == 2 else loss

    start = _flat(model)
    with pytest.warns(RuntimeWarning, match="not finite; step undone"):
        optimizer.step(poisoned)
    assert optimizer.counters == {"steps": 1, "refused_steps": 1, "rejected_steps": 0}
    torch.testing.assert_close(_flat(model), start, rtol=0, atol=1e-12)
    assert optimizer.damping > 0.1


def test_bad_options_raise_naming_the_value() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="damping must be a positive finite number, got -1"):
        QuadraticModelOptimizer(model, "categorical", damping=-1.0)
    with pytest.raises(ValueError, match=r"damping_bounds \(1.0, 2.0\)"):
        QuadraticModelOptimizer(model, "categorical", damping=0.1, damping_bounds=(1.0, 2.0))
    with pytest.raises(ValueError, match="damping_decay"):
        QuadraticModelOptimizer(model, "categorical", damping_decay=1.5)
    with pytest.raises(ValueError, match="curvature_batch_size"):
        QuadraticModelOptimizer(model, "categorical", curvature_batch_size=0)
    with pytest.raises(TypeError, match="preconditioner must be a KFAC or EKFAC, got SGD"):
        QuadraticModelOptimizer(
            model, "categorical", preconditioner=torch.optim.SGD(model.parameters(), lr=0.1)
        )
    with pytest.raises(ValueError, match="adaptive_damping=False"):
        QuadraticModelOptimizer(
            model, "categorical", preconditioner=KFAC(model, adaptive_damping=True, damping=0.1)
        )
    with pytest.raises(ValueError, match="laplace"):
        QuadraticModelOptimizer(model, "laplace")


def test_step_needs_a_closure_that_runs_the_model() -> None:
    model = _mlp()
    optimizer = QuadraticModelOptimizer(model, "categorical")
    with pytest.raises(ValueError, match="needs a closure"):
        optimizer.step()
    with pytest.raises(RuntimeError, match="did not run the model"):
        optimizer.step(lambda: torch.tensor(1.0))


def test_no_warning_on_a_regular_run() -> None:
    inputs, labels = _classification()
    model = _mlp()
    optimizer = QuadraticModelOptimizer(model, "categorical")
    with torch.no_grad():
        first = float(nn.functional.cross_entropy(model(inputs), labels))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(10):
            optimizer.step(_closure(model, optimizer, inputs, labels))
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(model(inputs), labels)) < 0.8 * first


def test_lr_scales_the_chosen_step_and_schedulers_act_on_it() -> None:
    inputs, labels = _classification()
    full, half = _mlp(), _mlp()
    start = _flat(full)
    full_optimizer = QuadraticModelOptimizer(full, "categorical", adaptive_damping=False)
    half_optimizer = QuadraticModelOptimizer(half, "categorical", lr=0.5, adaptive_damping=False)
    scheduler = torch.optim.lr_scheduler.StepLR(half_optimizer, step_size=1, gamma=0.1)
    full_optimizer.step(_closure(full, full_optimizer, inputs, labels))
    half_optimizer.step(_closure(half, half_optimizer, inputs, labels))
    torch.testing.assert_close(_flat(half) - start, 0.5 * (_flat(full) - start))
    assert half_optimizer.last_step["alpha"] == pytest.approx(
        0.5 * full_optimizer.last_step["alpha"]
    )
    scheduler.step()
    assert half_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="lr must be a positive finite number, got 0"):
        QuadraticModelOptimizer(full, "categorical", lr=0)


def test_max_kl_bounds_the_fisher_norm_of_the_step() -> None:
    inputs, labels = _classification()
    free, bounded, reference = _mlp(), _mlp(), _mlp()
    fisher = _dense_fisher(reference, inputs)
    start = _flat(reference)
    for model, max_kl in ((free, None), (bounded, 1e-4)):
        optimizer = QuadraticModelOptimizer(
            model, "categorical", max_kl=max_kl, adaptive_damping=False
        )
        optimizer.step(_closure(model, optimizer, inputs, labels))
    free_step, bounded_step = _flat(free) - start, _flat(bounded) - start
    assert 0.5 * float(free_step @ fisher @ free_step) > 1e-3  # the bound binds
    assert 0.5 * float(bounded_step @ fisher @ bounded_step) == pytest.approx(1e-4, rel=1e-9)
    cosine = float(free_step @ bounded_step) / float(free_step.norm() * bounded_step.norm())
    assert cosine == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="max_kl must be a positive finite number or None"):
        QuadraticModelOptimizer(free, "categorical", max_kl=0.0)


def test_default_damping_floor_holds_on_an_exact_quadratic_model() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(20, 3, generator=generator)
    targets = torch.randn(20, 1, generator=generator)
    model = nn.Linear(3, 1)
    optimizer = QuadraticModelOptimizer(
        model, "gaussian", damping=3e-3, damping_decay=0.5, damping_adaptation_interval=1
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = 0.5 * (model(inputs) - targets).pow(2).sum(-1).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    assert optimizer.last_step["ratio"] > 0.75
    assert optimizer.damping == 1.5e-3
    optimizer.step(closure)
    assert optimizer.damping == 1e-3  # halved again, but not below the floor
    with pytest.raises(ValueError, match="must satisfy low <= damping"):
        QuadraticModelOptimizer(model, "gaussian", damping=1e-4)


def test_one_param_group_only() -> None:
    model = _mlp()
    optimizer = QuadraticModelOptimizer(model, "categorical")
    with pytest.raises(ValueError, match="exactly one param group"):
        optimizer.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    assert len(optimizer.param_groups) == 1


def test_with_dropout_the_fisher_is_that_of_the_averaged_network() -> None:
    """The closure's gradient keeps its dropout mask; the Fisher products run with dropout off
    (before, each product drew masks of its own)."""
    inputs, labels = _classification()
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3))
    reference = copy.deepcopy(model)
    damping = 0.05
    optimizer = QuadraticModelOptimizer(
        model, "categorical", damping=damping, adaptive_damping=False
    )
    torch.manual_seed(7)
    optimizer.step(_closure(model, optimizer, inputs, labels))
    assert model[2].training
    torch.manual_seed(7)
    gradient = _gradient(reference, inputs, labels)
    fisher = _dense_fisher(reference.eval(), inputs)
    coefficients = _oracle_coefficients(fisher, damping, gradient, [-gradient])
    expected = _flat(reference) - coefficients[0] * gradient
    torch.testing.assert_close(_flat(model), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_full_batch_records_the_restored_parameters_after_an_undone_step(
    fisher_type: str,
) -> None:
    """With a preconditioner, ``full_batch`` used to fold the statistics of the closure run at
    the undone parameters (0.44 off the re-evaluating optimizer's factors after two steps):
    they are discarded, and the closure run at the restored parameters records, with the same
    Monte-Carlo draws as the re-evaluating optimizer's next step."""
    inputs, labels = _classification()
    runs = []
    for full_batch in (False, True):
        model = _mlp()
        options = {"likelihood": "categorical"} if fisher_type == "mc" else {}
        precond = KFAC(
            model,
            fisher_type=fisher_type,
            generator=torch.Generator().manual_seed(5),
            factor_decay=0.5,
            inv_update_interval=1,
            damping=0.1,
            **options,
        )
        optimizer = QuadraticModelOptimizer(
            model,
            "categorical",
            preconditioner=precond,
            lr=5.0,
            damping=0.1,
            damping_adaptation_interval=5,
            damping_decay=0.5,
            full_batch=full_batch,
            reject_steps=True,
        )
        closure = _closure(model, optimizer, inputs, labels, precond)
        for _ in range(6):
            optimizer.step(closure)
        runs.append((model, precond, optimizer))
    (model, precond, optimizer), (twin, twin_precond, full) = runs
    assert optimizer.counters["rejected_steps"] >= 1
    full.step(_closure(twin, full, inputs, labels, twin_precond))  # assesses the sixth step
    optimizer.step(_closure(model, optimizer, inputs, labels, precond))
    assert full.counters == optimizer.counters
    for ours, theirs in zip(twin_precond.layers, precond.layers, strict=True):
        torch.testing.assert_close(ours.input_factor, theirs.input_factor)
        torch.testing.assert_close(ours.output_factor, theirs.output_factor)
    torch.testing.assert_close(_flat(twin), _flat(model))
