"""NaturalGradient against closed-form Fisher-scoring steps and its optimizer contract."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from natgrad import fisher
from natgrad.optim import NaturalGradient
from natgrad.optim.trust_region import (
    damping_update,
    kl_clip_scale,
    levenberg_marquardt_damping,
    reduction_ratio,
    trust_region_scale,
)

pytestmark = pytest.mark.usefixtures("float64_default")


def _logistic_data(seed: int = 0, n: int = 40, d: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, d, generator=generator)
    true_weight = torch.tensor([1.0, -2.0, 0.5])[:d]
    probs = torch.sigmoid(inputs @ true_weight + 0.3)
    return inputs, torch.bernoulli(probs, generator=generator)


def _closure(model: nn.Module, opt: torch.optim.Optimizer, inputs, labels):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(inputs).squeeze(-1), labels)
        loss.backward()
        return loss

    return closure


def _fisher_scoring_step(weight: np.ndarray, inputs: np.ndarray, labels: np.ndarray, damping):
    """Closed form (NumPy): θ − (XᵀWX/N + λI)⁻¹ Xᵀ(p − y)/N with a column of ones for the bias."""
    design = np.hstack([inputs, np.ones((len(inputs), 1))])
    probs = 1 / (1 + np.exp(-design @ weight))
    gradient = design.T @ (probs - labels) / len(labels)
    fisher = design.T @ (design * (probs * (1 - probs))[:, None]) / len(labels)
    return weight - np.linalg.solve(fisher + damping * np.eye(len(weight)), gradient), fisher


def _flat(model: nn.Module) -> np.ndarray:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_dense_step_equals_closed_form_fisher_scoring(damping: float) -> None:
    inputs, labels = _logistic_data()
    model = nn.Linear(3, 1)
    before = _flat(model)
    opt = NaturalGradient(model, "bernoulli", lr=1.0, damping=damping)
    opt.step(_closure(model, opt, inputs, labels))
    expected, _ = _fisher_scoring_step(before, inputs.numpy(), labels.numpy(), damping)
    np.testing.assert_allclose(_flat(model), expected, rtol=1e-9, atol=1e-10)


def test_diag_step_divides_by_the_fisher_diagonal() -> None:
    inputs, labels = _logistic_data(seed=1)
    model = nn.Linear(3, 1)
    before = _flat(model)
    opt = NaturalGradient(model, "bernoulli", lr=0.5, structure="diag", damping=0.01)
    opt.step(_closure(model, opt, inputs, labels))
    design = np.hstack([inputs.numpy(), np.ones((40, 1))])
    probs = 1 / (1 + np.exp(-design @ before))
    gradient = design.T @ (probs - labels.numpy()) / 40
    fisher_diag = (design**2 * (probs * (1 - probs))[:, None]).mean(0)
    np.testing.assert_allclose(_flat(model), before - 0.5 * gradient / (fisher_diag + 0.01), 1e-9)


def test_iterating_reaches_the_maximum_likelihood_estimate() -> None:
    statsmodels = pytest.importorskip("statsmodels.api")
    inputs, labels = _logistic_data(seed=2, n=200)
    model = nn.Linear(3, 1)
    opt = NaturalGradient(model, "bernoulli", lr=1.0, damping=0.0)
    for _ in range(12):
        opt.step(_closure(model, opt, inputs, labels))
    design = np.hstack([inputs.numpy(), np.ones((200, 1))])
    reference = statsmodels.Logit(labels.numpy(), design).fit(disp=0, tol=1e-12).params
    np.testing.assert_allclose(_flat(model), reference, rtol=1e-7, atol=1e-9)


def test_max_kl_bounds_the_quadratic_kl_of_the_step() -> None:
    inputs, labels = _logistic_data(seed=3)
    model = nn.Linear(3, 1)
    before = _flat(model)
    max_kl = 1e-3
    opt = NaturalGradient(model, "bernoulli", lr=1.0, damping=0.0, max_kl=max_kl)
    opt.step(_closure(model, opt, inputs, labels))
    _, fisher = _fisher_scoring_step(before, inputs.numpy(), labels.numpy(), 0.0)
    step = _flat(model) - before
    assert 0.5 * step @ fisher @ step == pytest.approx(max_kl, rel=1e-8)


def test_mean_loss_reduction_and_lr_scheduler_changes_the_step() -> None:
    inputs, labels = _logistic_data(seed=4)
    model = nn.Linear(3, 1)
    opt = NaturalGradient(model, "bernoulli", lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(_closure(model, opt, inputs, labels))
    scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.5
    before = _flat(model)
    opt.step(_closure(model, opt, inputs, labels))
    full, _ = _fisher_scoring_step(before, inputs.numpy(), labels.numpy(), 1e-3)
    np.testing.assert_allclose(_flat(model), before + 0.5 * (full - before), rtol=1e-9)


def test_state_dict_round_trip_resumes_identically() -> None:
    inputs, labels = _logistic_data(seed=5)
    model = nn.Linear(3, 1)
    opt = NaturalGradient(model, "bernoulli", lr=0.7, adaptive_damping=True, damping=1.0)
    for _ in range(2):
        opt.step(_closure(model, opt, inputs, labels))
    twin = copy.deepcopy(model)
    twin_opt = NaturalGradient(twin, "bernoulli", lr=0.1, adaptive_damping=True, damping=5.0)
    twin_opt.load_state_dict(opt.state_dict())
    assert twin_opt.param_groups[0]["damping"] == opt.param_groups[0]["damping"]
    assert twin_opt.counters == opt.counters
    for _ in range(2):
        opt.step(_closure(model, opt, inputs, labels))
        twin_opt.step(_closure(twin, twin_opt, inputs, labels))
    np.testing.assert_array_equal(_flat(model), _flat(twin))


def test_adaptive_damping_shrinks_on_an_exact_quadratic_model() -> None:
    generator = torch.Generator().manual_seed(6)
    inputs = torch.randn(30, 2, generator=generator)
    targets = inputs @ torch.tensor([[1.0], [-1.0]])
    model = nn.Linear(2, 1)
    opt = NaturalGradient(model, "gaussian", lr=0.5, damping=1.0, adaptive_damping=True)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * (model(inputs) - targets).pow(2).sum(-1).mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.param_groups[0]["damping"] == pytest.approx(2.0 / 3.0)


def test_non_finite_loss_refuses_the_step() -> None:
    model = nn.Linear(2, 1)
    before = _flat(model)
    opt = NaturalGradient(model, "gaussian")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(torch.ones(4, 2)).sum() * math.inf
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="refused"):
        opt.step(closure)
    np.testing.assert_array_equal(_flat(model), before)
    assert opt.counters["refused_steps"] == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr"),
        ({"kind": "fancy"}, "fancy"),
        ({"structure": "tridiagonal"}, "tridiagonal"),
        ({"damping": -1.0}, "damping"),
        ({"max_kl": 0.0}, "max_kl"),
        ({"mc_samples": 0}, "mc_samples"),
    ],
)
def test_bad_options_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NaturalGradient(nn.Linear(2, 1), "gaussian", **kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"lr": True}, {"damping": "0.1"}, {"max_kl": torch.tensor(0.1)}, {"mc_samples": 1.0}]
)
def test_options_of_the_wrong_kind_raise_type_error(kwargs: dict) -> None:
    (name,) = kwargs
    with pytest.raises(TypeError, match=f"^{name} must be"):
        NaturalGradient(nn.Linear(2, 1), "gaussian", **kwargs)


def test_empirical_kind_requires_targets() -> None:
    model = nn.Linear(2, 1)
    opt = NaturalGradient(model, "gaussian", kind="empirical")
    with pytest.raises(ValueError, match="targets"):
        opt.step(lambda: model(torch.ones(3, 2)).sum())


def test_kl_clip_scale_and_levenberg_marquardt_rule() -> None:
    update = torch.tensor([2.0, 0.0])
    assert kl_clip_scale(update, 2 * update, max_kl=1.0) == pytest.approx(0.5)
    assert kl_clip_scale(update, 2 * update, max_kl=10.0) == 1.0
    assert levenberg_marquardt_damping(1.0, -1.0, -1.0) == pytest.approx(2 / 3)
    assert levenberg_marquardt_damping(1.0, 0.1, -1.0) == pytest.approx(1.5)
    assert levenberg_marquardt_damping(1.0, -0.5, -1.0) == 1.0
    assert levenberg_marquardt_damping(1.0, math.nan, -1.0) == pytest.approx(1.5)


def test_adaptive_damping_undoes_a_step_that_raises_the_loss() -> None:
    inputs, labels = _logistic_data(seed=7)
    model = nn.Linear(3, 1)
    before = _flat(model)
    opt = NaturalGradient(model, "bernoulli", lr=50.0, damping=1e-3, adaptive_damping=True)
    closure = _closure(model, opt, inputs, labels)
    loss_before = float(closure().detach())
    opt.step(closure)
    np.testing.assert_array_equal(_flat(model), before)
    assert float(closure().detach()) == loss_before
    assert opt.counters["rejected_steps"] == 1
    assert opt.param_groups[0]["damping"] == pytest.approx(1.5e-3)


def test_damping_update_records_the_levenberg_marquardt_step() -> None:
    record = damping_update(0.5, -0.9, -1.0, decay=0.5, bounds=(0.3, 10.0))
    assert record == {
        "actual": -0.9,
        "predicted": -1.0,
        "ratio": 0.9,
        "damping_before": 0.5,
        "damping_after": 0.3,  # halved to 0.25, then held at the floor
    }
    failed = damping_update(0.5, math.inf, -1.0, decay=0.5, bounds=(0.3, 10.0))
    assert failed["ratio"] == -math.inf and failed["damping_after"] == 1.0


def test_reduction_ratio_and_trust_region_scale_edge_cases() -> None:
    assert reduction_ratio(-0.5, -1.0) == 0.5
    assert reduction_ratio(0.2, -1.0) == -0.2
    assert math.isnan(reduction_ratio(-1.0, 0.0))  # no predicted change: undefined
    assert reduction_ratio(1.0, 0.5) == -math.inf  # a predicted rise that happened: failed
    assert reduction_ratio(float("nan"), -1.0) == -math.inf
    assert trust_region_scale(4.0, 1.0) == 0.5
    assert trust_region_scale(0.5, 1.0) == 1.0
    assert trust_region_scale(float("nan"), 1.0) == 1.0


def _classifier_with_dropout() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3))


def test_a_model_with_dropout_takes_the_fisher_of_the_averaged_network() -> None:
    """The closure's gradient keeps its dropout mask; the Fisher is built with dropout off (the
    builders refuse dropout in training mode, whose masks would make it random)."""
    inputs = torch.randn(12, 3, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(2))
    model = _classifier_with_dropout()
    reference = copy.deepcopy(model)
    opt = NaturalGradient(model, "categorical", lr=0.5, damping=0.1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    torch.manual_seed(7)
    opt.step(closure)
    assert model.training and model[2].training
    torch.manual_seed(7)
    nn.functional.cross_entropy(reference(inputs), labels).backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
    curvature = fisher(reference.eval(), inputs, likelihood="categorical")
    expected = torch.nn.utils.parameters_to_vector(reference.parameters()) - 0.5 * (
        curvature.solve(gradient, damping=0.1)
    )
    torch.testing.assert_close(torch.nn.utils.parameters_to_vector(model.parameters()), expected)
